//! Replays the committed `rdp_replay` fuzz corpus, so `cargo test` keeps every input the
//! fuzzer ever kept passing; `regenerate_corpus` writes its seeds.

use std::path::PathBuf;

use psm_rdp::fuzz;
use psm_rdp::replay::Direction;
use psm_rdp::synth;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/rdp_replay")
}

#[test]
fn rdp_replay_corpus() {
    let dir = corpus();
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("entry").path();
        fuzz::replay(&std::fs::read(&p).expect("read"));
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}

#[test]
fn records_round_trip() {
    let a: &[u8] = b"\x03\x00\x00\x04";
    let b: &[u8] = b"xyz";
    let data = fuzz::encode(&[
        (Direction::TargetToClient, a),
        (Direction::ClientToTarget, b),
    ]);
    assert_eq!(
        fuzz::records(&data),
        vec![
            (Direction::TargetToClient, a),
            (Direction::ClientToTarget, b)
        ]
    );
    assert_eq!(
        fuzz::records(&data[..data.len() - 1]).len(),
        1,
        "cut record dropped"
    );
}

/// Writes the seeds: a synthetic session (start, updates, a resize) and variations.
#[test]
#[ignore = "regenerates fuzz/corpus/rdp_replay"]
fn regenerate_corpus() {
    let start = synth::session_start(64, 48).expect("start");
    let red = synth::fill(0, 0, 16, 16, [255, 0, 0]).expect("red");
    let edge = synth::fill(60, 40, 8, 16, [0, 255, 0]).expect("edge");
    let resize = synth::demand_active(32, 32).expect("resize");
    let s = Direction::TargetToClient;
    let mut session: Vec<(Direction, &[u8])> = start.iter().map(|p| (s, p.as_slice())).collect();
    session.push((s, &red));
    session.push((Direction::ClientToTarget, &red));
    session.push((s, &edge));
    session.push((s, &resize));
    session.push((s, &red));
    std::fs::create_dir_all(corpus()).expect("mkdir");
    std::fs::write(corpus().join("session"), fuzz::encode(&session)).expect("write");
    let no_connect: Vec<(Direction, &[u8])> = session[1..].to_vec();
    std::fs::write(
        corpus().join("no_connect_response"),
        fuzz::encode(&no_connect),
    )
    .expect("w");
    let mut cut = red.clone();
    cut.truncate(red.len() / 2);
    let mut partial = session[..3].to_vec();
    partial.push((s, &cut));
    std::fs::write(corpus().join("cut_update"), fuzz::encode(&partial)).expect("write");
    // the start of a real xrdp session (tests/fixtures/xrdp-xlogo.psmrec), up to about 16 KB
    let f = std::fs::File::open(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/xrdp-xlogo.psmrec"),
    )
    .expect("fixture");
    let mut reader = psm_recorder_format::file::RecordingReader::open(f).expect("recording");
    let mut pdus = Vec::new();
    while let Some(rec) = reader.next_record().expect("read") {
        if let psm_recorder_format::file::Record::Data { data, .. } = rec {
            pdus.push(data.to_vec());
        }
    }
    let mut real: Vec<(Direction, &[u8])> = Vec::new();
    let mut size = 0;
    for p in &pdus {
        if size + p.len() > 16 * 1024 {
            continue;
        }
        size += p.len();
        real.push((s, p));
    }
    std::fs::write(corpus().join("xrdp_start"), fuzz::encode(&real)).expect("write");
}
