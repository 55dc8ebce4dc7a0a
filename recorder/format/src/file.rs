//! The on-disk recording: one file per session, `<recording_id>.psmrec`.
//!
//! # Format versions
//!
//! | magic | version | layout | seal hash |
//! |---|---|---|---|
//! | `PSMREC5\n` | 5 | chunked, unencrypted (below) | BLAKE3 over the bytes as written |
//! | `PSMREC4\n` | 4 | chunked, encrypted (below) | BLAKE3 over the bytes as written |
//! | `PSMREC3\n` | 3 | one zstd stream (below) | BLAKE3 over the decompressed bytes (written before version 5; read and verified) |
//! | `PSMREC1\n` | 1 | one zstd stream | SHA-256 (written before version 3; read and verified) |
//! | `PSMREC2\n` | 2 | chunked, encrypted | SHA-256 (written before version 4; read and verified) |
//!
//! The writer writes 5 and 4 (and the others for tests). The magic names the version, so a
//! reader knows the layout and the seals' hash ([`ChainHash`]) before it hashes anything; the
//! HEADER's version byte must agree with it. Versions 3 and 4 differ from 1 and 2 only in that
//! hash; version 5 is version 4's layout with its chunks in the clear.
//!
//! Why version 5: a seal that covers the bytes as written costs the recorder a hash of the
//! compressed chunk, not of everything recorded (a chunk of terminal output is a fraction of
//! its records' size, one of zeros a few bytes), and a verifier checks the chain without
//! decompressing anything ([`RecordingReader::seals_only`]).
//!
//! # Layout (one zstd stream: format versions 3 and 1)
//!
//! ```text
//! "PSMREC3\n"                      8-byte magic, uncompressed
//! zstd frame | zstd frame | ...    one zstd stream made of concatenated frames
//! ```
//!
//! Decompressed, the frames hold a sequence of records. Every record is
//! `[u8 kind][u32 big-endian body length][body]`; all integers are big-endian:
//!
//! | kind | name   | body |
//! |------|--------|------|
//! | 0x01 | HEADER | `u8 version (3 or 1), u8 flags` + JSON [`RecordingMeta`]; always the first record, exactly once |
//! | 0x02 | DATA   | `u64 ts_us, u32 channel, u8 direction` + the bytes |
//! | 0x03 | RESIZE | `u64 ts_us, u32 channel, u32 cols, u32 rows` |
//! | 0x04 | CLOSE  | `u64 ts_us` + JSON [`CloseSummary`]; the last record of a recording that ended cleanly |
//! | 0x80 | SEAL   | `u64 chunk, u64 ts_us, [32] hash`: the last record of every zstd frame (chunk) of a sealed recording |
//! | 0x81 | TRAILER | see below; alone in the last zstd frame of a signed recording, after CLOSE |
//!
//! `ts_us` counts microseconds since the session started; `direction` is the
//! [`Direction`] discriminant (0 input, 1 output, 2 error). A record body is at most
//! [`MAX_RECORD`] bytes; the writer cuts longer data into several DATA records with the same
//! timestamp.
//!
//! Each call to [`RecordingWriter::flush`] ends the current zstd frame, so everything written
//! before it decodes even when the process dies right after. Frames carry no zstd content
//! checksum: the seals cover every byte, and the reader compares each seal with what it read
//! (recordings written with one still read).
//! A reader that meets the end of the file inside a frame or a record keeps what was complete
//! and reports [`RecordingReader::truncated`]. The reader holds at most one record and fixed
//! buffers, whatever the size of the recording (see [`RecordingReader`]).
//!
//! # Seals and trailer (tamper evidence)
//!
//! HEADER `flags` bit 0 ([`FLAG_SEALED`]) says the recording is sealed: every zstd frame is a
//! *chunk* that ends with a SEAL record. Chunks are numbered from 1 (the first holds the
//! header; in a chunked recording, below, chunk 1 is the clear header and its seal); a seal carries its chunk's number, the largest `ts_us` written so far, and
//! `H(previous seal's hash || every decompressed byte from the end of the previous seal
//! (the start of the stream for chunk 1) up to this seal's hash field)` — the seal's own head,
//! number and time included, where `H` is the version's seal hash (BLAKE3 or SHA-256, 256-bit
//! output). The seals form a hash chain from the header to the last chunk.
//!
//! A recording that ends cleanly then gets a TRAILER in a frame of its own, signed with the
//! recorder's Ed25519 evidence key (`psm_evidence`):
//!
//! ```text
//! u8 version (1), u8 flags (bit 0: complete: the session's own CLOSE; clear: the recorder
//! closed it because the relay link was lost or the recorder stopped), u64 chunk count,
//! [32] last seal's hash, [8] key id, u16 len + session id, u16 len + recording id,
//! [64] Ed25519 signature of TRAILER_DOMAIN || all the bytes above
//! ```
//!
//! [`crate::verify`] checks all of it. Readers that only replay compare each seal with what they
//! read (a chunk that does not match ends reading with an error) and skip the trailer.
//!
//! # Chunked recordings (format version 5; encrypted: versions 4 and 2)
//!
//! [`RecordingWriter::new`] writes records of the same shape, uncompressed and in the clear at
//! the top level, around chunks; with a recording key ([`crate::crypt`]),
//! [`RecordingWriter::new_encrypted`] encrypts each chunk:
//!
//! ```text
//! "PSMREC5\n" (or "PSMREC4\n")
//! HEADER   u8 version (5), u8 flags (FLAG_SEALED), JSON RecordingMeta
//!          encrypted: u8 version (4 or 2), u8 flags (FLAG_SEALED | FLAG_ENCRYPTED),
//!          [8] recording key id, [32] salt, JSON RecordingMeta
//! then per chunk:
//! CHUNK    (0x05) one or more concatenated zstd frames of DATA and RESIZE records (the
//!          writer's own, and runs of DATA records the relay packed: [`pack`])
//!          encrypted: AES-256-GCM(those frames) || [16] tag
//! CLOSE    as above, in the clear, in the last chunk only
//! SEAL     as above
//! and at the end: TRAILER as above
//! ```
//!
//! A seal's hash covers the bytes *as written in the file* since the previous seal (the clear
//! header and the chunk as written included, up to its own hash field), so [`crate::verify`]
//! checks the chain and the trailer without opening a chunk, and without the key of an
//! encrypted one. What is in the clear of an encrypted recording: who, what target and when (the meta), the session's end (CLOSE), each
//! chunk's time and size, and the key id; what is not: every byte of the session and its
//! terminal sizes. The nonce and key derivation are described in [`crate::crypt`]. A chunk
//! holds whole records, at most 1 MiB of them unless one record is larger, so a reader holds
//! one chunk at a time. [`RecordingReader::open`] reads the evidence of an encrypted recording
//! without the key; [`RecordingReader::open_with_key`] also decrypts its records.
//!
//! # Extension seam
//!
//! - Record kinds `0x80..=0xff` are *optional*: a reader that does not know one skips it.
//!   Unknown kinds below `0x80` are errors (they would change the meaning of the file).
//! - Readers ignore flag bits they do not know. A change that old readers must refuse bumps the
//!   version byte (and the magic's digit).

