//! What one write to psm-recorder carries: the frames the workers queued, encoded, with large
//! payloads left where the workers put them, and runs of binary DATA packed into zstd frames
//! ([`psm_recorder_format::file::pack`]): a file going through scp or sftp crosses the socket
//! compressed, and psm-recorder puts it into the recording as it is.

use bytes::Bytes;
use psm_recorder_format::file::pack::{self, Packer, Payload};
use psm_recorder_format::Frame;
use tracing::warn;

/// Bytes the link writes to the socket in one go, at most.
const BATCH_BYTES: usize = 1 << 20;
/// DATA payloads this size or larger go to psm-recorder as they are (a slice of the vectored
/// write); smaller ones (a keystroke, its echo) are copied in with their header.
const INLINE_MAX: usize = 1024;
/// Payloads one write carries at most (`writev` takes up to 1024 slices, two per payload).
const BATCH_PAYLOADS: usize = 256;

/// What one vectored write to psm-recorder carries: the frames encoded in `heads`, but for
/// large DATA payloads, which stay where the worker put them (no copy on the link thread), and
/// packed frames.
#[derive(Default)]
pub(super) struct Batch {
    heads: Vec<u8>,
    /// Each payload, after the heads' bytes up to the offset given with it.
    payloads: Vec<(usize, Bytes)>,
    payload_bytes: usize,
    /// Bytes of the batch already written (the socket took part of it and had no room left).
    written: usize,
    /// Packs runs of binary DATA ([`pack`]); `None`: every frame goes as it is.
    packer: Option<Packer>,
    /// The run being gathered: packable DATA frames of one stream, in order.
    run: Vec<Frame>,
    /// Record bytes in `run`.
    run_plain: usize,
}

