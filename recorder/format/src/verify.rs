//! Verification of a sealed, signed recording: is it what psm-recorder wrote, all of it?
//!
//! [`verify`] reads a recording once, in bounded memory, and checks the seal chain (each
//! chunk's content against its seal, chunk numbers in order, none missing), the trailer (present,
//! after CLOSE, naming this session and recording, the chunk count and last seal hash, signed by
//! the given key) and that nothing follows it. It says what is wrong and where (chunk numbers and
//! times into the session), and tells a recording cut short by a crash (*truncated*) from one
//! that was changed (*failed*).

use std::fmt;
use std::io::Read;

use psm_evidence::{offset, utc, PublicKey};

use crate::file::{Item, Record, RecordingReader};
use crate::RecordingMeta;

/// Problems listed at most (the count goes on).
const MAX_PROBLEMS: usize = 100;

/// The verdict on one recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Sealed, complete, signed by the key, untouched.
    Ok,
    /// Cut short by a crash (or closed by the recorder when its relay link was lost), and
    /// untouched up to there.
    Truncated,
    /// Written before recordings were sealed: nothing to check.
    Unsealed,
    /// Changed, damaged, or not signed by the key.
    Failed,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "OK",
            Status::Truncated => "TRUNCATED",
            Status::Unsealed => "UNSEALED",
            Status::Failed => "FAILED",
        })
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The recording's id (file name), as given.
    pub id: String,
    /// Its header, when it could be read.
    pub meta: Option<RecordingMeta>,
    /// The verdict.
    pub status: Status,
    /// Chunks whose seal was read.
    pub chunks: u64,
    /// Time into the session of the last good chunk, in microseconds.
    pub last_ts_us: u64,
    /// One line saying what the recording is (OK) or how it was cut short (truncated).
    pub summary: String,
    /// What is wrong, with where.
    pub problems: Vec<String>,
}

impl Report {
    /// Whether the recording verified (status OK).
    pub fn ok(&self) -> bool {
        self.status == Status::Ok
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.id, self.status)?;
        if !self.summary.is_empty() {
            write!(f, ": {}", self.summary)?;
        }
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

struct State {
    problems: Vec<String>,
    more: u64,
}

impl State {
    fn problem(&mut self, what: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(what);
        } else {
            self.more += 1;
        }
    }
}