use std::io::{self, BufReader, Read, Write};

use bytes::Bytes;
use psm_evidence::{EvidenceKey, Hash, KeyId, PublicKey, HASH_LEN, SIG_LEN};
use zstd::stream::raw::{CParameter, InBuffer, Operation, OutBuffer};

use crate::crypt::RecordingKey;
use crate::{CloseSummary, Direction, FormatError, RecordingMeta};

mod chain;
mod listing;
pub mod pack;
mod reader;
mod tail;
mod v2;
mod writer;

pub use chain::ChainHash;
use chain::ChunkHasher;
pub use listing::{info, list, path_for, scan, valid_id, Listing, RecordingInfo};

pub use reader::RecordingReader;
use reader::{Fill, Src};
pub use writer::RecordingWriter;

/// File name extension of recordings (without the dot).
pub const EXTENSION: &str = "psmrec";

/// The first bytes of an unencrypted recording with SHA-256 seals (format version 1; read,
/// no longer written).
pub const MAGIC: &[u8; 8] = b"PSMREC1\n";

/// The first bytes of an encrypted recording with SHA-256 seals (format version 2; read, no
/// longer written).
pub const MAGIC_ENCRYPTED: &[u8; 8] = b"PSMREC2\n";

/// The first bytes of an unencrypted recording with BLAKE3 seals (format version 3).
pub const MAGIC_BLAKE3: &[u8; 8] = b"PSMREC3\n";

