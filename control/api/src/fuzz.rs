//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests for the parsers of
//! this crate that read what a peer chose.

use crate::{decode_line, escape, ControlToRelay, Login, RelayToControl};

/// A login string from an SSH client: parsing never panics, a parsed login reassembles to the
/// same string, and its escaped form holds no control or bidi character.
pub fn login(s: &str) {
    if let Ok(l) = Login::parse(s) {
        let again = format!("{}@{}@{}", l.user, l.account, l.target);
        assert_eq!(Login::parse(&again).ok(), Some(l), "round trip");
    }
    let _ = Login::user_part(s);
    let shown = escape(s);
    assert!(
        !shown
            .chars()
            .any(|c| c.is_control() || crate::escape::is_bidi_or_invisible(c)),
        "escaped text is inert"
    );
}

/// A line on the policy socket, read either way: decoding never panics, and what decodes
/// encodes again.
pub fn lines(data: &[u8]) {
    if let Ok(m) = decode_line::<RelayToControl>(data) {
        let again = crate::encode_line(&m);
        assert!(decode_line::<RelayToControl>(&again).is_ok(), "round trip");
    }
    if let Ok(m) = decode_line::<ControlToRelay>(data) {
        let again = crate::encode_line(&m);
        assert!(decode_line::<ControlToRelay>(&again).is_ok(), "round trip");
    }
}
