//! Frames on the relay -> recorder link.
//!
//! Each frame is `[u32 big-endian body length][u8 tag][body]`. Bodies:
//! - `OPEN`   : `u64 stream` + JSON [`RecordingMeta`]
//! - `DATA`   : `u64 stream, u64 ts_us, u32 channel, u8 direction` + bytes
//! - `RESIZE` : `u64 stream, u64 ts_us, u32 channel, u32 cols, u32 rows`
//! - `CLOSE`  : `u64 stream, u64 ts_us` + JSON [`CloseSummary`]
//! - `DISCARD`: `u64 stream` (the session never started: nothing of it is kept)
//! - `PACKED` : `u64 stream, u64 ts_us (the largest in it), u32 record bytes, u64 DATA payload
//!   bytes` + one zstd frame of DATA records, packed by the relay's link
//!   ([`crate::file::pack`]); psm-recorder puts the frame into the recording as it is
//!
//! `stream` is chosen by the relay and unique on one link; `ts_us` counts microseconds since the
//! session started.
//!
//! psm-recorder answers on the same socket with [`Reply`] frames, framed the same way:
//! - `OPENED` : `u64 stream` (the recording file exists; the session may start)
//! - `REFUSED`: `u64 stream` + UTF-8 reason (the file could not be created)
//! - `FAILED` : `u64 stream` + UTF-8 reason (writing failed mid-session; the session must end)
//! - `DURABLE`: `u64 stream, u64 bytes` (the stream's first `bytes` DATA payload bytes are in
//!   chunks written and flushed to the file: the relay's durable window moves on)
//!
//! A refusal or failure concerns that one stream only: the link and its other streams go on.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::FormatError;

/// Largest frame body accepted (data frames are cut by the relay well below this).
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

const TAG_OPEN: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_RESIZE: u8 = 3;
const TAG_CLOSE: u8 = 4;
const TAG_DISCARD: u8 = 5;
const TAG_PACKED: u8 = 6;
const TAG_OPENED: u8 = 0x41;
const TAG_REFUSED: u8 = 0x42;
const TAG_FAILED: u8 = 0x43;
const TAG_DURABLE: u8 = 0x44;
/// Longest reason a [`Reply`] carries.
pub const MAX_REASON: usize = 1024;

/// Which way bytes travelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the user to the target (keystrokes, uploads).
    Input = 0,
    /// From the target to the user (standard output, terminal output).
    Output = 1,
    /// From the target to the user on the standard-error stream.
    Error = 2,
}

impl Direction {
    fn from_u8(v: u8) -> Result<Self, FormatError> {
        match v {
            0 => Ok(Direction::Input),
            1 => Ok(Direction::Output),
            2 => Ok(Direction::Error),
            other => Err(FormatError::Malformed(format!("unknown direction {other}"))),
        }
    }
}

/// What a recording is of: written once at its start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingMeta {
    /// Recording id (also the file name stem).
    pub recording_id: String,
    /// Session id.
    pub session_id: String,
    /// psm user.
    pub user: String,
    /// Target name.
    pub target: String,
    /// Account on the target.
    pub account: String,
    /// Client `ip:port`.
    pub source: String,
    /// Start, ms since the Unix epoch.
    pub start_ms: u64,
    /// `rdp` for an RDP session; empty for SSH (the default, left out of the header).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

/// RDP recordings: where their records go.
///
/// An RDP recording keeps every PDU each way, one DATA record per PDU, on [`RDP_PDU_CHANNEL`](rdp::RDP_PDU_CHANNEL)
/// (direction `Input`: client to target, `Output`: target to client), exactly as relayed
/// (after psm's rewrites, so never a credential). The relay also writes what it decoded on
/// [`RDP_KEYS_CHANNEL`](rdp::RDP_KEYS_CHANNEL) (direction `Input`): the text typed, so search, text export and watch
/// treat it like an SSH session's input; and session events (connect, channels refused,
/// disconnect) as one line of text each on [`RDP_EVENTS_CHANNEL`](rdp::RDP_EVENTS_CHANNEL) (direction `Output`).
pub mod rdp {
    /// `protocol` of an RDP recording's header.
    pub const PROTOCOL: &str = "rdp";
    /// Raw PDUs, one per record.
    pub const RDP_PDU_CHANNEL: u32 = 0xFFFF_0000;
    /// Typed text, decoded from the input PDUs with the session's keyboard layout.
    pub const RDP_KEYS_CHANNEL: u32 = 0;
    /// Session events, one line each.
    pub const RDP_EVENTS_CHANNEL: u32 = 0xFFFF_0001;
}