/// The first bytes of an encrypted recording with BLAKE3 seals (format version 4).
pub const MAGIC_ENCRYPTED_BLAKE3: &[u8; 8] = b"PSMREC4\n";

/// Version byte of the HEADER record of an unencrypted recording with SHA-256 seals.
pub const FORMAT_VERSION: u8 = 1;

/// Version byte of the HEADER record of an encrypted recording with SHA-256 seals.
pub const FORMAT_VERSION_ENCRYPTED: u8 = 2;

/// Version byte of the HEADER record of an unencrypted recording with BLAKE3 seals.
pub const FORMAT_VERSION_BLAKE3: u8 = 3;

/// Version byte of the HEADER record of an encrypted recording with BLAKE3 seals.
pub const FORMAT_VERSION_ENCRYPTED_BLAKE3: u8 = 4;

/// The first bytes of an unencrypted recording whose seals cover its chunks as written
/// (format version 5, what psm-recorder writes without a recording key).
pub const MAGIC_CHUNKED: &[u8; 8] = b"PSMREC5\n";

/// Version byte of the HEADER record of format version 5.
pub const FORMAT_VERSION_CHUNKED: u8 = 5;

/// How a recording's bytes are laid out, as its magic says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Format versions 3 and 1: one zstd stream; the seals sit inside it and cover the
    /// decompressed bytes.
    Stream,
    /// Format version 5: clear records around CHUNK records that each hold zstd frames of
    /// records; the seals cover the bytes as written.
    Chunks,
    /// Format versions 4 and 2: as [`Layout::Chunks`], each chunk encrypted.
    Encrypted,
}

/// What a magic says: the format version its HEADER must carry, the layout, and the seals'
/// hash. `None`: not a psm recording (or a version this build does not know).
pub(crate) fn layout_of(magic: &[u8]) -> Option<(u8, Layout, ChainHash)> {
    match magic.get(..MAGIC.len())? {
        m if m == MAGIC => Some((FORMAT_VERSION, Layout::Stream, ChainHash::Sha256)),
        m if m == MAGIC_ENCRYPTED => Some((
            FORMAT_VERSION_ENCRYPTED,
            Layout::Encrypted,
            ChainHash::Sha256,
        )),
        m if m == MAGIC_BLAKE3 => Some((FORMAT_VERSION_BLAKE3, Layout::Stream, ChainHash::Blake3)),
        m if m == MAGIC_ENCRYPTED_BLAKE3 => Some((
            FORMAT_VERSION_ENCRYPTED_BLAKE3,
            Layout::Encrypted,
            ChainHash::Blake3,
        )),
        m if m == MAGIC_CHUNKED => {
            Some((FORMAT_VERSION_CHUNKED, Layout::Chunks, ChainHash::Blake3))
        }
        _ => None,
    }
}

