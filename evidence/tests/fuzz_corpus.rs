//! Replays the committed fuzz corpus of the audit log verifier (see `fuzz/`), so `cargo test`
//! keeps every input the fuzzer ever kept passing.

use std::path::PathBuf;

#[test]
fn audit_verify_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/audit_verify");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(e.expect("entry").path()).expect("read");
        psm_evidence::fuzz::audit_log(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}
