//! Replays the committed fuzz corpus of the relay's command gate (see `fuzz/`).

use std::path::PathBuf;

#[test]
fn command_gate_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/command_gate");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(e.expect("entry").path()).expect("read");
        psm_relay::fuzz::gate(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}