/// How a recorded session ended: written once at its end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseSummary {
    /// End, ms since the Unix epoch.
    pub end_ms: u64,
    /// Exit status, when the target sent one.
    pub exit_status: Option<u32>,
    /// Exit signal, when the target sent one.
    pub exit_signal: Option<String>,
    /// Why the session ended.
    pub reason: String,
}

/// One frame on the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A session starts.
    Open {
        /// Link-local stream number.
        stream: u64,
        /// What the recording is of.
        meta: RecordingMeta,
    },
    /// Bytes seen on a channel.
    Data {
        /// Link-local stream number.
        stream: u64,
        /// Microseconds since the session started.
        ts_us: u64,
        /// SSH channel number on the user side.
        channel: u32,
        /// Which way they went.
        direction: Direction,
        /// The bytes.
        data: Bytes,
    },
    /// The terminal was resized (or a pty was first requested).
    Resize {
        /// Link-local stream number.
        stream: u64,
        /// Microseconds since the session started.
        ts_us: u64,
        /// SSH channel number on the user side.
        channel: u32,
        /// Columns.
        cols: u32,
        /// Rows.
        rows: u32,
    },
    /// A session ended.
    Close {
        /// Link-local stream number.
        stream: u64,
        /// Microseconds since the session started.
        ts_us: u64,
        /// How it ended.
        summary: CloseSummary,
    },
    /// The session this stream was opened for never started (the target login failed): the
    /// recording holds nothing and is removed.
    Discard {
        /// Link-local stream number.
        stream: u64,
    },
    /// DATA records packed into one zstd frame by the relay's link ([`crate::file::pack`]).
    Packed {
        /// Link-local stream number.
        stream: u64,
        /// The largest timestamp of its records.
        ts_us: u64,
        /// Record bytes the frame decompresses to.
        plain_len: u32,
        /// DATA payload bytes in those records (what the durable count moves by).
        data_len: u64,
        /// The zstd frame.
        frame: Bytes,
    },
}

/// psm-recorder's answer about one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The recording file was created: the session may start.
    Opened {
        /// Link-local stream number.
        stream: u64,
    },
    /// The recording could not be created (disk or inodes exhausted, I/O error).
    Refused {
        /// Link-local stream number.
        stream: u64,
        /// Why, for the audit log.
        reason: String,
    },
    /// The recording could not be written any more: the session must end.
    Failed {
        /// Link-local stream number.
        stream: u64,
        /// Why, for the audit log.
        reason: String,
    },
    /// Everything recorded on the stream up to here is durable: its chunk is written and
    /// flushed to the file. The relay may have that many DATA bytes relayed (see the relay's
    /// durable window).
    Durable {
        /// Link-local stream number.
        stream: u64,
        /// DATA payload bytes of the stream made durable so far (cumulative).
        bytes: u64,
    },
}

impl Reply {
    /// The stream this reply is about.
    pub fn stream(&self) -> u64 {
        match self {
            Reply::Opened { stream }
            | Reply::Refused { stream, .. }
            | Reply::Failed { stream, .. }
            | Reply::Durable { stream, .. } => *stream,
        }
    }

    /// Appends the encoded reply to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (tag, stream, reason) = match self {
            Reply::Opened { stream } => (TAG_OPENED, *stream, ""),
            Reply::Refused { stream, reason } => (TAG_REFUSED, *stream, reason.as_str()),
            Reply::Failed { stream, reason } => (TAG_FAILED, *stream, reason.as_str()),
            Reply::Durable { stream, bytes } => {
                out.extend_from_slice(&17u32.to_be_bytes());
                out.push(TAG_DURABLE);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&bytes.to_be_bytes());
                return;
            }
        };
        let (reason, _) = truncate_utf8(reason, MAX_REASON);
        let body = 1 + 8 + reason.len();
        out.extend_from_slice(&(body as u32).to_be_bytes());
        out.push(tag);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
    }

    /// Decodes one reply from the front of `buf`, as [`Frame::decode`] does.
    pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, FormatError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > 1 + 8 + MAX_REASON {
            return Err(FormatError::Malformed(format!(
                "reply of {len} bytes exceeds limit"
            )));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let mut r = Reader(&buf[4..4 + len]);
        let tag = r.u8()?;
        let stream = r.u64()?;
        let reason = || {
            String::from_utf8(r.0.to_vec())
                .map_err(|_| FormatError::Malformed("reply reason is not UTF-8".into()))
        };
        let reply = match tag {
            TAG_OPENED => {
                r.end()?;
                Reply::Opened { stream }
            }
            TAG_REFUSED => Reply::Refused {
                stream,
                reason: reason()?,
            },
            TAG_FAILED => Reply::Failed {
                stream,
                reason: reason()?,
            },
            TAG_DURABLE => {
                let bytes = r.u64()?;
                r.end()?;
                Reply::Durable { stream, bytes }
            }
            other => return Err(FormatError::Malformed(format!("unknown reply tag {other}"))),
        };
        Ok(Some((reply, 4 + len)))
    }
}

