//! The relay <-> recorder contract and the psm recording file format.
//!
//! - [`wire`]: frames the relay sends to psm-recorder over its Unix socket, and its replies.
//! - [`file`](mod@file): the on-disk recording (one zstd-compressed file per session), its writer and reader.
//! - [`crypt`]: the recording key and the encryption of recordings at rest (AES-256-GCM).
//! - [`export`]: replay timing, asciicast v2 and plain-text renderings of a recording.
//! - [`fuzz`](mod@fuzz): the entry points of the fuzz targets and corpus replay tests.
//! - [`sanitize`]: the filter that makes replayed terminal output safe for the auditor's terminal.
//! - [`verify`](mod@verify): checks a recording's seal chain and signed trailer, and says what is
//!   wrong and where (used by `psmctl recordings verify` and `psm-verify`).
//!
//! What it does not do: open sockets. Readers and writers take any `Read`/`Write`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod crypt;
pub mod export;
pub mod file;
pub mod fuzz;
pub mod sanitize;
pub mod verify;
pub mod wire;

pub use wire::{CloseSummary, Direction, Frame, FrameRef, RecordingMeta, Reply};

/// Errors of the frame codec and the file format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Bytes that do not parse as the format says.
    #[error("malformed recording data: {0}")]
    Malformed(String),
    /// An I/O error from the underlying reader or writer.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The recording is encrypted and was opened without its key.
    #[error("recording {recording} is encrypted with key {key_id}")]
    Encrypted {
        /// The recording id its header names.
        recording: String,
        /// The key it needs.
        key_id: psm_evidence::KeyId,
    },
    /// The recording is encrypted with another key than the one given.
    #[error(
        "recording {recording} is encrypted with key {key_id}, not with the given key {given}"
    )]
    WrongKey {
        /// The recording id its header names.
        recording: String,
        /// The key it needs.
        key_id: psm_evidence::KeyId,
        /// The key given.
        given: psm_evidence::KeyId,
    },
    /// A chunk of an encrypted recording does not decrypt with its key.
    #[error("chunk {chunk} does not decrypt with key {key_id}: modified, moved or damaged (recordings verify says where)")]
    Decrypt {
        /// The chunk's number.
        chunk: u64,
        /// The key.
        key_id: psm_evidence::KeyId,
    },
}