/// Checks the recording read from `r`, named `id` (its file name without extension), against
/// `key` (when `None`, the trailer's signature is not checked and the recording cannot be OK).
pub fn verify<R: Read>(r: R, id: &str, key: Option<&PublicKey>) -> Report {
    let mut report = Report {
        id: id.to_string(),
        meta: None,
        status: Status::Failed,
        chunks: 0,
        last_ts_us: 0,
        summary: String::new(),
        problems: Vec::new(),
    };
    let mut reader = match RecordingReader::open(r) {
        Ok(reader) => reader,
        Err(e) => {
            report.problems.push(format!(
                "chunk 1: the header cannot be read ({e}): damaged, modified or not a recording"
            ));
            return report;
        }
    };
    // chunked recordings: the seals cover the bytes as written, no chunk needs opening
    reader.seals_only();
    let meta = reader.meta().clone();
    let start_ms = meta.start_ms;
    let when = |ts_us: u64| {
        format!(
            "{} into the session, {}",
            offset(ts_us),
            utc(start_ms.saturating_add(ts_us / 1000))
        )
    };
    report.meta = Some(meta.clone());
    let encrypted = reader.encrypted_with();
    if !reader.sealed() {
        // still read it through, so that damage shows
        let mut n = 0u64;
        loop {
            match reader.next_record() {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(e) => {
                    report.problems.push(format!("record {}: {e}", n + 1));
                    return report;
                }
            }
        }
        report.status = Status::Unsealed;
        report.summary =
            "written before recordings were sealed: it has no seals or signature to check".into();
        return report;
    }

    let mut st = State {
        problems: Vec::new(),
        more: 0,
    };
    // chunk numbers come from the file, so a forged one can be u64::MAX: sums on them saturate
    let mut max_chunk = 0u64; // largest chunk number seen
    let mut prev_chunk = 0u64; // the chunk number of the seal before, in file order
    let mut last_stored = [0u8; 32];
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let mut records_since_seal = 0u64;
    let mut close: Option<String> = None;
    let mut close_chunk = 0u64;
    let mut trailer = None;
    let mut after_trailer = 0u64;
    let mut read_error = None;
    loop {
        let item = match reader.next_item() {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => {
                read_error = Some(e);
                break;
            }
        };
        if trailer.is_some() {
            after_trailer += 1;
            continue;
        }
        match item {
            Item::Record(rec) => {
                records_since_seal += 1;
                if let Record::Close { summary, .. } = rec {
                    close = Some(summary.reason);
                    close_chunk = max_chunk.saturating_add(1);
                }
            }
            Item::Seal(seal) => {
                records_since_seal = 0;
                let n = seal.chunk;
                if max_chunk.checked_add(1) == Some(n) {
                    if prev_chunk.saturating_add(1) == n && seal.computed != seal.stored {
                        st.problem(format!(
                            "chunk {n} (up to {}) was modified: its content does not match its seal",
                            when(seal.ts_us)
                        ));
                    }
                    max_chunk = n;
                    report.chunks += 1;
                    report.last_ts_us = seal.ts_us;
                } else if max_chunk.checked_add(1).is_some_and(|next| n > next) {
                    let (a, b) = (max_chunk.saturating_add(1), n - 1);
                    st.problem(format!(
                        "chunk {n} found where chunk {a} was expected (after {})",
                        when(report.last_ts_us)
                    ));
                    gaps.push((a, b));
                    max_chunk = n;
                    report.chunks += 1;
                    report.last_ts_us = seal.ts_us;
                } else if let Some(i) = gaps.iter().position(|&(a, b)| a <= n && n <= b) {
                    let (a, b) = gaps.remove(i);
                    if a < n {
                        gaps.push((a, n - 1));
                    }
                    if n < b {
                        gaps.push((n + 1, b));
                    }
                    st.problem(format!(
                        "chunk {n} is out of order (it follows chunk {prev_chunk}): chunks were reordered"
                    ));
                    report.chunks += 1;
                } else {
                    st.problem(format!(
                        "chunk {n} appears again (after chunk {prev_chunk}): a chunk was duplicated"
                    ));
                }
                prev_chunk = n;
                last_stored = seal.stored;
            }
            // a chunk not opened (encrypted, or any chunk of format version 5): like records,
            // its seal must follow
            Item::Encrypted(_) => records_since_seal += 1,
            Item::Trailer(t) => trailer = Some(t),
            Item::Bad(kind, why) => st.problem(format!(
                "after chunk {prev_chunk}: record {kind:#04x} is malformed ({why})"
            )),
        }
    }
    gaps.sort();
    for (a, b) in gaps {
        st.problem(if a == b {
            format!("chunk {a} is missing")
        } else {
            format!("chunks {a}..{b} are missing")
        });
    }
    let last = format!("chunk {max_chunk} ({})", when(report.last_ts_us));
    // how the stream ended
    let mut truncated = false;
    let mut length_changed = false;
    if let Some(e) = read_error {
        st.problem(format!(
            "chunk {} is damaged or modified ({e}); nothing after {last} can be checked",
            max_chunk.saturating_add(1)
        ));
    } else if let Some(d) = reader.damage() {
        // a cut that still ends with this recording's trailer, signed by the key, is a changed
        // length, not a crash (no trailer naming this recording exists before it is written)
        let changed = reader.trailer_after_cut().filter(|t| {
            t.session_id == meta.session_id
                && t.recording_id == meta.recording_id
                && key.is_some_and(|k| t.signed_by(k))
        });
        if let (Some(t), None) = (changed, &trailer) {
            st.problem(format!(
                "chunk {} is damaged or modified: it reads as cut short ({d}), yet the file ends with the recording's trailer (naming {} chunks): a record's length or kind was changed; nothing after {last} can be checked",
                max_chunk.saturating_add(1),
                t.chunks
            ));
            length_changed = true;
        } else if reader.damage_is_cut() && trailer.is_none() {
            truncated = true;
        } else {
            st.problem(format!(
                "chunk {} is damaged or modified: it cannot be read ({d}); nothing after {last} can be checked",
                max_chunk.saturating_add(1)
            ));
        }
    }
    if after_trailer > 0 {
        st.problem(format!(
            "{after_trailer} record(s) follow the trailer: appended after the recording was signed"
        ));
    }
    match &trailer {
        // said above; the trailer past the cut cannot be checked against chunks not read
        None if length_changed => {}
        None => {
            if records_since_seal > 0 && !truncated {
                st.problem(format!(
                    "{records_since_seal} record(s) after {last} carry no seal: appended or modified"
                ));
            }
            if close.is_some() && !truncated && reader.damage().is_none() {
                st.problem(format!(
                    "trailer missing: the recording ends with its CLOSE in {last} but has no signed trailer (removed?)"
                ));
            } else {
                truncated = true;
            }
        }
        Some(t) => {
            if records_since_seal > 0 {
                st.problem(format!(
                    "{records_since_seal} record(s) after {last} carry no seal before the trailer: inserted after the recording was signed"
                ));
            }
            if t.chunks != max_chunk || t.chunks != report.chunks {
                st.problem(format!(
                    "the trailer names {} chunks, the recording has {} (up to chunk {max_chunk}): chunks are missing or were added",
                    t.chunks, report.chunks
                ));
            }
            if t.final_hash != last_stored {
                st.problem(format!(
                    "the trailer's hash is not the seal of the last chunk ({max_chunk}): the end of the recording was changed"
                ));
            }
            if t.session_id != meta.session_id || t.recording_id != meta.recording_id {
                st.problem(format!(
                    "the trailer names session {} / recording {}, the header session {} / recording {}",
                    t.session_id, t.recording_id, meta.session_id, meta.recording_id
                ));
            }
            if t.recording_id != id {
                st.problem(format!(
                    "the trailer names recording {}, but the file is {id}: renamed or swapped",
                    t.recording_id
                ));
            }
            match key {
                Some(k) if t.key_id != k.key_id() => st.problem(format!(
                    "the trailer is signed by key {}, not by the given key {}",
                    t.key_id,
                    k.key_id()
                )),
                Some(k) if !t.signed_by(k) => st
                    .problem("the trailer's signature is invalid: the trailer was modified".into()),
                Some(_) => {}
                None => st.problem("no public key given: the signature was not checked".into()),
            }
            if t.complete && close.is_none() {
                st.problem(
                    "the trailer says the session closed, but there is no CLOSE record".into(),
                );
            }
            if close.is_some() && close_chunk != max_chunk {
                st.problem(format!(
                    "the CLOSE record is in chunk {close_chunk}, not in the last chunk ({max_chunk})"
                ));
            }
        }
    }
    if st.more > 0 {
        st.problems.push(format!("… and {} more", st.more));
    }
    report.problems = st.problems;
    let key_name = trailer.as_ref().map(|t| t.key_id.to_string());
    if !report.problems.is_empty() {
        report.status = Status::Failed;
        report.summary = format!("{} problem(s)", report.problems.len());
        if truncated {
            report
                .summary
                .push_str(&format!("; and truncated after {last}, signature missing"));
        }
    } else if truncated {
        report.status = Status::Truncated;
        report.summary = format!("truncated after {last}, signature missing");
    } else if let Some(t) = trailer.as_ref().filter(|t| !t.complete) {
        report.status = Status::Truncated;
        report.summary = format!(
            "truncated after {last}: the recorder closed it ({}), the chunks up to there are signed by key {}",
            close.as_deref().unwrap_or("no reason"),
            t.key_id
        );
    } else {
        report.status = Status::Ok;
        report.summary = format!(
            "{max_chunk} chunks, {}, session {} ({}), signed by key {}",
            offset(report.last_ts_us),
            meta.session_id,
            close.as_deref().unwrap_or(""),
            key_name.unwrap_or_default()
        );
        if let Some(k) = encrypted {
            report
                .summary
                .push_str(&format!(", encrypted with recording key {k}"));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{frame_spans, ChainHash, RecordingWriter};
    use crate::{CloseSummary, Direction};
    use bytes::Bytes;
    use psm_evidence::EvidenceKey;

    fn meta() -> RecordingMeta {
        RecordingMeta {
            protocol: String::new(),
            recording_id: "rec-1".into(),
            session_id: "s1".into(),
            user: "alice".into(),
            target: "db1".into(),
            account: "root".into(),
            source: "10.0.0.1:5555".into(),
            start_ms: 1_796_256_000_000,
        }
    }

    fn data(ts_us: u64, text: &str) -> Record {
        Record::Data {
            ts_us,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from(text.as_bytes().to_vec()),
        }
    }

    fn close(ts_us: u64) -> Record {
        Record::Close {
            ts_us,
            summary: CloseSummary {
                end_ms: 1_796_256_009_000,
                exit_status: Some(0),
                exit_signal: None,
                reason: "client closed".into(),
            },
        }
    }

    /// Format version 5: the header, 5 data chunks, a chunk with CLOSE, then the trailer.
    fn recording(key: &EvidenceKey, signed: Option<bool>) -> Vec<u8> {
        recording_with(key, signed, ChainHash::Blake3)
    }

    /// Format version 5 with BLAKE3 seals, version 1 with SHA-256 ones.
    fn recording_with(key: &EvidenceKey, signed: Option<bool>, hash: ChainHash) -> Vec<u8> {
        let w = RecordingWriter::with_hash(Vec::new(), &meta(), None, hash).expect("new");
        write_recording(w, key, signed)
    }

    /// Format version 3: a header chunk, 5 data chunks, a chunk with CLOSE, then the
    /// trailer's frame.
    fn recording_v3(key: &EvidenceKey, signed: Option<bool>) -> Vec<u8> {
        let w = RecordingWriter::new_stream(Vec::new(), &meta()).expect("new");
        write_recording(w, key, signed)
    }

    fn write_recording(
        mut w: RecordingWriter<Vec<u8>>,
        key: &EvidenceKey,
        signed: Option<bool>,
    ) -> Vec<u8> {
        w.flush().expect("flush");
        for i in 1..=5u64 {
            w.write(&data(i * 1_000_000, &format!("line {i}\r\n").repeat(50)))
                .expect("write");
            w.flush().expect("flush");
        }
        w.write(&close(6_000_000)).expect("close");
        match signed {
            Some(complete) => w.finish_signed(key, complete).expect("finish"),
            None => w.finish().expect("finish"),
        }
    }

    /// Both layouts written today and read: (name, the recording, the index in its
    /// `frame_spans` of chunk 1). Version 3's first chunk holds the header; version 5's header
    /// is a span of its own before chunk 1, which is the header's seal alone.
    fn both(key: &EvidenceKey, signed: Option<bool>) -> [(&'static str, Vec<u8>, usize); 2] {
        [
            ("v5", recording(key, signed), 1),
            ("v3", recording_v3(key, signed), 0),
        ]
    }

    /// The span of chunk `n` (from 1) of a recording whose chunk 1 is at span `first`.
    fn chunk_of(first: usize, n: usize) -> usize {
        first + n - 1
    }

    fn check(bytes: &[u8], key: &EvidenceKey) -> Report {
        verify(bytes, "rec-1", Some(key.public()))
    }

    fn splice(bytes: &[u8], spans: &[std::ops::Range<usize>], order: &[usize]) -> Vec<u8> {
        let mut out = bytes[..spans[0].start].to_vec();
        for &i in order {
            out.extend_from_slice(&bytes[spans[i].clone()]);
        }
        out
    }

    #[test]
    fn untouched_is_ok_and_replays() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, first) in both(&key, Some(true)) {
            let rep = check(&bytes, &key);
            assert!(rep.ok(), "{name}: {rep}");
            // the header's chunk and 6 more
            assert_eq!(rep.chunks, 7, "{name}");
            assert!(
                rep.to_string().starts_with("rec-1: OK: 7 chunks"),
                "{name}: {rep}"
            );
            assert_eq!(frame_spans(&bytes).len(), 8 + first, "{name}");
            let mut r = RecordingReader::open(&bytes[..]).expect("open");
            let mut n = 0;
            while r.next_record().expect("record").is_some() {
                n += 1;
            }
            assert_eq!(n, 6, "{name}");
            assert!(!r.truncated(), "{name}");
        }
    }

    /// The content-checksum bit of each zstd frame in `bytes` (found by its magic number).
    fn zstd_checksum_bits(bytes: &[u8]) -> Vec<bool> {
        const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
        bytes
            .windows(5)
            .filter(|w| w[..4] == ZSTD_MAGIC)
            .map(|w| w[4] & 0x04 != 0)
            .collect()
    }

    /// The writer leaves zstd's content checksum out (the seals cover every byte); recordings
    /// written with it, as psm-recorder wrote them before, still read, verify and show
    /// tampering.
    #[test]
    fn frames_with_or_without_a_zstd_checksum_read_and_verify() {
        let (key, _) = EvidenceKey::generate().expect("key");
        let today = recording(&key, Some(true));
        let bits = zstd_checksum_bits(&today);
        assert_eq!(
            bits.len(),
            5,
            "a zstd frame in each of the 5 chunks of data"
        );
        assert!(bits.iter().all(|b| !b), "{bits:?}");
        let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("new");
        w.with_zstd_checksum();
        let before = write_recording(w, &key, Some(true));
        let bits = zstd_checksum_bits(&before);
        assert_eq!(bits.len(), 5);
        assert!(bits.iter().all(|b| *b), "{bits:?}");
        for (name, bytes) in [("without", &today), ("with", &before)] {
            let rep = check(bytes, &key);
            assert!(rep.ok(), "{name}: {rep}");
            assert_eq!(rep.chunks, 7, "{name}");
            let mut r = RecordingReader::open(&bytes[..]).expect("open");
            let mut texts = Vec::new();
            while let Some(rec) = r.next_record().expect("record") {
                if let Record::Data { data, .. } = rec {
                    texts.push(String::from_utf8(data.to_vec()).expect("utf-8"));
                }
            }
            assert_eq!(texts.len(), 5, "{name}");
            assert_eq!(texts[2], "line 3\r\n".repeat(50), "{name}");
            assert!(!r.truncated(), "{name}");
            let mut b = bytes.clone();
            // one character of the text in the third data chunk's zstd frame (a literal: "line 3"
            // becomes "line 2", and the frame still decodes)
            let at = b
                .windows(6)
                .position(|w| w == b"line 3")
                .expect("the literal in its frame")
                + 5;
            b[at] ^= 0x01;
            let rep = check(&b, &key);
            assert_eq!(rep.status, Status::Failed, "{name}: {rep}");
            // and replay, export and the search index (the reader) stop there with an error:
            // the chunks before it come out intact
            let mut r = RecordingReader::open(&b[..]).expect("open");
            let mut got = Vec::new();
            let err = loop {
                match r.next_record() {
                    Ok(Some(Record::Data { data, .. })) => got.push(data),
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("{name}: read to the end: {got:?}"),
                    Err(e) => break e.to_string(),
                }
            };
            assert!(got.len() < 5, "{name}: {got:?}");
            for (i, data) in got.iter().enumerate().take(got.len().saturating_sub(1)) {
                assert_eq!(data[..], *texts[i].as_bytes(), "{name}: record {i}");
            }
            if name == "without" {
                // the altered chunk decodes (its record came out changed), its seal does not match
                assert_eq!(got.len(), 3, "{name}: {got:?}");
                assert_ne!(got[2][..], *texts[2].as_bytes());
                assert!(
                    err.contains("chunk 4 does not match its seal"),
                    "{name}: {err}"
                );
            }
        }
    }

    #[test]
    fn sha256_recordings_of_format_version_1_still_verify_and_show_tampering() {
        let (key, _) = EvidenceKey::generate().expect("key");
        let old = recording_with(&key, Some(true), ChainHash::Sha256);
        assert!(old.starts_with(crate::file::MAGIC));
        let rep = check(&old, &key);
        assert!(rep.ok(), "{rep}");
        assert_eq!(rep.chunks, 7);
        let spans = frame_spans(&old);
        let mut b = old.clone();
        b[(spans[3].start + spans[3].end) / 2] ^= 0x01;
        let rep = check(&b, &key);
        assert_eq!(rep.status, Status::Failed);
        assert!(rep.to_string().contains("chunk 4"), "{rep}");
        // the hash and the layout are the magic's: relabelling a version as another fails
        for new in [recording(&key, Some(true)), recording_v3(&key, Some(true))] {
            let mut relabelled = new.clone();
            relabelled[..8].copy_from_slice(crate::file::MAGIC);
            assert_eq!(check(&relabelled, &key).status, Status::Failed);
        }
        for magic in [crate::file::MAGIC_BLAKE3, crate::file::MAGIC_CHUNKED] {
            let mut relabelled = old.clone();
            relabelled[..8].copy_from_slice(magic);
            assert_eq!(check(&relabelled, &key).status, Status::Failed);
        }
        let mut relabelled = recording(&key, Some(true));
        relabelled[..8].copy_from_slice(crate::file::MAGIC_BLAKE3);
        assert_eq!(check(&relabelled, &key).status, Status::Failed);
    }

    #[test]
    fn another_key_or_no_key_is_not_ok() {
        let (key, _) = EvidenceKey::generate().expect("key");
        let (other, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, _) in both(&key, Some(true)) {
            let rep = check(&bytes, &other);
            assert_eq!(rep.status, Status::Failed, "{name}");
            assert!(
                rep.to_string().contains("not by the given key"),
                "{name}: {rep}"
            );
            let rep = verify(&bytes[..], "rec-1", None);
            assert_eq!(rep.status, Status::Failed, "{name}: {rep}");
            let rep = verify(&bytes[..], "rec-2", Some(key.public()));
            assert!(
                rep.to_string().contains("renamed or swapped"),
                "{name}: {rep}"
            );
        }
    }

    fn records(bytes: &[u8]) -> Vec<Record> {
        let mut out = Vec::new();
        if let Ok(mut r) = RecordingReader::open(bytes) {
            while let Ok(Some(rec)) = r.next_record() {
                out.push(rec);
            }
        }
        out
    }

    #[test]
    fn every_flipped_byte_is_caught_or_harmless() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, _) in both(&key, Some(true)) {
            let original = records(&bytes);
            for at in 0..bytes.len() {
                let mut b = bytes.clone();
                b[at] ^= 0x20;
                let rep = check(&b, &key);
                // Version 3: a few bits of zstd's framing (the window size, say) do not change
                // what decodes: the evidence is the decompressed content, and that must be
                // unchanged then. A flipped block size can make the rest of the file look like
                // a frame cut short: that reads as truncated, never as OK. Version 5 seals the
                // bytes as written: no flipped byte may read as OK.
                // Nor may one read as truncated: a length changed so that the file reads as
                // cut still ends with the trailer.
                if name == "v5" {
                    assert_eq!(rep.status, Status::Failed, "byte {at} flipped: {rep}");
                }
                if rep.status == Status::Ok {
                    assert_eq!(name, "v3", "byte {at} flipped unnoticed");
                    assert_eq!(
                        records(&b),
                        original,
                        "{name} byte {at}: content changed unnoticed"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flipped_byte_in_a_chunk_names_it() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, first) in both(&key, Some(true)) {
            let spans = frame_spans(&bytes);
            let mut b = bytes.clone();
            // version 3: inside the frame; version 5: inside the CHUNK record's frame (the
            // middle of the span may be the seal's head, whose damage reads as a cut)
            let span = &spans[chunk_of(first, 4)];
            let at = if first == 0 {
                (span.start + span.end) / 2
            } else {
                span.start + 8
            };
            b[at] ^= 0x01;
            let rep = check(&b, &key);
            assert_eq!(rep.status, Status::Failed, "{name}");
            assert!(rep.to_string().contains("chunk 4"), "{name}: {rep}");
        }
    }

    #[test]
    fn dropped_chunk_is_missing() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, first) in both(&key, Some(true)) {
            let spans = frame_spans(&bytes);
            let order: Vec<usize> = (0..spans.len())
                .filter(|&i| i != chunk_of(first, 4))
                .collect();
            let b = splice(&bytes, &spans, &order);
            let rep = check(&b, &key);
            let text = rep.to_string();
            assert_eq!(rep.status, Status::Failed, "{name}: {text}");
            assert!(
                text.contains("chunk 5 found where chunk 4 was expected"),
                "{name}: {text}"
            );
            assert!(text.contains("chunk 4 is missing"), "{name}: {text}");
            assert!(
                text.contains("the trailer names 7 chunks"),
                "{name}: {text}"
            );
        }
    }

    #[test]
    fn swapped_chunks_are_reordered() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, first) in both(&key, Some(true)) {
            let spans = frame_spans(&bytes);
            let mut order: Vec<usize> = (0..spans.len()).collect();
            order.swap(chunk_of(first, 3), chunk_of(first, 4));
            let b = splice(&bytes, &spans, &order);
            let rep = check(&b, &key);
            let text = rep.to_string();
            assert_eq!(rep.status, Status::Failed, "{name}: {text}");
            assert!(text.contains("chunk 3 is out of order"), "{name}: {text}");
            assert!(!text.contains("missing"), "{name}: {text}");
        }
    }

    #[test]
    fn a_modified_chunk_with_a_fresh_frame_is_caught_by_its_seal() {
        let (key, _) = EvidenceKey::generate().expect("key");
        // version 3: chunk 3 holds "line 2"; recompress it with one byte of its content
        // changed (what a forger would do)
        let bytes = recording_v3(&key, Some(true));
        let spans = frame_spans(&bytes);
        let plain = zstd::decode_all(&bytes[spans[2].clone()]).expect("decode");
        let mut changed = plain.clone();
        let at = plain.windows(6).position(|w| w == b"line 2").expect("text");
        changed[at + 5] = b'9';
        let forged = zstd::encode_all(&changed[..], 3).expect("encode");
        let mut b = bytes[..spans[2].start].to_vec();
        b.extend_from_slice(&forged);
        b.extend_from_slice(&bytes[spans[2].end..]);
        let rep = check(&b, &key);
        let text = rep.to_string();
        assert!(
            text.contains("chunk 3 (up to 0:00:02.000 into the session"),
            "{text}"
        );
        assert!(text.contains("was modified"), "{text}");
        // version 5: chunk 3 holds "line 2" in its CHUNK record (5-byte head, then the frame),
        // followed by its SEAL; the forger rewrites the record with a frame of its own
        let bytes = recording(&key, Some(true));
        let spans = frame_spans(&bytes);
        let unit = &bytes[spans[3].clone()];
        assert_eq!(unit[0], 0x05, "a CHUNK record");
        let len = u32::from_be_bytes(unit[1..5].try_into().expect("4 bytes")) as usize;
        let plain = zstd::decode_all(&unit[5..5 + len]).expect("decode");
        let mut changed = plain.clone();
        let at = plain.windows(6).position(|w| w == b"line 2").expect("text");
        changed[at + 5] = b'9';
        let forged = zstd::encode_all(&changed[..], 3).expect("encode");
        let mut b = bytes[..spans[3].start].to_vec();
        b.push(0x05);
        b.extend_from_slice(&(forged.len() as u32).to_be_bytes());
        b.extend_from_slice(&forged);
        b.extend_from_slice(&unit[5 + len..]);
        b.extend_from_slice(&bytes[spans[3].end..]);
        let rep = check(&b, &key);
        let text = rep.to_string();
        assert!(
            text.contains("chunk 3 (up to 0:00:02.000 into the session"),
            "{text}"
        );
        assert!(text.contains("was modified"), "{text}");
        let replayed = records(&b);
        assert!(
            replayed
                .iter()
                .any(|r| matches!(r, Record::Data { data, .. } if data.starts_with(b"line 9"))),
            "the forged chunk still replays (verification is what tells)"
        );
    }

    #[test]
    fn a_record_inserted_before_the_trailer_is_caught() {
        let (key, _) = EvidenceKey::generate().expect("key");
        // a DATA record of its own, in a zstd frame slipped in before the trailer's frame
        let mut plain = vec![0x02];
        let text = b"rm -rf / # never typed\r\n";
        plain.extend_from_slice(&((13 + text.len()) as u32).to_be_bytes());
        plain.extend_from_slice(&6_500_000u64.to_be_bytes());
        plain.extend_from_slice(&0u32.to_be_bytes());
        plain.push(1);
        plain.extend_from_slice(text);
        let frame = zstd::encode_all(&plain[..], 3).expect("encode");
        for (name, bytes) in [
            ("v3", recording_v3(&key, Some(true))),
            ("v1", recording_with(&key, Some(true), ChainHash::Sha256)),
        ] {
            let spans = frame_spans(&bytes);
            let trailer = spans.last().expect("spans").clone();
            let mut b = bytes[..trailer.start].to_vec();
            b.extend_from_slice(&frame);
            b.extend_from_slice(&bytes[trailer]);
            assert!(
                records(&b)
                    .iter()
                    .any(|r| matches!(r, Record::Data { data, .. } if data.starts_with(b"rm -rf"))),
                "{name}: the inserted record replays (verification is what tells)"
            );
            let rep = check(&b, &key);
            assert_eq!(rep.status, Status::Failed, "{name}: {rep}");
            assert!(
                rep.to_string()
                    .contains("inserted after the recording was signed"),
                "{name}: {rep}"
            );
        }
    }

    #[test]
    fn cut_anywhere_is_truncated_and_replays_to_there() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, first) in both(&key, Some(true)) {
            let spans = frame_spans(&bytes);
            // at a chunk's end: chunk 5 holds "line 4" (4 s into the session)
            let rep = check(&bytes[..spans[chunk_of(first, 5)].end], &key);
            assert_eq!(rep.status, Status::Truncated, "{name}: {rep}");
            let want = "truncated after chunk 5 (0:00:04.000 into the session, 2026-12-03T00:00:04.000Z), signature missing";
            assert!(rep.summary.starts_with(want), "{name}: {rep}");
            // inside one
            for cut in (spans[1].start + 1..spans[6].end).step_by(7) {
                let rep = check(&bytes[..cut], &key);
                assert_eq!(rep.status, Status::Truncated, "{name} cut {cut}: {rep}");
                assert!(rep.summary.contains("signature missing"), "{name}: {rep}");
            }
        }
    }

    /// Version 5's chunk 4 with its CHUNK record's length set to `len`.
    fn with_chunk_length(bytes: &[u8], len: usize) -> Vec<u8> {
        let spans = frame_spans(bytes);
        let at = spans[chunk_of(1, 4)].start;
        assert_eq!(bytes[at], crate::file::KIND_CHUNK);
        let mut b = bytes.to_vec();
        b[at + 1..at + 5].copy_from_slice(&(len as u32).to_be_bytes());
        b
    }

    fn assert_length_changed(b: &[u8], key: &EvidenceKey, what: &str) {
        let rep = check(b, key);
        let text = rep.to_string();
        assert_eq!(rep.status, Status::Failed, "{what}: {text}");
        assert!(
            text.contains("yet the file ends with the recording's trailer (naming 7 chunks): a record's length or kind was changed"),
            "{what}: {text}"
        );
        assert!(!text.contains("signature missing"), "{what}: {text}");
    }

    /// A recording whose trailer is `donor`'s.
    fn with_trailer_of(bytes: &[u8], donor: &[u8]) -> Vec<u8> {
        let mut b = bytes[..frame_spans(bytes).last().expect("trailer").start].to_vec();
        b.extend_from_slice(&donor[frame_spans(donor).last().expect("trailer").clone()]);
        b
    }

    /// Bytes zstd cannot compress.
    fn noise(n: usize) -> String {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'!' + (x % 94) as u8)
            })
            .collect()
    }

    #[test]
    fn a_changed_length_that_makes_a_cut_is_failed_not_truncated() {
        let (key, _) = EvidenceKey::generate().expect("key");
        let bytes = recording(&key, Some(true));
        let spans = frame_spans(&bytes);
        let chunk = spans[chunk_of(1, 4)].clone();
        let trailer = spans.last().expect("trailer").start;
        // past the end of the file
        assert_length_changed(&with_chunk_length(&bytes, 1 << 20), &key, "past the end");
        // exactly to the end: the chunks, seals and trailer after it read as its body
        let to_end = bytes.len() - chunk.start - 5;
        assert_length_changed(&with_chunk_length(&bytes, to_end), &key, "to the end");
        // the trailer's own head: its length, or its kind (an optional record's, a chunk's),
        // alone or with a length before it
        let set_head = |b: &[u8], kind: u8, len: usize| {
            let mut b = b.to_vec();
            b[trailer] = kind;
            b[trailer + 1..trailer + 5].copy_from_slice(&(len as u32).to_be_bytes());
            b
        };
        let own = bytes.len() - trailer - 5;
        for (kind, len) in [
            (0x81, 1 << 16),
            (0x81, 0x7fff),
            (0x81, own + 1),
            (0x90, own),
            (crate::file::KIND_CHUNK, own),
        ] {
            let what = format!("the trailer's head {kind:#04x} {len}");
            assert_length_changed(&set_head(&bytes, kind, len), &key, &what);
            let twice = with_chunk_length(&set_head(&bytes, kind, len), 1 << 20);
            assert_length_changed(&twice, &key, &format!("{what}, and chunk 4's"));
        }
        // every length longer than the chunk's, up to past the end: never truncated (ending a
        // record inside the trailer, say, can make it read as malformed instead)
        let own = u32::from_be_bytes(
            bytes[chunk.start + 1..chunk.start + 5]
                .try_into()
                .expect("four bytes"),
        );
        for len in own as usize + 1..=to_end + 64 {
            let b = with_chunk_length(&bytes, len);
            if len >= to_end {
                assert_length_changed(&b, &key, &format!("length {len}"));
            }
            let rep = check(&b, &key);
            assert_eq!(rep.status, Status::Failed, "length {len}: {rep}");
        }
        // a trailer of another recording, or of another session, signed by the same key, is no
        // proof of this one's end
        for (session, recording) in [("s1", "rec-2"), ("s2", "rec-1")] {
            let mut other = meta();
            other.session_id = session.into();
            other.recording_id = recording.into();
            let w = RecordingWriter::with_hash(Vec::new(), &other, None, ChainHash::Blake3)
                .expect("new");
            let donor = write_recording(w, &key, Some(true));
            let b = with_trailer_of(&bytes, &donor);
            assert!(!check(&b, &key).ok());
            let rep = check(&with_chunk_length(&b, 1 << 20), &key);
            assert_eq!(
                rep.status,
                Status::Truncated,
                "{session} {recording}: {rep}"
            );
        }
        // nor is one signed by another key, or a recording checked without a key
        let (other, _) = EvidenceKey::generate().expect("key");
        let rep = check(&with_chunk_length(&bytes, 1 << 20), &other);
        assert_eq!(rep.status, Status::Truncated, "{rep}");
        let rep = verify(&with_chunk_length(&bytes, 1 << 20)[..], "rec-1", None);
        assert_eq!(rep.status, Status::Truncated, "{rep}");
        // a real cut anywhere before the trailer's last byte still reads as truncated (at the
        // trailer's start, the trailer is missing: another test)
        for cut in (chunk.start..bytes.len()).filter(|&c| c != trailer) {
            let rep = check(&bytes[..cut], &key);
            assert_eq!(rep.status, Status::Truncated, "cut {cut}: {rep}");
        }
    }

    #[test]
    fn a_changed_length_is_found_after_chunks_larger_than_what_the_reader_keeps() {
        let (key, _) = EvidenceKey::generate().expect("key");
        let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("new");
        w.flush().expect("flush");
        for i in 1..=5u64 {
            // 64 KiB that do not compress in chunks 3 and 5, so that the reader's window of the
            // file's end has moved on many times over
            let text = if i % 2 == 0 {
                noise(64 * 1024)
            } else {
                format!("line {i}\r\n")
            };
            w.write(&data(i * 1_000_000, &text)).expect("write");
            w.flush().expect("flush");
        }
        w.write(&close(6_000_000)).expect("close");
        let bytes = w.finish_signed(&key, true).expect("finish");
        assert!(bytes.len() > 96 * 1024, "{}", bytes.len());
        assert!(check(&bytes, &key).ok());
        assert_length_changed(&with_chunk_length(&bytes, 1 << 20), &key, "past the end");
    }

    #[test]
    fn removed_trailer_is_missing_not_truncated() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, first) in both(&key, Some(true)) {
            let spans = frame_spans(&bytes);
            let rep = check(&bytes[..spans[chunk_of(first, 7)].end], &key);
            assert_eq!(rep.status, Status::Failed, "{name}: {rep}");
            assert!(rep.to_string().contains("trailer missing"), "{name}: {rep}");
        }
        // an unsigned writer's output reads the same way
        for (name, bytes, _) in both(&key, None) {
            let rep = check(&bytes, &key);
            assert!(rep.to_string().contains("trailer missing"), "{name}: {rep}");
        }
    }

    #[test]
    fn recorder_closed_is_truncated_but_signed() {
        let (key, _) = EvidenceKey::generate().expect("key");
        for (name, bytes, _) in both(&key, Some(false)) {
            let rep = check(&bytes, &key);
            assert_eq!(rep.status, Status::Truncated, "{name}: {rep}");
            assert!(
                rep.summary.contains(
                    "the recorder closed it (client closed), the chunks up to there are signed"
                ),
                "{name}: {rep}"
            );
        }
    }

    /// A chunked recording's clear header is sealed by the first flush (the recorder flushes
    /// when the session starts), before anything is recorded.
    #[test]
    fn a_chunked_header_is_sealed_at_the_first_flush() {
        let (key, _) = EvidenceKey::generate().expect("key");
        let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("new");
        w.flush().expect("flush");
        let bytes = w.get_ref().clone();
        let rep = check(&bytes, &key);
        assert_eq!(rep.status, Status::Truncated, "{rep}");
        assert!(rep.summary.starts_with("truncated after chunk 1"), "{rep}");
        // the user's name changed in the clear header: chunk 1's seal no longer matches
        let at = bytes.windows(5).position(|w| w == b"alice").expect("user");
        let mut b = bytes.clone();
        b[at] = b'A';
        let rep = check(&b, &key);
        assert_eq!(rep.status, Status::Failed, "{rep}");
        assert!(rep.to_string().contains("chunk 1"), "{rep}");
    }

    #[test]
    fn unsealed_recordings_are_said_so() {
        // version 3 says in its header whether it is sealed; clear the flag by rewriting the
        // first frame (version 5 is always sealed: the flag is not consulted)
        let (key, _) = EvidenceKey::generate().expect("key");
        let mut bytes = recording_v3(&key, Some(true));
        let spans = frame_spans(&bytes);
        let mut plain = zstd::decode_all(&bytes[spans[0].clone()]).expect("decode");
        plain[6] = 0;
        let first = zstd::encode_all(&plain[..], 3).expect("encode");
        let mut b = bytes[..spans[0].start].to_vec();
        b.extend_from_slice(&first);
        b.extend_from_slice(&bytes[spans[0].end..]);
        bytes = b;
        let rep = check(&bytes, &key);
        assert_eq!(rep.status, Status::Unsealed, "{rep}");
    }

    #[test]
    #[ignore = "writes the fuzz corpus seeds: cargo test -p psm-recorder-format -- --ignored write_corpus_seeds"]
    fn write_corpus_seeds() {
        let (key, _) = EvidenceKey::generate().expect("key");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/recording_read");
        // version 1 (SHA-256 seals) under the older names, version 3 (BLAKE3) as `blake3-*`,
        // version 5 as `chunked-*`
        type Make = fn(&EvidenceKey, Option<bool>) -> Vec<u8>;
        let versions: [(Make, &str); 3] = [
            (|k, s| recording_with(k, s, ChainHash::Sha256), "sealed"),
            (recording_v3, "blake3"),
            (recording, "chunked"),
        ];
        for (make, prefix) in versions {
            let signed = make(&key, Some(true));
            let spans = frame_spans(&signed);
            std::fs::write(dir.join(format!("{prefix}-signed.psmrec")), &signed).expect("write");
            let cut = &signed[..(spans[3].start + spans[3].end) / 2];
            std::fs::write(dir.join(format!("{prefix}-cut.psmrec")), cut).expect("write");
            let closed = make(&key, Some(false));
            let name = format!("{prefix}-recorder-closed.psmrec");
            std::fs::write(dir.join(name), closed).expect("write");
        }
    }
}