fn truncate_utf8(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

impl Frame {
    /// The stream this frame belongs to.
    pub fn stream(&self) -> u64 {
        match self {
            Frame::Open { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Resize { stream, .. }
            | Frame::Close { stream, .. }
            | Frame::Packed { stream, .. }
            | Frame::Discard { stream } => *stream,
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Open { stream, meta } => {
                out.push(TAG_OPEN);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&serde_json::to_vec(meta).unwrap_or_default());
            }
            Frame::Data { .. } | Frame::Packed { .. } => {
                // the header with its length as `encode_split` writes it, then the payload
                out.truncate(start);
                if let Some(data) = self.encode_split(out) {
                    out.extend_from_slice(data);
                }
                return;
            }
            Frame::Resize {
                stream,
                ts_us,
                channel,
                cols,
                rows,
            } => {
                out.push(TAG_RESIZE);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&ts_us.to_be_bytes());
                out.extend_from_slice(&channel.to_be_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
                out.extend_from_slice(&rows.to_be_bytes());
            }
            Frame::Close {
                stream,
                ts_us,
                summary,
            } => {
                out.push(TAG_CLOSE);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&ts_us.to_be_bytes());
                out.extend_from_slice(&serde_json::to_vec(summary).unwrap_or_default());
            }
            Frame::Discard { stream } => {
                out.push(TAG_DISCARD);
                out.extend_from_slice(&stream.to_be_bytes());
            }
        }
        let body = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&body.to_be_bytes());
    }

    /// Like [`Frame::encode`], but a DATA frame's payload (a PACKED frame's zstd frame) is not
    /// copied: its header goes into `out` and the payload is returned, to be sent right after
    /// it (a vectored write).
    pub fn encode_split<'a>(&'a self, out: &mut Vec<u8>) -> Option<&'a Bytes> {
        match self {
            Frame::Data {
                stream,
                ts_us,
                channel,
                direction,
                data,
            } => {
                let body = (1 + 8 + 8 + 4 + 1 + data.len()) as u32;
                out.extend_from_slice(&body.to_be_bytes());
                out.push(TAG_DATA);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&ts_us.to_be_bytes());
                out.extend_from_slice(&channel.to_be_bytes());
                out.push(*direction as u8);
                Some(data)
            }
            Frame::Packed {
                stream,
                ts_us,
                plain_len,
                data_len,
                frame,
            } => {
                let body = (1 + 8 + 8 + 4 + 8 + frame.len()) as u32;
                out.extend_from_slice(&body.to_be_bytes());
                out.push(TAG_PACKED);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&ts_us.to_be_bytes());
                out.extend_from_slice(&plain_len.to_be_bytes());
                out.extend_from_slice(&data_len.to_be_bytes());
                Some(frame)
            }
            _ => {
                self.encode(out);
                None
            }
        }
    }

    /// Decodes one frame from the front of `buf`. Returns `Ok(None)` when more bytes are needed,
    /// or the frame and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FormatError> {
        Ok(Frame::decode_ref(buf)?.map(|(f, n)| (f.into_owned(), n)))
    }

    /// Like [`decode`](Self::decode), with a DATA frame's bytes borrowed from `buf` rather than
    /// copied (psm-recorder compresses them straight from its receive buffer).
    pub fn decode_ref(buf: &[u8]) -> Result<Option<(FrameRef<'_>, usize)>, FormatError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FormatError::Malformed(format!(
                "frame of {len} bytes exceeds limit"
            )));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let body = &buf[4..4 + len];
        let mut r = Reader(body);
        let tag = r.u8()?;
        let frame = match tag {
            TAG_OPEN => {
                let stream = r.u64()?;
                let meta = serde_json::from_slice(r.rest())
                    .map_err(|e| FormatError::Malformed(format!("open metadata: {e}")))?;
                Frame::Open { stream, meta }
            }
            TAG_DATA => {
                let data = FrameRef::Data {
                    stream: r.u64()?,
                    ts_us: r.u64()?,
                    channel: r.u32()?,
                    direction: Direction::from_u8(r.u8()?)?,
                    data: r.rest(),
                };
                return Ok(Some((data, 4 + len)));
            }
            TAG_RESIZE => {
                let f = Frame::Resize {
                    stream: r.u64()?,
                    ts_us: r.u64()?,
                    channel: r.u32()?,
                    cols: r.u32()?,
                    rows: r.u32()?,
                };
                r.end()?;
                f
            }
            TAG_CLOSE => {
                let stream = r.u64()?;
                let ts_us = r.u64()?;
                let summary = serde_json::from_slice(r.rest())
                    .map_err(|e| FormatError::Malformed(format!("close summary: {e}")))?;
                Frame::Close {
                    stream,
                    ts_us,
                    summary,
                }
            }
            TAG_DISCARD => {
                let f = Frame::Discard { stream: r.u64()? };
                r.end()?;
                f
            }
            TAG_PACKED => {
                let packed = FrameRef::Packed {
                    stream: r.u64()?,
                    ts_us: r.u64()?,
                    plain_len: r.u32()?,
                    data_len: r.u64()?,
                    frame: r.rest(),
                };
                return Ok(Some((packed, 4 + len)));
            }
            other => return Err(FormatError::Malformed(format!("unknown frame tag {other}"))),
        };
        Ok(Some((FrameRef::Other(frame), 4 + len)))
    }
}

