//! Replays the committed fuzz corpora of this crate's parsers (see `fuzz/`).

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
        .collect();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn login_parse_corpus() {
    for d in corpus("login_parse") {
        if let Ok(s) = std::str::from_utf8(&d) {
            psm_control_api::fuzz::login(s);
        }
    }
}

#[test]
fn relay_line_corpus() {
    for d in corpus("relay_line") {
        psm_control_api::fuzz::lines(&d);
    }
}
