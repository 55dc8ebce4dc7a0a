//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay test: each feeds
//! arbitrary bytes to a parser of this crate and checks what must hold for any input.

use crate::audit::verify_log;
use crate::{EvidenceKey, PublicKey};

/// An audit log: verifying it never panics, reports problems only with a line inside the
/// input, and a log that verifies as OK stays OK when a newline is added at its end.
pub fn audit_log(data: &[u8]) {
    let lines = data.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    let key = PublicKey::from_bytes([7u8; 32]);
    for k in [None, Some(&key)] {
        let Ok(report) = verify_log(data, k) else {
            return;
        };
        for p in &report.problems {
            assert!(p.line >= 1 && p.line <= lines, "{p} outside the input");
        }
        let _ = report.to_string();
        if report.ok() && !data.ends_with(b"\n") {
            let mut more = data.to_vec();
            more.push(b'\n');
            let again = verify_log(&more[..], k).map(|r| r.ok());
            assert!(matches!(again, Ok(true)), "a final newline broke the chain");
        }
    }
    // key text as an auditor would paste it
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(k) = PublicKey::parse(text) {
            assert_eq!(PublicKey::parse(&k.to_string()).ok(), Some(k));
        }
    }
    let _ = EvidenceKey::from_pkcs8(data, std::path::Path::new("-"));
}