/// A frame decoded in place ([`Frame::decode_ref`]): a DATA frame's bytes borrowed from the
/// buffer it was decoded from, any other frame owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameRef<'a> {
    /// As [`Frame::Data`].
    Data {
        /// Recording stream id.
        stream: u64,
        /// Microseconds since the session started.
        ts_us: u64,
        /// SSH channel number on the user side.
        channel: u32,
        /// Which way the bytes went.
        direction: Direction,
        /// The bytes.
        data: &'a [u8],
    },
    /// As [`Frame::Packed`].
    Packed {
        /// Recording stream id.
        stream: u64,
        /// The largest timestamp of its records.
        ts_us: u64,
        /// Record bytes the frame decompresses to.
        plain_len: u32,
        /// DATA payload bytes in those records.
        data_len: u64,
        /// The zstd frame.
        frame: &'a [u8],
    },
    /// Any other frame.
    Other(Frame),
}

impl FrameRef<'_> {
    /// The frame, owning its bytes (a DATA or PACKED frame's are copied).
    pub fn into_owned(self) -> Frame {
        match self {
            FrameRef::Data {
                stream,
                ts_us,
                channel,
                direction,
                data,
            } => Frame::Data {
                stream,
                ts_us,
                channel,
                direction,
                data: Bytes::copy_from_slice(data),
            },
            FrameRef::Packed {
                stream,
                ts_us,
                plain_len,
                data_len,
                frame,
            } => Frame::Packed {
                stream,
                ts_us,
                plain_len,
                data_len,
                frame: Bytes::copy_from_slice(frame),
            },
            FrameRef::Other(frame) => frame,
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.0.len() < n {
            return Err(FormatError::Malformed("frame body too short".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn end(&self) -> Result<(), FormatError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Malformed("trailing bytes in frame".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_encoding_and_its_payload_decode_to_the_frame() {
        for f in samples() {
            let mut split = Vec::new();
            let payload = f.encode_split(&mut split).cloned();
            assert_eq!(
                payload.is_some(),
                matches!(f, Frame::Data { .. } | Frame::Packed { .. }),
                "only DATA payloads and packed frames are left out: {f:?}"
            );
            if let Some(data) = payload {
                split.extend_from_slice(&data);
            }
            let (back, used) = Frame::decode(&split)
                .expect("decodes")
                .expect("whole frame");
            assert_eq!(used, split.len());
            assert_eq!(back, f);
        }
    }

    #[test]
    fn decoded_in_place_data_borrows_its_bytes_and_owns_the_same_frame() {
        for f in samples() {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            let (r, used) = Frame::decode_ref(&buf)
                .expect("decodes")
                .expect("whole frame");
            assert_eq!(used, buf.len());
            match &r {
                FrameRef::Data { data, .. } | FrameRef::Packed { frame: data, .. } => {
                    let inside = buf.as_ptr_range();
                    assert!(
                        inside.contains(&data.as_ptr()) || data.is_empty(),
                        "not copied"
                    );
                }
                FrameRef::Other(_) => assert!(
                    !matches!(f, Frame::Data { .. } | Frame::Packed { .. }),
                    "DATA and PACKED decode in place"
                ),
            }
            assert_eq!(r.into_owned(), f);
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Open {
                stream: 7,
                meta: RecordingMeta {
                    recording_id: "r1".into(),
                    user: "alice".into(),
                    ..Default::default()
                },
            },
            Frame::Data {
                stream: 7,
                ts_us: 12,
                channel: 0,
                direction: Direction::Output,
                data: Bytes::from_static(b"hello\r\n\x00\xff"),
            },
            Frame::Data {
                stream: 7,
                ts_us: 13,
                channel: 1,
                direction: Direction::Input,
                data: Bytes::new(),
            },
            Frame::Resize {
                stream: 7,
                ts_us: 14,
                channel: 0,
                cols: 120,
                rows: 40,
            },
            Frame::Close {
                stream: 7,
                ts_us: 99,
                summary: CloseSummary {
                    exit_status: Some(3),
                    reason: "client closed".into(),
                    ..Default::default()
                },
            },
            Frame::Discard { stream: 8 },
            Frame::Packed {
                stream: 7,
                ts_us: 15,
                plain_len: 4114,
                data_len: 4096,
                frame: Bytes::from_static(b"\x28\xb5\x2f\xfd not checked here"),
            },
        ]
    }

    #[test]
    fn replies_round_trip_and_reject_garbage() {
        let replies = vec![
            Reply::Opened { stream: 1 },
            Reply::Refused {
                stream: 2,
                reason: "no space left on device".into(),
            },
            Reply::Failed {
                stream: u64::MAX,
                reason: "é".repeat(MAX_REASON),
            },
            Reply::Durable {
                stream: 3,
                bytes: 1 << 40,
            },
        ];
        let mut buf = Vec::new();
        for r in &replies {
            r.encode(&mut buf);
        }
        let mut got = Vec::new();
        let mut at = 0;
        while let Some((r, n)) = Reply::decode(&buf[at..]).expect("valid") {
            got.push(r);
            at += n;
        }
        assert_eq!(at, buf.len());
        assert_eq!(got[..2], replies[..2]);
        // an over-long reason is cut on a character boundary, never past the limit
        let Reply::Failed { reason, .. } = &got[2] else {
            panic!("not a failure: {:?}", got[2]);
        };
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
        assert_eq!(got[3], replies[3]);
        // a DURABLE without its count, or with bytes after it, is malformed
        assert!(Reply::decode(&[0, 0, 0, 9, TAG_DURABLE, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        let mut long = vec![0, 0, 0, 18, TAG_DURABLE];
        long.extend_from_slice(&[0; 17]);
        assert!(Reply::decode(&long).is_err());
        assert!(Reply::decode(&[0, 0, 0, 9, 0x7f, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(Reply::decode(&[0xff, 0, 0, 0]).is_err());
        assert!(Reply::decode(&[0, 0, 0, 10, TAG_OPENED, 0, 0, 0, 0, 0, 0, 0, 1, 9]).is_err());
        assert!(Reply::decode(&[0, 0, 0, 3, TAG_OPENED, 0, 0]).is_err());
    }

    #[test]
    fn round_trip_in_one_buffer_and_byte_by_byte() {
        let mut buf = Vec::new();
        for f in samples() {
            f.encode(&mut buf);
        }
        let mut got = Vec::new();
        let mut at = 0;
        while let Some((f, n)) = Frame::decode(&buf[at..]).expect("valid") {
            got.push(f);
            at += n;
        }
        assert_eq!(got, samples());
        assert_eq!(at, buf.len());
        // every strict prefix of a frame asks for more bytes
        let mut one = Vec::new();
        samples()[1].encode(&mut one);
        for cut in 0..one.len() {
            assert!(Frame::decode(&one[..cut]).expect("prefix").is_none());
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(Frame::decode(&[0, 0, 0, 1, 99]).is_err());
        assert!(Frame::decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Frame::decode(&[0, 0, 0, 3, TAG_DATA, 0, 0]).is_err());
        assert!(Frame::decode(&[0, 0, 0, 10, TAG_DATA, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
