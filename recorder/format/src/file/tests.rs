//! The file format's tests: records, chunks and seals, cuts, listings.

use super::writer::{next_level, ZSTD_FAST_LEVEL, ZSTD_LEVEL};
use super::*;
use std::fs;
use std::path::{Path, PathBuf};

fn meta() -> RecordingMeta {
    RecordingMeta {
        protocol: String::new(),
        recording_id: "rec-1".into(),
        session_id: "s1".into(),
        user: "alice".into(),
        target: "db1".into(),
        account: "root".into(),
        source: "10.0.0.1:5555".into(),
        start_ms: 1_700_000_000_000,
    }
}

fn records() -> Vec<Record> {
    vec![
        Record::Resize {
            ts_us: 1,
            channel: 0,
            cols: 120,
            rows: 40,
        },
        Record::Data {
            ts_us: 10,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from_static(b"hello\r\n\x00\xff"),
        },
        Record::Data {
            ts_us: 11,
            channel: 0,
            direction: Direction::Input,
            data: Bytes::new(),
        },
        Record::Data {
            ts_us: 12,
            channel: 3,
            direction: Direction::Error,
            data: Bytes::from(vec![7u8; 300_000]),
        },
        Record::Close {
            ts_us: 99,
            summary: CloseSummary {
                end_ms: 1_700_000_000_100,
                exit_status: Some(3),
                exit_signal: Some("TERM".into()),
                reason: "client closed".into(),
            },
        },
    ]
}

fn write_all(recs: &[Record]) -> Vec<u8> {
    write_all_as(recs, Layout::Chunks)
}

/// A writer of format version 5 (`Chunks`) or 3 (`Stream`).
fn writer(layout: Layout) -> RecordingWriter<Vec<u8>> {
    match layout {
        Layout::Stream => RecordingWriter::new_stream(Vec::new(), &meta()),
        _ => RecordingWriter::new(Vec::new(), &meta()),
    }
    .expect("new")
}

fn write_all_as(recs: &[Record], layout: Layout) -> Vec<u8> {
    let mut w = writer(layout);
    for r in recs {
        w.write(r).expect("write");
    }
    w.finish().expect("finish")
}

fn read_all(bytes: &[u8]) -> (Vec<Record>, bool) {
    let mut r = RecordingReader::open(bytes).expect("open");
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().expect("record") {
        out.push(rec);
    }
    (out, r.truncated())
}

#[test]
fn round_trip_all_record_kinds() {
    for (layout, magic, version) in [
        (Layout::Chunks, MAGIC_CHUNKED, FORMAT_VERSION_CHUNKED),
        (Layout::Stream, MAGIC_BLAKE3, FORMAT_VERSION_BLAKE3),
    ] {
        let bytes = write_all_as(&records(), layout);
        assert!(bytes.starts_with(magic));
        let r = RecordingReader::open(&bytes[..]).expect("open");
        assert_eq!(r.meta(), &meta());
        assert_eq!(r.version(), version);
        assert_eq!(r.encrypted_with(), None);
        let (got, truncated) = read_all(&bytes);
        assert_eq!(got, records());
        assert!(!truncated);
    }
}

/// Format version 5 seals the bytes as written: a chunk of zeros costs its seal a hash of
/// its few compressed bytes, not of the megabyte it holds.
#[test]
fn chunked_seals_cover_the_compressed_bytes() {
    let zeros = Record::Data {
        ts_us: 1,
        channel: 0,
        direction: Direction::Output,
        data: Bytes::from(vec![0u8; 1 << 20]),
    };
    let bytes = write_all(std::slice::from_ref(&zeros));
    assert!(bytes.len() < 4096, "{} bytes", bytes.len());
    let spans = frame_spans(&bytes);
    // the header, the chunk with its seal
    assert_eq!(spans.len(), 2);
    assert_eq!(bytes[spans[1].start], KIND_CHUNK);
    let (got, truncated) = read_all(&bytes);
    assert_eq!(got, vec![zeros]);
    assert!(truncated, "no CLOSE was written");
}

#[test]
fn no_close_is_truncated() {
    let recs = &records()[..2];
    let (got, truncated) = read_all(&write_all(recs));
    assert_eq!(got, recs);
    assert!(truncated);
}