/// The magic and HEADER version a writer uses for `layout` with `hash` (format version 5 has
/// BLAKE3 seals only: a chunked layout asked with SHA-256 seals is version 1's stream).
fn layout_for(layout: Layout, hash: ChainHash) -> (&'static [u8; 8], u8, Layout) {
    match (layout, hash) {
        (Layout::Stream | Layout::Chunks, ChainHash::Sha256) => {
            (MAGIC, FORMAT_VERSION, Layout::Stream)
        }
        (Layout::Encrypted, ChainHash::Sha256) => {
            (MAGIC_ENCRYPTED, FORMAT_VERSION_ENCRYPTED, Layout::Encrypted)
        }
        (Layout::Stream, ChainHash::Blake3) => {
            (MAGIC_BLAKE3, FORMAT_VERSION_BLAKE3, Layout::Stream)
        }
        (Layout::Chunks, ChainHash::Blake3) => {
            (MAGIC_CHUNKED, FORMAT_VERSION_CHUNKED, Layout::Chunks)
        }
        (Layout::Encrypted, ChainHash::Blake3) => (
            MAGIC_ENCRYPTED_BLAKE3,
            FORMAT_VERSION_ENCRYPTED_BLAKE3,
            Layout::Encrypted,
        ),
    }
}

/// Largest record body written or accepted.
pub const MAX_RECORD: usize = 16 * 1024 * 1024;

const KIND_HEADER: u8 = 0x01;
const KIND_DATA: u8 = 0x02;
const KIND_RESIZE: u8 = 0x03;
const KIND_CLOSE: u8 = 0x04;
pub(crate) const KIND_CHUNK: u8 = 0x05;
const KIND_SEAL: u8 = 0x80;
const KIND_TRAILER: u8 = 0x81;
/// HEADER flag: every chunk ends with a SEAL record.
pub const FLAG_SEALED: u8 = 0x01;
/// HEADER flag: the chunks are encrypted (format versions 4 and 2).
pub const FLAG_ENCRYPTED: u8 = 0x02;
/// TRAILER flag: the recording ended with the session's own CLOSE.
const TRAILER_COMPLETE: u8 = 0x01;
/// What a trailer's signature covers, before the trailer's bytes.
pub const TRAILER_DOMAIN: &[u8] = b"psm recording trailer v1\0";
/// `u64 chunk, u64 ts_us` before a seal's hash.
const SEAL_PREFIX: usize = 16;
/// The whole SEAL body.
const SEAL_BODY: usize = SEAL_PREFIX + HASH_LEN;
/// First optional record kind: readers skip optional kinds they do not know.
const FIRST_OPTIONAL_KIND: u8 = 0x80;

/// `u64 ts_us, u32 channel, u8 direction`.
const DATA_PREFIX: usize = 13;
/// `[u8 kind][u32 len]`.
const RECORD_HEAD: usize = 5;
/// Capacity of the reader's decompressed-bytes buffer.
const READ_BUFFER: usize = 128 * 1024;
/// Largest zstd window the reader accepts, as a power of two (8 MiB). The writer's level uses
/// 2 MiB; without a limit a damaged or forged frame could make the decoder take 128 MiB.
const WINDOW_LOG_MAX: u32 = 23;

/// One record of a recording, after the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Bytes seen on a channel.
    Data {
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
        /// Microseconds since the session started.
        ts_us: u64,
        /// SSH channel number on the user side.
        channel: u32,
        /// Columns.
        cols: u32,
        /// Rows.
        rows: u32,
    },
    /// The session ended.
    Close {
        /// Microseconds since the session started.
        ts_us: u64,
        /// How it ended.
        summary: CloseSummary,
    },
}

impl Record {
    /// Microseconds since the session started.
    pub fn ts_us(&self) -> u64 {
        match self {
            Record::Data { ts_us, .. }
            | Record::Resize { ts_us, .. }
            | Record::Close { ts_us, .. } => *ts_us,
        }
    }
}

fn direction_from_u8(v: u8) -> Result<Direction, FormatError> {
    match v {
        0 => Ok(Direction::Input),
        1 => Ok(Direction::Output),
        2 => Ok(Direction::Error),
        other => Err(FormatError::Malformed(format!("unknown direction {other}"))),
    }
}

