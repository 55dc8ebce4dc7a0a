//! DATA records compressed before they reach psm-recorder: the relay's recorder link packs a
//! run of one stream's binary payloads (a file going through scp or sftp, RDP's PDUs) into one
//! zstd frame of the DATA records the writer would have made of them ([`Packer`]), and
//! psm-recorder checks that frame ([`Unpacker`]) and puts it into the chunk as it is
//! ([`RecordingWriter::append_packed`]).
//!
//! Why: psm-recorder otherwise receives every recorded byte through its socket (a copy into
//! the kernel on the relay's side, one out of it on the recorder's, and the wakes of both) only
//! to compress it. Compressed where the payloads already are (the buffers the relay's workers
//! decrypted them in), a GiB of zeros crosses the socket as a few hundred KiB
//! (perf/BENCHMARKS.md). Text is never packed: psm-recorder reads it for the search index, and
//! what [`looks_binary`] calls binary it would skip anyway, so the index is the same.
//!
//! The file does not change: a chunk is one or more concatenated zstd frames of records, and
//! readers decompress a chunk as one stream. The seal covers the chunk as written, packed
//! frames included, so a recording with packed frames verifies like any other.

use std::collections::HashMap;

use super::writer::{next_level, ZSTD_LEVEL};
use super::*;

/// Payloads shorter than this are not packed (a keystroke, its echo, a prompt).
pub const PACK_MIN: usize = 4096;
/// Record bytes one packed frame holds at most (below the chunk target, so that a packed frame
/// never makes a chunk larger than one the writer would have made).
pub const PACK_MAX: usize = 512 * 1024;

/// Whether bytes are not text: a NUL byte, or bytes that are not UTF-8 (a sequence cut at
/// either end does not count). Terminal output in a legacy 8-bit encoding counts as binary
/// too. Shorter than 256 bytes never counts (keystrokes, prompts). The search index does not
/// index such bytes, and the relay packs them.
pub fn looks_binary(data: &[u8]) -> bool {
    if data.len() < 256 {
        return false;
    }
    if data.contains(&0) {
        return true;
    }
    let cut = data
        .iter()
        .take(3)
        .take_while(|b| (**b & 0xC0) == 0x80)
        .count();
    match std::str::from_utf8(&data[cut..]) {
        Ok(_) => false,
        // `None`: only the end is an unfinished sequence
        Err(e) => e.error_len().is_some(),
    }
}

/// Whether a DATA payload is one the relay packs: binary, at least [`PACK_MIN`] bytes, and
/// one record (at most [`PACK_MAX`] bytes with its head).
pub fn packable(data: &[u8]) -> bool {
    data.len() >= PACK_MIN
        && RECORD_HEAD + DATA_PREFIX + data.len() <= PACK_MAX
        && looks_binary(data)
}

/// The record bytes a packed frame of `data` payloads holds (what `plain_len` is checked
/// against).
pub fn packed_len(data_len: usize, records: usize) -> usize {
    data_len + records * (RECORD_HEAD + DATA_PREFIX)
}

/// One DATA payload to pack.
pub struct Payload<'a> {
    /// Microseconds since the session started.
    pub ts_us: u64,
    /// Channel.
    pub channel: u32,
    /// Which way the bytes went.
    pub direction: Direction,
    /// The bytes.
    pub data: &'a [u8],
}

/// A packed run of DATA records.
pub struct Packed {
    /// Record bytes in the frame (heads included), as it decompresses.
    pub plain_len: u32,
    /// DATA payload bytes in it.
    pub data_len: u64,
    /// The largest timestamp in it.
    pub last_ts_us: u64,
    /// One zstd frame.
    pub frame: Vec<u8>,
}

/// Packs runs of DATA records into zstd frames, each stream at the level its data calls for
/// (as the writer adapts its own). One per relay link: one zstd context.
pub struct Packer {
    cctx: zstd::stream::raw::Encoder<'static>,
    level: i32,
    levels: HashMap<u64, i32>,
}

impl Packer {
    /// A packer with its zstd context.
    pub fn new() -> io::Result<Self> {
        let mut cctx = zstd::stream::raw::Encoder::new(ZSTD_LEVEL)?;
        // no content checksum, as the writer's own frames (the seals cover every byte)
        cctx.set_parameter(CParameter::ChecksumFlag(false))?;
        Ok(Packer {
            cctx,
            level: ZSTD_LEVEL,
            levels: HashMap::new(),
        })
    }

