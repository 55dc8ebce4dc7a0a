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

/// Between fuzzing runs: every seed recording (each format version) mutated a few hundred ways
/// (bytes flipped, cut, inserted, a piece repeated) goes through the fuzz target's checks
/// without a panic. Deterministic: the same mutations every run.
#[test]
fn mutated_seed_recordings_pass_the_fuzz_checks() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n.max(1) as u64) as usize
    };
    let mut seeds = 0;
    for (p, d) in corpus("recording_read") {
        if p.extension().is_none_or(|e| e != "psmrec") || d.len() < 16 {
            continue;
        }
        seeds += 1;
        for _ in 0..400 {
            let mut m = d.clone();
            match next(4) {
                0 => {
                    for _ in 0..1 + next(4) {
                        let at = next(m.len());
                        m[at] ^= 1 << next(8);
                    }
                }
                1 => m.truncate(next(m.len())),
                2 => {
                    let at = next(m.len());
                    let junk: Vec<u8> = (0..1 + next(16)).map(|_| next(256) as u8).collect();
                    m.splice(at..at, junk);
                }
                _ => {
                    let a = next(m.len());
                    let b = (a + 1 + next(64)).min(m.len());
                    let piece = m[a..b].to_vec();
                    let at = next(m.len());
                    m.splice(at..at, piece);
                }
            }
            psm_recorder_format::fuzz::recording(&m);
        }
    }
    assert!(
        seeds >= 9,
        "{seeds} seed recordings (versions 1, 3 and 5, three each)"
    );
}
