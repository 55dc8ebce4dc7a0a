//! The relay <-> recorder contract and the psm recording file format.
//!
//! - [`wire`]: frames the relay sends to psm-recorder over its Unix socket, and its replies.
//! - [`file`](mod@file): the on-disk recording (one zstd-compressed file per session), its writer and reader.
//! - [`export`]: replay timing, asciicast v2 and plain-text renderings of a recording.
//! - [`fuzz`](mod@fuzz): the entry points of the fuzz targets and corpus replay tests.
//! - [`sanitize`]: the filter that makes replayed terminal output safe for the auditor's terminal.
//! - [`verify`](mod@verify): checks a recording's seal chain and signed trailer, and says what is
//!   wrong and where (used by `psmctl recordings verify` and `psm-verify`).
//!
//! What it does not do: open sockets. Readers and writers take any `Read`/`Write`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod export;
pub mod file;
pub mod fuzz;
pub mod sanitize;
pub mod verify;
pub mod wire;

pub use wire::{CloseSummary, Direction, Frame, RecordingMeta, Reply};

/// Errors of the frame codec and the file format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Bytes that do not parse as the format says.
    #[error("malformed recording data: {0}")]
    Malformed(String),
    /// An I/O error from the underlying reader or writer.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
