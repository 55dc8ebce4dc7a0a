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

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use psm_evidence::{EvidenceKey, Hash, KeyId, PublicKey, HASH_LEN, SIG_LEN};
use zstd::stream::raw::{CParameter, InBuffer, Operation, OutBuffer};

use crate::crypt::RecordingKey;
use crate::{CloseSummary, Direction, FormatError, RecordingMeta};

mod chain;
pub mod pack;
mod reader;
mod v2;
mod writer;

pub use chain::ChainHash;
use chain::ChunkHasher;

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
const KIND_CHUNK: u8 = 0x05;
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

/// A recording on disk, as [`list`] and [`info`] describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingInfo {
    /// Recording id: the file name without its extension.
    pub id: String,
    /// What the recording is of.
    pub meta: RecordingMeta,
    /// How the session ended; `None` while it runs or when the recorder died.
    pub summary: Option<CloseSummary>,
    /// Time from the session start to its last record, in milliseconds.
    pub duration_ms: u64,
    /// Size of the file (compressed).
    pub size_bytes: u64,
    /// Where the file is.
    pub path: PathBuf,
}

/// Whether `id` is a valid recording id: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The path of recording `id` in `dir`. Rejects ids that are not `[A-Za-z0-9_-]{1,64}`, so an
/// id can never point outside `dir`.
pub fn path_for(dir: &Path, id: &str) -> Result<PathBuf, FormatError> {
    if !valid_id(id) {
        return Err(FormatError::Malformed(format!(
            "invalid recording id {id:?} (expected 1 to 64 of A-Z a-z 0-9 _ -)"
        )));
    }
    Ok(dir.join(format!("{id}.{EXTENSION}")))
}

/// Reads a whole recording file and describes it.
pub fn info(path: &Path) -> Result<RecordingInfo, FormatError> {
    let file = File::open(path)?;
    let size_bytes = file.metadata()?.len();
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    // a chunked recording shows its header, seals and CLOSE without opening a chunk (or
    // needing the key of an encrypted one): enough here, and a damaged chunk does not hide
    // the recording from listings
    let mut reader = RecordingReader::open(file)?;
    reader.seals_only();
    let mut summary = None;
    let mut last_ts = 0u64;
    while let Some(item) = reader.next_any(false)? {
        match item {
            Item::Record(rec) => {
                last_ts = last_ts.max(rec.ts_us());
                if let Record::Close { summary: s, .. } = rec {
                    summary = Some(s);
                }
            }
            Item::Seal(seal) => last_ts = last_ts.max(seal.ts_us),
            _ => {}
        }
    }
    Ok(RecordingInfo {
        id,
        meta: reader.meta,
        summary,
        duration_ms: last_ts / 1000,
        size_bytes,
        path: path.to_path_buf(),
    })
}

/// What [`scan`] found in a folder of recordings.
#[derive(Debug, Default)]
pub struct Listing {
    /// The recordings that could be read, sorted by start time (then id).
    pub recordings: Vec<RecordingInfo>,
    /// The `*.psmrec` files that could not be read, with why.
    pub unreadable: Vec<(PathBuf, FormatError)>,
}

/// Every `*.psmrec` in `dir`, read or not. A missing `dir` is empty.
pub fn scan(dir: &Path) -> Result<Listing, FormatError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
        Err(e) => return Err(e.into()),
    };
    let mut found = Vec::new();
    let mut failed = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) || !path.is_file() {
            continue;
        }
        match info(&path) {
            Ok(i) => found.push(i),
            Err(e) => failed.push((path, e)),
        }
    }
    found.sort_by(|a, b| (a.meta.start_ms, &a.id).cmp(&(b.meta.start_ms, &b.id)));
    Ok(Listing {
        recordings: found,
        unreadable: failed,
    })
}

/// Every `*.psmrec` in `dir`, sorted by `meta.start_ms`. A missing `dir` is an empty list;
/// files that cannot be read are skipped (see [`scan`] for their errors).
pub fn list(dir: &Path) -> Result<Vec<RecordingInfo>, FormatError> {
    Ok(scan(dir)?.recordings)
}

#[cfg(test)]
mod tests {
    use super::writer::{next_level, ZSTD_FAST_LEVEL, ZSTD_LEVEL};
    use super::*;

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
}