fn put_head(out: &mut Vec<u8>, kind: u8, body_len: usize) {
    out.push(kind);
    // callers keep bodies below MAX_RECORD, which fits a u32
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
}

fn json_body<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    let json = serde_json::to_vec(value)
        .map_err(|e| FormatError::Malformed(format!("cannot encode json: {e}")))?;
    if json.len() + 16 > MAX_RECORD {
        return Err(FormatError::Malformed("json record too large".into()));
    }
    Ok(json)
}

/// One seal as the reader found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seal {
    /// The chunk number it carries.
    pub chunk: u64,
    /// The largest `ts_us` written before it.
    pub ts_us: u64,
    /// The hash it carries.
    pub stored: Hash,
    /// The hash of what was actually read, chained on the previous seal's *stored* hash.
    pub computed: Hash,
}

/// A trailer as the reader found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// The recording ended with the session's own CLOSE (not one the recorder made up).
    pub complete: bool,
    /// Chunks it says the recording has.
    pub chunks: u64,
    /// The last seal's hash it names.
    pub final_hash: Hash,
    /// The key that signed it.
    pub key_id: KeyId,
    /// Session it names.
    pub session_id: String,
    /// Recording it names.
    pub recording_id: String,
    /// The bytes the signature covers (after [`TRAILER_DOMAIN`]).
    signed: Vec<u8>,
    signature: [u8; SIG_LEN],
}

impl Trailer {
    fn encode_signed(
        complete: bool,
        chunks: u64,
        final_hash: &Hash,
        key_id: KeyId,
        session_id: &str,
        recording_id: &str,
    ) -> Vec<u8> {
        let sid = &session_id.as_bytes()[..session_id.len().min(u16::MAX as usize)];
        let rid = &recording_id.as_bytes()[..recording_id.len().min(u16::MAX as usize)];
        let mut b = Vec::with_capacity(64 + sid.len() + rid.len());
        b.push(1);
        b.push(if complete { TRAILER_COMPLETE } else { 0 });
        b.extend_from_slice(&chunks.to_be_bytes());
        b.extend_from_slice(final_hash);
        b.extend_from_slice(&key_id.0);
        b.extend_from_slice(&(sid.len() as u16).to_be_bytes());
        b.extend_from_slice(sid);
        b.extend_from_slice(&(rid.len() as u16).to_be_bytes());
        b.extend_from_slice(rid);
        b
    }

    fn decode(body: &[u8]) -> Result<Trailer, String> {
        let bad = |what: &str| format!("malformed trailer: {what}");
        if body.len() < SIG_LEN {
            return Err(bad("too short"));
        }
        let (signed, sig) = body.split_at(body.len() - SIG_LEN);
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let piece = signed.get(at..at + n).ok_or_else(|| bad("too short"))?;
            at += n;
            Ok(piece)
        };
        let version = take(1)?[0];
        if version != 1 {
            return Err(bad(&format!("unknown version {version}")));
        }
        let flags = take(1)?[0];
        let chunks = be_u64(take(8)?);
        let mut final_hash = [0u8; HASH_LEN];
        final_hash.copy_from_slice(take(HASH_LEN)?);
        let mut kid = [0u8; 8];
        kid.copy_from_slice(take(8)?);
        let n = u16::from_be_bytes([take(1)?[0], take(1)?[0]]) as usize;
        let session_id = String::from_utf8_lossy(take(n)?).into_owned();
        let n = u16::from_be_bytes([take(1)?[0], take(1)?[0]]) as usize;
        let recording_id = String::from_utf8_lossy(take(n)?).into_owned();
        if at != signed.len() {
            return Err(bad("trailing bytes"));
        }
        let mut signature = [0u8; SIG_LEN];
        signature.copy_from_slice(sig);
        Ok(Trailer {
            complete: flags & TRAILER_COMPLETE != 0,
            chunks,
            final_hash,
            key_id: KeyId(kid),
            session_id,
            recording_id,
            signed: signed.to_vec(),
            signature,
        })
    }

    /// Whether `key` signed this trailer.
    pub fn signed_by(&self, key: &PublicKey) -> bool {
        let mut msg = Vec::with_capacity(TRAILER_DOMAIN.len() + self.signed.len());
        msg.extend_from_slice(TRAILER_DOMAIN);
        msg.extend_from_slice(&self.signed);
        key.key_id() == self.key_id && key.verify(&msg, &self.signature)
    }
}