impl Batch {
    /// A batch that packs runs of binary DATA when `pack` (and zstd can be set up).
    pub(super) fn new(pack: bool) -> Self {
        let packer = if pack {
            match Packer::new() {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(error = %e, "cannot set up zstd on the recorder link; recorded bytes go to psm-recorder unpacked");
                    None
                }
            }
        } else {
            None
        };
        Batch {
            heads: Vec::with_capacity(64 * 1024),
            packer,
            ..Batch::default()
        }
    }

    /// Adds a frame. A packable DATA payload ([`pack::packable`]) joins the run of its stream;
    /// any other frame ends the run first, so every stream's frames keep their order.
    pub(super) fn push(&mut self, f: &Frame) {
        if self.packer.is_some() {
            if let Frame::Data { stream, data, .. } = f {
                if pack::packable(data) {
                    let len = pack::packed_len(data.len(), 1);
                    let joins = self.run.first().is_none_or(|r| r.stream() == *stream)
                        && self.run_plain + len <= pack::PACK_MAX;
                    if !joins {
                        self.end_run();
                    }
                    self.run.push(f.clone());
                    self.run_plain += len;
                    return;
                }
            }
            self.end_run();
            if let (Frame::Close { stream, .. } | Frame::Discard { stream }, Some(p)) =
                (f, self.packer.as_mut())
            {
                p.forget(*stream);
            }
        }
        self.push_frame(f);
    }

    /// Packs the run gathered so far into one PACKED frame (as they were, should zstd fail).
    pub(super) fn end_run(&mut self) {
        if self.run.is_empty() {
            return;
        }
        let run = std::mem::take(&mut self.run);
        self.run_plain = 0;
        let packed = self.packer.as_mut().map(|p| {
            let payloads: Vec<Payload<'_>> = run
                .iter()
                .filter_map(|f| match f {
                    Frame::Data {
                        ts_us,
                        channel,
                        direction,
                        data,
                        ..
                    } => Some(Payload {
                        ts_us: *ts_us,
                        channel: *channel,
                        direction: *direction,
                        data,
                    }),
                    _ => None,
                })
                .collect();
            p.pack(run[0].stream(), &payloads)
        });
        match packed {
            Some(Ok(p)) => self.push_frame(&Frame::Packed {
                stream: run[0].stream(),
                ts_us: p.last_ts_us,
                plain_len: p.plain_len,
                data_len: p.data_len,
                frame: Bytes::from(p.frame),
            }),
            other => {
                if let Some(Err(e)) = other {
                    warn!(error = %e, "packing recorded bytes failed; they go to psm-recorder as they are");
                }
                for f in &run {
                    self.push_frame(f);
                }
            }
        }
    }

    fn push_frame(&mut self, f: &Frame) {
        match f.encode_split(&mut self.heads) {
            Some(data) if data.len() >= INLINE_MAX => {
                self.payload_bytes += data.len();
                self.payloads.push((self.heads.len(), data.clone()));
            }
            Some(data) => self.heads.extend_from_slice(data),
            None => {}
        }
    }

    /// Bytes of the batch the socket has taken so far.
    pub(super) fn written(&self) -> usize {
        self.written
    }

    pub(super) fn is_empty(&self) -> bool {
        self.heads.is_empty() && self.payloads.is_empty() && self.run.is_empty()
    }

    pub(super) fn full(&self) -> bool {
        self.heads.len() + self.payload_bytes + self.run_plain >= BATCH_BYTES
            || self.payloads.len() + self.run.len() >= BATCH_PAYLOADS
    }

    /// Empties the batch once written (its run was ended before it was).
    pub(super) fn clear(&mut self) {
        debug_assert!(self.run.is_empty());
        self.heads.clear();
        self.payloads.clear();
        self.payload_bytes = 0;
        self.written = 0;
    }

    /// Writes what is left of the batch: `Ok(true)` once all of it is written, `Ok(false)` when
    /// `w` has no room now (the rest goes on a later call). Call [`end_run`](Self::end_run)
    /// first.
    pub(super) fn write_some(&mut self, w: &mut impl std::io::Write) -> std::io::Result<bool> {
        let mut slices = Vec::with_capacity(2 * self.payloads.len() + 1);
        let mut at = 0;
        for (end, p) in &self.payloads {
            slices.push(std::io::IoSlice::new(&self.heads[at..*end]));
            slices.push(std::io::IoSlice::new(p));
            at = *end;
        }
        slices.push(std::io::IoSlice::new(&self.heads[at..]));
        let mut left = &mut slices[..];
        std::io::IoSlice::advance_slices(&mut left, self.written);
        while !left.is_empty() {
            match w.write_vectored(left) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    std::io::IoSlice::advance_slices(&mut left, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_recorder_format::file::{Record, RecordingReader, RecordingWriter};
    use psm_recorder_format::Direction;

    /// Takes at most 7 bytes per call, from the first non-empty slice only.
    struct Trickle(Vec<u8>);

    impl std::io::Write for Trickle {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = b.len().min(7);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            match bufs.iter().find(|b| !b.is_empty()) {
                Some(b) => self.write(b),
                None => Ok(0),
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_sends_the_frames_bytes_in_order_with_large_payloads_uncopied() {
        let data = |n: usize, ts_us: u64| Frame::Data {
            stream: 1,
            ts_us,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
        };
        let frames = vec![
            data(5, 1),
            data(40_000, 2),
            Frame::Resize {
                stream: 1,
                ts_us: 3,
                channel: 0,
                cols: 80,
                rows: 24,
            },
            data(INLINE_MAX, 4),
            data(INLINE_MAX - 1, 5),
            data(70_000, 6),
        ];
        let mut batch = Batch::default();
        let mut whole = Vec::new();
        for f in &frames {
            batch.push(f);
            f.encode(&mut whole);
        }
        assert_eq!(
            batch.payloads.len(),
            3,
            "the three payloads of INLINE_MAX or more"
        );
        let mut out = Trickle(Vec::new());
        assert!(batch.write_some(&mut out).expect("written"), "all of it");
        assert_eq!(out.0, whole);

        // a socket that runs out of room part-way: the batch goes on where it stopped
        batch.written = 0;
        let mut choked = Choke {
            took: Vec::new(),
            room: 50_000,
        };
        assert!(!batch.write_some(&mut choked).expect("no error"), "stopped");
        assert_eq!(choked.took.len(), 50_000);
        choked.room = 1_000;
        assert!(
            !batch.write_some(&mut choked).expect("no error"),
            "stopped again"
        );
        choked.room = usize::MAX;
        assert!(batch.write_some(&mut choked).expect("written"), "the rest");
        assert_eq!(choked.took, whole);
    }

    /// Takes `room` bytes in all, then says it would block.
    struct Choke {
        took: Vec<u8>,
        room: usize,
    }

    impl std::io::Write for Choke {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.write_vectored(&[std::io::IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.room - n);
                self.took.extend_from_slice(&b[..k]);
                n += k;
                if n == self.room {
                    break;
                }
            }
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What psm-recorder makes of a stream's frames: its recording's records.
    fn recorded(frames: &[Frame], stream: u64) -> Vec<Record> {
        let meta = psm_recorder_format::RecordingMeta::default();
        let mut w = RecordingWriter::new(Vec::new(), &meta).expect("writer");
        let mut unpacker = psm_recorder_format::file::pack::Unpacker::new();
        for f in frames.iter().filter(|f| f.stream() == stream) {
            match f {
                Frame::Data {
                    ts_us,
                    channel,
                    direction,
                    data,
                    ..
                } => w.write_data(*ts_us, *channel, *direction, data),
                Frame::Packed {
                    ts_us,
                    plain_len,
                    data_len,
                    frame,
                    ..
                } => unpacker
                    .check(*plain_len, *data_len, *ts_us, frame)
                    .and_then(|c| w.append_packed(c)),
                Frame::Resize {
                    ts_us,
                    channel,
                    cols,
                    rows,
                    ..
                } => w.write(&Record::Resize {
                    ts_us: *ts_us,
                    channel: *channel,
                    cols: *cols,
                    rows: *rows,
                }),
                Frame::Close { ts_us, summary, .. } => w.write(&Record::Close {
                    ts_us: *ts_us,
                    summary: summary.clone(),
                }),
                _ => Ok(()),
            }
            .expect("written");
        }
        let bytes = w.finish().expect("finished");
        let mut r = RecordingReader::open(&bytes[..]).expect("open");
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().expect("record") {
            out.push(rec);
        }
        out
    }

    #[test]
    fn runs_of_binary_data_go_packed_in_order_and_record_the_same() {
        let data = |stream: u64, ts_us: u64, bytes: Vec<u8>| Frame::Data {
            stream,
            ts_us,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from(bytes),
        };
        let file = |stream, ts_us| data(stream, ts_us, vec![0u8; 32 * 1024]);
        let mut frames = vec![
            data(1, 1, b"ls\r".to_vec()),
            file(1, 2),
            file(1, 3),
            file(2, 4),
            file(1, 5),
            data(1, 6, "a line of text\n".repeat(1000).into_bytes()),
            Frame::Resize {
                stream: 1,
                ts_us: 7,
                channel: 0,
                cols: 80,
                rows: 24,
            },
        ];
        // 640 KiB of one stream: more than one packed frame holds
        frames.extend((0..20).map(|i| file(1, 10 + i)));
        frames.push(Frame::Close {
            stream: 1,
            ts_us: 40,
            summary: psm_recorder_format::CloseSummary::default(),
        });
        let mut batch = Batch::new(true);
        for f in &frames {
            batch.push(f);
        }
        batch.end_run();
        let mut out = Vec::new();
        assert!(batch.write_some(&mut out).expect("written"));
        let mut sent = Vec::new();
        let mut at = 0;
        while let Some((f, n)) = Frame::decode(&out[at..]).expect("frames") {
            sent.push(f);
            at += n;
        }
        assert_eq!(at, out.len());
        let kinds: Vec<String> = sent
            .iter()
            .map(|f| match f {
                Frame::Data { stream, .. } => format!("data {stream}"),
                Frame::Packed {
                    stream, data_len, ..
                } => format!("packed {stream} {}", data_len / (32 * 1024)),
                Frame::Resize { .. } => "resize".into(),
                Frame::Close { .. } => "close".into(),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "data 1",
                "packed 1 2",
                "packed 2 1",
                "packed 1 1",
                "data 1",
                "resize",
                "packed 1 15",
                "packed 1 5",
                "close"
            ]
        );
        assert!(
            out.len() < 64 * 1024,
            "zeros cross the socket compressed: {} bytes",
            out.len()
        );
        for stream in [1, 2] {
            assert_eq!(recorded(&sent, stream), recorded(&frames, stream));
        }
    }
}
