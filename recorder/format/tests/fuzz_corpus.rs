//! Replays the committed fuzz corpora (and crash inputs, once there are any) of this crate's
//! parsers, so `cargo test` keeps every input the fuzzer ever kept passing.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("entry").path();
        out.push((p.clone(), std::fs::read(&p).expect("read")));
    }
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn frame_decode_corpus() {
    for (_, d) in corpus("frame_decode") {
        psm_recorder_format::fuzz::frames(&d);
    }
}

#[test]
fn reply_decode_corpus() {
    for (_, d) in corpus("reply_decode") {
        psm_recorder_format::fuzz::replies(&d);
    }
}

#[test]
fn recording_read_corpus() {
    let mut read_one = false;
    for (p, d) in corpus("recording_read") {
        psm_recorder_format::fuzz::recording(&d);
        if p.extension().is_some_and(|e| e == "psmrec") {
            let mut r = psm_recorder_format::file::RecordingReader::open(std::io::Cursor::new(&d))
                .expect("the seed recording is valid");
            while r.next_record().expect("record").is_some() {}
            read_one = true;
        }
    }
    assert!(read_one, "a valid seed recording is in the corpus");
}

#[test]
fn replay_sanitize_corpus() {
    for (_, d) in corpus("replay_sanitize") {
        psm_recorder_format::fuzz::sanitize(&d);
    }
}
