//! Replays the committed `index_lines` fuzz corpus, so `cargo test` keeps every input the
//! fuzzer ever kept passing.

use std::path::PathBuf;

#[test]
fn index_lines_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/index_lines");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("entry").path();
        psm_recorder_index::fuzz::lines(&std::fs::read(&p).expect("read"));
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}