    /// Compresses `payloads` (of `stream`, in order) into one zstd frame of their DATA records,
    /// as [`RecordingWriter::write_data`] writes them. Each payload must be [`packable`]'s size
    /// and all of them together at most [`PACK_MAX`] record bytes.
    pub fn pack(&mut self, stream: u64, payloads: &[Payload<'_>]) -> io::Result<Packed> {
        let packed = self.pack_run(stream, payloads);
        if packed.is_err() {
            // a frame left half-made would refuse every later one (zstd takes no new size or
            // level mid-frame)
            let _ = self.cctx.reinit();
        }
        packed
    }

    fn pack_run(&mut self, stream: u64, payloads: &[Payload<'_>]) -> io::Result<Packed> {
        let data_len: usize = payloads.iter().map(|p| p.data.len()).sum();
        let plain = packed_len(data_len, payloads.len());
        if payloads.is_empty() || plain > PACK_MAX {
            return Err(io::Error::other(
                "a packed run must hold 1 to PACK_MAX record bytes",
            ));
        }
        let level = *self.levels.get(&stream).unwrap_or(&ZSTD_LEVEL);
        if level != self.level {
            self.cctx
                .set_parameter(CParameter::CompressionLevel(level))?;
            self.level = level;
        }
        // the size goes into the frame's header, which psm-recorder checks
        self.cctx.set_pledged_src_size(Some(plain as u64))?;
        let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(plain));
        let mut last_ts_us = 0;
        for p in payloads {
            last_ts_us = last_ts_us.max(p.ts_us);
            let head = data_head(p.ts_us, p.channel, p.direction, p.data.len());
            self.run(&head, &mut frame)?;
            self.run(p.data, &mut frame)?;
        }
        loop {
            let remaining = {
                let pos = frame.len();
                let mut out = OutBuffer::around_pos(&mut frame, pos);
                self.cctx.finish(&mut out, false)?
            };
            if remaining == 0 {
                break;
            }
            frame.reserve(remaining);
        }
        self.cctx.reinit()?;
        if frame.capacity() > 2 * frame.len() + 4096 {
            // what compressed well does not hold on to the bound it was given
            frame.shrink_to_fit();
        }
        let next = next_level(level, plain as u64, frame.len() as u64);
        if next == ZSTD_LEVEL {
            self.levels.remove(&stream);
        } else {
            self.levels.insert(stream, next);
        }
        Ok(Packed {
            plain_len: plain as u32,
            data_len: data_len as u64,
            last_ts_us,
            frame,
        })
    }

    /// The stream ended: its level is forgotten.
    pub fn forget(&mut self, stream: u64) {
        self.levels.remove(&stream);
    }

    fn run(&mut self, mut src: &[u8], frame: &mut Vec<u8>) -> io::Result<()> {
        while !src.is_empty() {
            let mut input = InBuffer::around(src);
            if frame.capacity() - frame.len() < 1024 {
                frame.reserve(frame.capacity().max(4096));
            }
            let pos = frame.len();
            let mut out = OutBuffer::around_pos(frame, pos);
            self.cctx.run(&mut input, &mut out)?;
            src = &src[input.pos()..];
        }
        Ok(())
    }
}

/// A DATA record's head and prefix: `[kind][u32 len][u64 ts_us][u32 channel][u8 direction]`.
pub(super) fn data_head(
    ts_us: u64,
    channel: u32,
    direction: Direction,
    len: usize,
) -> [u8; RECORD_HEAD + DATA_PREFIX] {
    let mut head = [0u8; RECORD_HEAD + DATA_PREFIX];
    head[0] = KIND_DATA;
    // callers keep a record below MAX_RECORD, which fits a u32
    head[1..5].copy_from_slice(&((DATA_PREFIX + len) as u32).to_be_bytes());
    head[5..13].copy_from_slice(&ts_us.to_be_bytes());
    head[13..17].copy_from_slice(&channel.to_be_bytes());
    head[17] = direction as u8;
    head
}

/// A packed frame psm-recorder checked ([`Unpacker::check`]): the only way to hand one to
/// [`RecordingWriter::append_packed`].
pub struct Checked<'a> {
    pub(super) plain_len: u32,
    pub(super) last_ts_us: u64,
    pub(super) frame: &'a [u8],
}

/// Checks packed frames as they come from the relay: each one is decompressed (into one reused
/// buffer of [`PACK_MAX`]) and must hold nothing but whole DATA records that end where the
/// frame says, with the payload bytes and the last time the frame claims. What does not is
/// refused before any of it reaches a recording, so a bad frame cannot make a chunk unreadable
/// or swallow the records after it. One per relay link.
pub struct Unpacker {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
}