#[test]
fn cut_after_flush_keeps_what_was_flushed() {
    for layout in [Layout::Chunks, Layout::Stream] {
        let recs = records();
        let mut w = writer(layout);
        for r in &recs[..3] {
            w.write(r).expect("write");
        }
        w.flush().expect("flush");
        let flushed = w.get_ref().len();
        assert_eq!(w.pending_bytes(), 0);
        for r in &recs[3..] {
            w.write(r).expect("write");
        }
        let full = w.finish().expect("finish");
        // exactly at the flush point
        let (got, truncated) = read_all(&full[..flushed]);
        assert_eq!(got, &recs[..3]);
        assert!(truncated);
        // anywhere after it: a prefix of the records at least as long, never an error (in
        // format version 5 every record, the clear CLOSE too, may precede a cut seal)
        for cut in (flushed..full.len()).step_by(97) {
            let (got, truncated) = read_all(&full[..cut]);
            assert!(got.len() >= 3, "{layout:?} cut {cut}");
            assert_eq!(got, &recs[..got.len()]);
            assert!(truncated, "{layout:?} cut {cut}");
        }
    }
}

#[test]
fn cut_inside_the_first_frame_fails_only_without_header() {
    let bytes = write_all(&records());
    assert!(RecordingReader::open(&bytes[..4]).is_err());
    assert!(RecordingReader::open(&bytes[..MAGIC.len() + 3]).is_err());
    assert!(RecordingReader::open(&b"PSMREC2\nxxxx"[..]).is_err());
}

#[test]
fn header_alone_after_flush_is_readable() {
    let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("new");
    w.flush().expect("flush");
    let bytes = w.get_ref().clone();
    let mut r = RecordingReader::open(&bytes[..]).expect("open");
    assert_eq!(r.meta().user, "alice");
    assert!(r.next_record().expect("none").is_none());
    assert!(r.truncated());
}

#[test]
fn several_flushes_make_several_frames() {
    let recs = records();
    let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("new");
    for r in &recs {
        w.write(r).expect("write");
        w.flush().expect("flush");
        w.flush().expect("second flush is a no-op");
    }
    let bytes = w.finish().expect("finish");
    let (got, truncated) = read_all(&bytes);
    assert_eq!(got, recs);
    assert!(!truncated);
}

#[test]
fn optional_unknown_kinds_are_skipped_and_others_rejected() {
    let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("new");
    w.compress(&[0x9f, 0, 0, 0, 2, 9, 9]).expect("raw");
    w.write(&records()[0]).expect("write");
    w.compress(&[0x05, 0, 0, 0, 0]).expect("raw");
    let bytes = w.finish().expect("finish");
    let mut r = RecordingReader::open(&bytes[..]).expect("open");
    assert_eq!(r.next_record().expect("resize"), Some(records()[0].clone()));
    assert!(r.next_record().is_err());
    assert!(r.next_record().expect("ended").is_none());
}

#[test]
fn path_for_rejects_bad_ids() {
    let dir = Path::new("/data/recordings");
    assert_eq!(
        path_for(dir, "ab_C-9").expect("ok"),
        PathBuf::from("/data/recordings/ab_C-9.psmrec")
    );
    for bad in ["../x", "", "a/b", "a.b", "..", "é", &"x".repeat(65)] {
        assert!(path_for(dir, bad).is_err(), "{bad:?}");
    }
    assert!(path_for(dir, &"x".repeat(64)).is_ok());
}