/// What the reader found next: a record, or the evidence around records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A record.
    Record(Record),
    /// The end of a chunk.
    Seal(Seal),
    /// The signed trailer.
    Trailer(Trailer),
    /// A SEAL or TRAILER that does not parse (`kind`, why).
    Bad(u8, String),
    /// A chunk whose records are not read: an encrypted one read without the key, or any chunk
    /// of a reader told to check seals only ([`RecordingReader::seals_only`]). The number it
    /// should be, counting from the last seal.
    Encrypted(u64),
}

fn data_prefix(body: &[u8]) -> Result<(u64, u32, Direction), FormatError> {
    let ts_us = be_u64(&body[0..8]);
    let channel = be_u32(&body[8..12]);
    let direction = direction_from_u8(body[12])?;
    Ok((ts_us, channel, direction))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Parses a complete non-DATA-payload record; `None` for skipped optional kinds.
fn parse_record(kind: u8, body: &[u8]) -> Result<Option<Record>, FormatError> {
    let short = || FormatError::Malformed(format!("record of kind {kind:#04x} too short"));
    match kind {
        KIND_DATA => {
            if body.len() < DATA_PREFIX {
                return Err(short());
            }
            let (ts_us, channel, direction) = data_prefix(body)?;
            Ok(Some(Record::Data {
                ts_us,
                channel,
                direction,
                data: Bytes::new(),
            }))
        }
        KIND_RESIZE => {
            if body.len() != 20 {
                return Err(FormatError::Malformed("resize record of wrong size".into()));
            }
            Ok(Some(Record::Resize {
                ts_us: be_u64(&body[0..8]),
                channel: be_u32(&body[8..12]),
                cols: be_u32(&body[12..16]),
                rows: be_u32(&body[16..20]),
            }))
        }
        KIND_CLOSE => {
            if body.len() < 8 {
                return Err(short());
            }
            let summary = serde_json::from_slice(&body[8..])
                .map_err(|e| FormatError::Malformed(format!("close summary: {e}")))?;
            Ok(Some(Record::Close {
                ts_us: be_u64(&body[0..8]),
                summary,
            }))
        }
        KIND_HEADER => Err(FormatError::Malformed("second header record".into())),
        k if k >= FIRST_OPTIONAL_KIND => Ok(None),
        k => Err(FormatError::Malformed(format!(
            "unknown record kind {k:#04x}"
        ))),
    }
}

/// Where each zstd frame (chunk, or the trailer's frame) of a recording lies in its bytes, in
/// order; stops at the first bytes that are not a whole frame. For tools and tests that look at
/// a recording's chunks one by one (the trailer's frame is the last one of a signed recording).
///
/// For a chunked recording (format version 5, or encrypted): the clear header, then each chunk
/// with its CLOSE and SEAL (the first is the header's seal alone), then the trailer.
pub fn frame_spans(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    match layout_of(bytes) {
        Some((_, Layout::Stream, _)) => {}
        Some(_) => return v2::unit_spans(bytes),
        None => return out,
    }
    let mut at = MAGIC.len();
    while at < bytes.len() {
        match zstd::zstd_safe::find_frame_compressed_size(&bytes[at..]) {
            Ok(n) if n > 0 && at + n <= bytes.len() => {
                out.push(at..at + n);
                at += n;
            }
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests;