impl Default for Unpacker {
    fn default() -> Self {
        Self::new()
    }
}

impl Unpacker {
    /// An unpacker; its zstd context and buffer are made at the first frame.
    pub fn new() -> Self {
        Unpacker {
            dctx: None,
            buf: Vec::new(),
        }
    }

    /// Checks `frame`, which the relay says holds `plain_len` record bytes of `data_len`
    /// payload bytes, the last at `last_ts_us`.
    pub fn check<'a>(
        &mut self,
        plain_len: u32,
        data_len: u64,
        last_ts_us: u64,
        frame: &'a [u8],
    ) -> Result<Checked<'a>, FormatError> {
        let bad = |why: &str| FormatError::Malformed(format!("packed records: {why}"));
        let plain = plain_len as usize;
        if plain > PACK_MAX || plain == 0 {
            return Err(bad("size out of range"));
        }
        match zstd::zstd_safe::find_frame_compressed_size(frame) {
            Ok(n) if n == frame.len() => {}
            _ => return Err(bad("not exactly one zstd frame")),
        }
        // a chunk counts a packed frame by what it holds: a frame padded far beyond what its
        // content could need (empty blocks) would grow the chunk past what readers take
        if frame.len() > zstd::zstd_safe::compress_bound(plain) {
            return Err(bad("the frame is larger than its content could need"));
        }
        match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) if n == u64::from(plain_len) => {}
            _ => return Err(bad("the frame does not say it holds the size given")),
        }
        let dctx = match &mut self.dctx {
            Some(d) => d,
            None => {
                let mut d = zstd::bulk::Decompressor::new()?;
                d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
                self.buf = Vec::with_capacity(PACK_MAX);
                self.dctx.insert(d)
            }
        };
        self.buf.clear();
        match dctx.decompress_to_buffer(frame, &mut self.buf) {
            Ok(n) if n == plain => {}
            _ => return Err(bad("the frame does not decompress to the size given")),
        }
        let (payload, ts) = walk(&self.buf).map_err(bad)?;
        if payload != data_len {
            return Err(bad("the payload bytes are not those given"));
        }
        if ts != last_ts_us {
            return Err(bad("the last time is not the one given"));
        }
        Ok(Checked {
            plain_len,
            last_ts_us,
            frame,
        })
    }
}