/// A damaged chunk (one flipped byte) does not hide a version 5 recording from listings:
/// `info` reads the clear header, seals and CLOSE only.
#[test]
fn info_of_a_damaged_chunked_recording_still_lists_it() {
    let tmp = std::env::temp_dir().join(format!("psmrec-info-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).expect("mkdir");
    let mut bytes = write_all(&records());
    let spans = frame_spans(&bytes);
    let chunk = spans
        .iter()
        .find(|r| bytes[r.start] == KIND_CHUNK)
        .expect("a CHUNK record")
        .clone();
    bytes[chunk.start + RECORD_HEAD + 6] ^= 0xff;
    let path = tmp.join("rec-1.psmrec");
    fs::write(&path, &bytes).expect("write");
    let got = info(&path);
    let _ = fs::remove_dir_all(&tmp);
    let got = got.expect("listed");
    assert_eq!(
        got.summary.as_ref().map(|s| s.reason.as_str()),
        Some("client closed")
    );
    assert_eq!(got.meta, meta());
}

#[test]
fn list_sorts_skips_and_tolerates_missing_dir() {
    let tmp = std::env::temp_dir().join(format!("psmrec-list-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    assert!(list(&tmp).expect("missing").is_empty());
    fs::create_dir_all(&tmp).expect("mkdir");
    let mut later = meta();
    later.start_ms += 5;
    later.recording_id = "b".into();
    let mut w = RecordingWriter::new(Vec::new(), &later).expect("new");
    w.write(&records()[1]).expect("write");
    fs::write(tmp.join("b.psmrec"), w.finish().expect("finish")).expect("b");
    fs::write(tmp.join("a.psmrec"), write_all(&records())).expect("a");
    fs::write(tmp.join("junk.psmrec"), b"nope").expect("junk");
    fs::write(tmp.join("other.txt"), b"nope").expect("other");
    let Listing {
        recordings: found,
        unreadable: failed,
    } = scan(&tmp).expect("list");
    let _ = fs::remove_dir_all(&tmp);
    assert_eq!(
        found.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(failed.len(), 1);
    let a = &found[0];
    assert_eq!(
        a.summary.as_ref().map(|s| s.reason.as_str()),
        Some("client closed")
    );
    assert_eq!(a.duration_ms, 0);
    assert!(a.size_bytes > MAGIC.len() as u64);
    assert!(found[1].summary.is_none());
}

#[test]
fn the_level_follows_what_the_data_does_and_every_chunk_reads_back() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = vec![0u8; 256 * 1024];
    for b in random.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let text = b"total 48\ndrwxr-xr-x  2 root root 4096 Dec  4 09:00 bin\n".repeat(4096);
    let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("new");
    assert_eq!(w.level(), ZSTD_LEVEL);
    let mut recs = Vec::new();
    let mut levels = Vec::new();
    for (i, data) in [&random[..], &random[..], &text[..], &random[..]]
        .into_iter()
        .enumerate()
    {
        let r = Record::Data {
            ts_us: i as u64,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::copy_from_slice(data),
        };
        w.write(&r).expect("write");
        w.flush().expect("flush");
        recs.push(r);
        levels.push(w.level());
    }
    assert_eq!(
        levels,
        [
            ZSTD_FAST_LEVEL,
            ZSTD_FAST_LEVEL,
            ZSTD_LEVEL,
            ZSTD_FAST_LEVEL
        ],
        "fast after random chunks, back after text"
    );
    let bytes = w.finish().expect("finish");
    // (no CLOSE record: the reader calls it truncated, every record is there)
    let (got, _) = read_all(&bytes);
    assert_eq!(got, recs);
    assert_eq!(
        next_level(ZSTD_LEVEL, 100, 100),
        ZSTD_LEVEL,
        "too small to judge"
    );
    assert_eq!(
        next_level(ZSTD_FAST_LEVEL, 1 << 20, 800 << 10),
        ZSTD_FAST_LEVEL
    );
}

#[test]
#[ignore = "throughput check: cargo test -p psm-recorder-format -- --ignored --nocapture"]
fn throughput_random_256_mib() {
    // xorshift: incompressible for zstd
    let total = 256 * 1024 * 1024;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut all = vec![0u8; total];
    for b in all.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let all = Bytes::from(all);
    let mut w = RecordingWriter::new(io::sink(), &meta()).expect("new");
    let started = std::time::Instant::now();
    let chunk = 32 * 1024;
    for (i, at) in (0..total).step_by(chunk).enumerate() {
        w.write(&Record::Data {
            ts_us: i as u64 * 10,
            channel: 0,
            direction: Direction::Output,
            data: all.slice(at..at + chunk),
        })
        .expect("write");
        if w.pending_bytes() >= 4 << 20 {
            w.flush().expect("flush");
        }
    }
    w.finish().expect("finish");
    let secs = started.elapsed().as_secs_f64();
    println!("write: {:.0} MB/s", total as f64 / secs / 1e6);
}
