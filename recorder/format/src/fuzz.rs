//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests: each feeds
//! arbitrary bytes to one parser that reads what a peer chose, and checks what must hold for
//! any input (no panic, bounded work, round trips).

use std::io::Cursor;

use crate::file::pack::Unpacker;
use crate::file::{RecordingReader, RecordingWriter};
use crate::sanitize::Sanitizer;
use crate::{export, Frame, RecordingMeta, Reply};

/// Records read from one fuzzed recording at most (keeps each run short).
const MAX_RECORDS: usize = 10_000;

/// Relay -> recorder frames: whatever decodes re-encodes to the same bytes' meaning; a PACKED
/// frame goes into a recording as psm-recorder puts it (checked, then appended to a chunk), and
/// one that passes the check reads back whole, with the payload bytes it claimed.
pub fn frames(data: &[u8]) {
    let mut at = 0;
    while let Ok(Some((f, n))) = Frame::decode(&data[at..]) {
        if let Frame::Packed {
            ts_us,
            plain_len,
            data_len,
            frame,
            ..
        } = &f
        {
            packed(*ts_us, *plain_len, *data_len, frame);
        }
        assert!(
            n > 0 && n <= data.len() - at,
            "a frame uses what it decoded"
        );
        let mut again = Vec::new();
        f.encode(&mut again);
        match Frame::decode(&again) {
            Ok(Some((g, m))) => {
                assert_eq!(f, g, "round trip");
                assert_eq!(m, again.len());
            }
            other => panic!("re-encoded frame does not decode: {other:?}"),
        }
        at += n;
    }
}

fn packed(ts_us: u64, plain_len: u32, data_len: u64, frame: &[u8]) {
    let Ok(checked) = Unpacker::new().check(plain_len, data_len, ts_us, frame) else {
        return;
    };
    let Ok(mut w) = RecordingWriter::new(Vec::new(), &RecordingMeta::default()) else {
        return;
    };
    w.append_packed(checked)
        .expect("a checked frame goes into a recording");
    let bytes = w.finish().expect("finished");
    // what was checked reads back, to its last record
    let mut r = RecordingReader::open(Cursor::new(bytes)).expect("opens");
    let mut payload = 0;
    while let Some(rec) = r.next_record().expect("a checked frame reads back") {
        if let crate::file::Record::Data { data, .. } = rec {
            payload += data.len() as u64;
        }
    }
    assert_eq!(payload, data_len);
}

/// Recorder -> relay replies: the same.
pub fn replies(data: &[u8]) {
    let mut at = 0;
    while let Ok(Some((r, n))) = Reply::decode(&data[at..]) {
        assert!(n > 0 && n <= data.len() - at);
        let mut again = Vec::new();
        r.encode(&mut again);
        match Reply::decode(&again) {
            Ok(Some((s, m))) => {
                assert_eq!(r, s, "round trip");
                assert_eq!(m, again.len());
            }
            other => panic!("re-encoded reply does not decode: {other:?}"),
        }
        at += n;
    }
}

/// A recording file: read its records, render it as text and asciicast, and verify it.
pub fn recording(data: &[u8]) {
    if let Ok(mut r) = RecordingReader::open(Cursor::new(data)) {
        for _ in 0..MAX_RECORDS {
            match r.next_record() {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
    if let Ok(r) = RecordingReader::open(Cursor::new(data)) {
        let _ = export::text(r, std::io::sink());
    }
    if let Ok(r) = RecordingReader::open(Cursor::new(data)) {
        let _ = export::asciicast(r, std::io::sink());
    }
    // the verifier reads what the reader reads; without a key nothing can verify as OK
    let report = crate::verify::verify(Cursor::new(data), "fuzz", None);
    assert_ne!(report.status, crate::verify::Status::Ok, "{report}");
}

/// Terminal output through the replay filter: splitting the input anywhere changes nothing,
/// and no OSC, DCS, APC, PM or SOS introducer and no C1 control comes out.
pub fn sanitize(data: &[u8]) {
    let mut whole = Vec::new();
    let mut s = Sanitizer::new();
    s.feed(data, &mut whole);
    s.finish(&mut whole);
    let mut split = Vec::new();
    let mut t = Sanitizer::new();
    let mid = data.len() / 2;
    t.feed(&data[..mid], &mut split);
    t.feed(&data[mid..], &mut split);
    t.finish(&mut split);
    assert_eq!(
        whole, split,
        "the output does not depend on how the input is cut"
    );
    for w in whole.windows(2) {
        assert!(
            !(w[0] == 0x1b && matches!(w[1], b']' | b'P' | b'_' | b'^' | b'X')),
            "a string introducer passed: {whole:?}"
        );
    }
    if let Ok(text) = std::str::from_utf8(&whole) {
        assert!(
            !text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
            "a C1 control passed"
        );
    }
}