/// Walks decompressed records: DATA only, whole, with a known direction; returns their payload
/// bytes and largest timestamp.
fn walk(mut rest: &[u8]) -> Result<(u64, u64), &'static str> {
    let (mut payload, mut ts) = (0u64, 0u64);
    while !rest.is_empty() {
        if rest.len() < RECORD_HEAD + DATA_PREFIX {
            return Err("a record is cut short");
        }
        if rest[0] != KIND_DATA {
            return Err("a record that is not DATA");
        }
        let len = be_u32(&rest[1..5]) as usize;
        if len < DATA_PREFIX || len > rest.len() - RECORD_HEAD {
            return Err("a record's length does not fit");
        }
        let (t, _, _) = data_prefix(&rest[RECORD_HEAD..RECORD_HEAD + len])
            .map_err(|_| "a record with an unknown direction")?;
        ts = ts.max(t);
        payload += (len - DATA_PREFIX) as u64;
        rest = &rest[RECORD_HEAD + len..];
    }
    Ok((payload, ts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::verify;
    use psm_evidence::EvidenceKey;

    fn meta() -> RecordingMeta {
        RecordingMeta {
            recording_id: "rec-1".into(),
            session_id: "s1".into(),
            user: "alice".into(),
            ..Default::default()
        }
    }

    fn data(ts_us: u64, channel: u32, bytes: Vec<u8>) -> Record {
        Record::Data {
            ts_us,
            channel,
            direction: Direction::Output,
            data: Bytes::from(bytes),
        }
    }

    /// A session: a prompt, a binary file in eleven payloads (zeros, then bytes that do not
    /// compress), a resize, a text listing, the file's last payload, its end.
    fn session() -> Vec<Record> {
        let mut noise = 0x2545_f491_4f6c_dd1du64;
        let mut random = |n: usize| {
            (0..n)
                .map(|_| {
                    noise ^= noise << 13;
                    noise ^= noise >> 7;
                    noise ^= noise << 17;
                    noise as u8
                })
                .collect::<Vec<u8>>()
        };
        let mut recs = vec![data(1, 0, b"$ scp file\r\n".to_vec())];
        for i in 0..6 {
            recs.push(data(10 + i, 0, vec![0u8; 32 * 1024]));
        }
        for i in 0..5 {
            recs.push(data(20 + i, 0, random(100_000)));
        }
        recs.push(Record::Resize {
            ts_us: 30,
            channel: 0,
            cols: 100,
            rows: 30,
        });
        recs.push(data(
            31,
            1,
            "a listing, line by line\n".repeat(400).into_bytes(),
        ));
        recs.push(data(32, 0, random(PACK_MIN)));
        recs.push(Record::Close {
            ts_us: 40,
            summary: CloseSummary {
                reason: "client closed".into(),
                ..Default::default()
            },
        });
        recs
    }

    /// Writes `recs` as psm-recorder does with what the relay's link sends: runs of packable
    /// payloads of one channel packed, everything else written as it is.
    fn write_packed(
        w: RecordingWriter<Vec<u8>>,
        recs: &[Record],
        ev: &EvidenceKey,
    ) -> (Vec<u8>, usize) {
        write_packed_flushing(w, recs, ev, &[])
    }

    /// As [`write_packed`], with a flush (a chunk's end, as psm-recorder's timer makes one)
    /// before each record whose index is in `flush_before`.
    fn write_packed_flushing(
        mut w: RecordingWriter<Vec<u8>>,
        recs: &[Record],
        ev: &EvidenceKey,
        flush_before: &[usize],
    ) -> (Vec<u8>, usize) {
        let mut packer = Packer::new().expect("packer");
        let mut unpacker = Unpacker::new();
        let mut run: Vec<&Record> = Vec::new();
        let mut packed = 0;
        let mut end_run = |w: &mut RecordingWriter<Vec<u8>>, run: &mut Vec<&Record>| {
            if run.is_empty() {
                return;
            }
            let payloads: Vec<Payload<'_>> = run
                .iter()
                .map(|r| match r {
                    Record::Data {
                        ts_us,
                        channel,
                        direction,
                        data,
                    } => Payload {
                        ts_us: *ts_us,
                        channel: *channel,
                        direction: *direction,
                        data,
                    },
                    _ => unreachable!(),
                })
                .collect();
            let p = packer.pack(1, &payloads).expect("pack");
            let checked = unpacker
                .check(p.plain_len, p.data_len, p.last_ts_us, &p.frame)
                .expect("checked");
            w.append_packed(checked).expect("append");
            packed += 1;
            run.clear();
        };
        for (i, r) in recs.iter().enumerate() {
            if flush_before.contains(&i) {
                end_run(&mut w, &mut run);
                w.flush().expect("flush");
            }
            match r {
                Record::Data { data, .. } if packable(data) => {
                    let plain: usize = run
                        .iter()
                        .map(|r| match r {
                            Record::Data { data, .. } => packed_len(data.len(), 1),
                            _ => 0,
                        })
                        .sum();
                    if plain + packed_len(data.len(), 1) > PACK_MAX {
                        end_run(&mut w, &mut run);
                    }
                    run.push(r);
                }
                _ => {
                    end_run(&mut w, &mut run);
                    w.write(r).expect("write");
                }
            }
        }
        end_run(&mut w, &mut run);
        (w.finish_signed(ev, true).expect("finish"), packed)
    }

    fn read_all(bytes: &[u8], key: Option<&crate::crypt::RecordingKey>) -> Vec<Record> {
        let mut r = RecordingReader::open_with_key(bytes, key).expect("open");
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().expect("record") {
            out.push(rec);
        }
        // complete when it has its CLOSE
        assert_eq!(
            r.truncated(),
            !matches!(out.last(), Some(Record::Close { .. }))
        );
        out
    }

    #[test]
    fn packed_runs_read_back_as_the_records_written_and_verify() {
        let (ev, _) = EvidenceKey::generate().expect("evidence key");
        let key = crate::crypt::RecordingKey::generate().expect("recording key");
        let recs = session();
        for encrypted in [false, true] {
            let k = encrypted.then_some(&key);
            let w = RecordingWriter::with_key(Vec::new(), &meta(), k).expect("writer");
            let (bytes, packed) = write_packed(w, &recs, &ev);
            // the zeros and three random payloads in one run (up to PACK_MAX), the other two in
            // a second, the last payload (after the resize) alone; the prompt and the listing
            // are not packed
            assert_eq!(packed, 3, "encrypted: {encrypted}");
            assert_eq!(read_all(&bytes, k), recs, "encrypted: {encrypted}");
            let rep = verify(&bytes[..], "rec-1", Some(ev.public()));
            assert!(rep.ok(), "{rep}");
            // the same records written one by one make a recording that reads the same
            let mut plain = RecordingWriter::with_key(Vec::new(), &meta(), k).expect("writer");
            for r in &recs {
                plain.write(r).expect("write");
            }
            let plain = plain.finish_signed(&ev, true).expect("finish");
            assert_eq!(read_all(&plain, k), recs);
        }
        // a packed chunk that was modified is caught by the reader and by verify
        let w = RecordingWriter::new(Vec::new(), &meta()).expect("writer");
        let (bytes, _) = write_packed(w, &recs, &ev);
        let mut b = bytes.clone();
        let at = bytes.len() / 2;
        b[at] ^= 0x20;
        assert!(!verify(&b[..], "rec-1", Some(ev.public())).ok());
        let mut r = RecordingReader::open(&b[..]).expect("open");
        let failed = loop {
            match r.next_record() {
                Ok(Some(_)) => continue,
                Ok(None) => break r.truncated(),
                Err(_) => break true,
            }
        };
        assert!(
            failed,
            "a flipped byte in the middle never reads back clean"
        );
    }

    #[test]
    fn packed_frames_across_many_chunks_and_flushes_read_back_in_both_formats() {
        let (ev, _) = EvidenceKey::generate().expect("evidence key");
        let key = crate::crypt::RecordingKey::generate().expect("recording key");
        // 3.5 MiB: zeros, text, random bytes, more zeros on another channel, keystrokes
        // between them; chunks end on size (1 MiB of records) and on flushes
        let mut recs = session();
        let close = recs.pop().expect("close");
        for i in 0..40u64 {
            recs.push(data(100 + i, 0, vec![0u8; 64 * 1024]));
            if i % 9 == 0 {
                recs.push(data(100 + i, 0, b"typed\r".to_vec()));
            }
        }
        for i in 0..12u64 {
            recs.push(data(200 + i, 2, vec![(i % 3) as u8; 70_000 + i as usize]));
        }
        recs.push(close);
        let flushes = [7, 8, 30, 41];
        for k in [None, Some(&key)] {
            let w = RecordingWriter::with_key(Vec::new(), &meta(), k).expect("writer");
            let (bytes, packed) = write_packed_flushing(w, &recs, &ev, &flushes);
            assert!(packed >= 8, "{packed} packed frames");
            assert_eq!(read_all(&bytes, k), recs, "encrypted: {}", k.is_some());
            let rep = verify(&bytes[..], "rec-1", Some(ev.public()));
            assert!(rep.ok(), "{rep}");
            assert!(rep.chunks >= 6, "{rep}");
        }
    }

    /// A zstd frame of `records`, with its size in its header.
    fn frame_of(records: &[u8]) -> Vec<u8> {
        let mut c = zstd::bulk::Compressor::new(1).expect("compressor");
        c.include_contentsize(true).expect("content size");
        c.compress(records).expect("compress")
    }

    #[test]
    fn a_packed_frame_must_hold_whole_data_records_as_it_claims() {
        let mut packer = Packer::new().expect("packer");
        let zeros = vec![0u8; 8192];
        let p = packer
            .pack(
                1,
                &[Payload {
                    ts_us: 5,
                    channel: 0,
                    direction: Direction::Input,
                    data: &zeros,
                }],
            )
            .expect("pack");
        assert_eq!(p.plain_len as usize, packed_len(8192, 1));
        assert_eq!(p.data_len, 8192);
        assert!(p.frame.len() < 100, "zeros pack small: {}", p.frame.len());
        let mut un = Unpacker::new();
        let mut refused = |len: u32, data_len: u64, ts_us: u64, frame: &[u8], why: &str| match un
            .check(len, data_len, ts_us, frame)
        {
            Err(FormatError::Malformed(m)) => assert!(m.contains(why), "{m}"),
            Err(e) => panic!("refused otherwise: {e}"),
            Ok(_) => panic!("not refused: {why}"),
        };
        let (len, dl) = (p.plain_len, p.data_len);
        // what the header says
        refused(len + 1, dl, 5, &p.frame, "does not say");
        refused(len, dl, 5, &p.frame[..p.frame.len() - 1], "not exactly one");
        let mut two = p.frame.clone();
        two.extend_from_slice(&p.frame);
        refused(len, dl, 5, &two, "not exactly one");
        refused(len, dl, 5, b"not zstd at all", "not exactly one");
        refused(PACK_MAX as u32 + 1, dl, 5, &p.frame, "out of range");
        // what the frame holds against what the relay says of it
        refused(len, dl + 1, 5, &p.frame, "payload bytes");
        refused(len, dl, 6, &p.frame, "last time");
        // records that are not whole DATA records, in frames whose headers are right
        let head = data_head(5, 0, Direction::Input, 100);
        let mut rec = head.to_vec();
        rec.extend_from_slice(&[0u8; 100]);
        let whole = rec.len() as u32;
        let mut long = rec.clone();
        long[1..5].copy_from_slice(&(DATA_PREFIX as u32 + 101).to_be_bytes());
        refused(whole, 100, 5, &frame_of(&long), "length does not fit");
        let mut resize = rec.clone();
        resize[0] = KIND_RESIZE;
        refused(whole, 100, 5, &frame_of(&resize), "not DATA");
        let mut way = rec.clone();
        way[RECORD_HEAD + 12] = 9;
        refused(whole, 100, 5, &frame_of(&way), "direction");
        let mut cut = rec.clone();
        cut.extend_from_slice(&head[..10]);
        refused(cut.len() as u32, 100, 5, &frame_of(&cut), "cut short");
        // a frame padded with empty raw blocks: right size, right records, far too long
        let mut padded = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, whole as u8];
        for _ in 0..10_000 {
            padded.extend_from_slice(&[0, 0, 0]); // an empty raw block, not the last
        }
        padded.extend_from_slice(&((whole << 3) | 1).to_le_bytes()[..3]);
        padded.extend_from_slice(&rec);
        refused(whole, 100, 5, &padded, "larger than its content");
        // a frame whose blocks are damaged (its header intact) does not decompress
        let noise: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut damaged = frame_of(&[head.to_vec(), noise].concat());
        let mid = damaged.len() / 2;
        damaged[mid] ^= 0xff;
        assert!(un
            .check(
                RECORD_HEAD as u32 + DATA_PREFIX as u32 + 8192,
                8192,
                5,
                &damaged
            )
            .is_err());
        // the good frame goes in and reads back
        let mut w = RecordingWriter::new(Vec::new(), &meta()).expect("writer");
        w.append_packed(un.check(len, dl, 5, &p.frame).expect("checked"))
            .expect("append");
        let bytes = w.finish().expect("finish");
        assert_eq!(
            read_all(&bytes, None),
            vec![Record::Data {
                ts_us: 5,
                channel: 0,
                direction: Direction::Input,
                data: Bytes::from(zeros),
            }]
        );
        // the one-stream layout (format version 3) has no chunks to put a frame into
        let mut s = RecordingWriter::new_stream(Vec::new(), &meta()).expect("writer");
        assert!(s
            .append_packed(un.check(len, dl, 5, &p.frame).expect("checked"))
            .is_err());
    }

    #[test]
    fn only_binary_payloads_of_a_packable_size_are_packed() {
        assert!(packable(&vec![0u8; PACK_MIN]));
        assert!(!packable(&vec![0u8; PACK_MIN - 1]), "too short");
        assert!(!packable(&vec![0u8; PACK_MAX]), "a record of its own");
        assert!(!packable("text é\n".repeat(2000).as_bytes()), "text");
        let mut latin1 = b"caf\xe9 ".repeat(2000);
        assert!(packable(&latin1), "not UTF-8");
        latin1.truncate(PACK_MIN);
        assert!(packable(&latin1));
        // a UTF-8 sequence cut at either end is still text
        let mut cut = "é".repeat(3000).into_bytes();
        cut.remove(0);
        cut.pop();
        assert!(!packable(&cut));
    }

    #[test]
    #[ignore = "writes a fuzz corpus seed: cargo test -p psm-recorder-format -- --ignored write_packed_corpus_seed"]
    fn write_packed_corpus_seed() {
        let (ev, _) = EvidenceKey::generate().expect("evidence key");
        let w = RecordingWriter::new(Vec::new(), &meta()).expect("writer");
        let mut recs = session();
        // small enough for a fuzzer to mutate usefully
        for r in &mut recs {
            if let Record::Data { data, .. } = r {
                if data.len() > PACK_MIN {
                    *data = data.slice(..PACK_MIN);
                }
            }
        }
        let (bytes, packed) = write_packed(w, &recs, &ev);
        assert!(packed > 0);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/recording_read");
        std::fs::write(dir.join("chunked-packed.psmrec"), bytes).expect("write");
    }
}
