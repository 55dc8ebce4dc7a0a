//! [`CliError`]: why a psmctl command failed, worded as psmctl prints it.

use std::io;
use std::path::{Path, PathBuf};

use crate::audit::AuditError;
use crate::client::ClientError;
use crate::recordings;
use crate::scan::ScanError;
use crate::validate::Invalid;

/// Why a psmctl command failed; `Display` is the whole message psmctl prints.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon could not be reached or refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An argument did not pass validation.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A file named on the command line could not be read or used.
    #[error("{}: {reason}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Standard input could not be read or held nothing usable.
    #[error("{0}")]
    Stdin(String),
    /// A bad combination of arguments.
    #[error("{0}")]
    Usage(String),
    /// `policy check` answered "denied" (already printed; exit status 1).
    #[error("denied")]
    Denied,
    /// A verification found something wrong (already printed; exit status 1).
    #[error("verification failed")]
    Unverified,
    /// The evidence key could not be read.
    #[error(transparent)]
    Evidence(#[from] psm_evidence::KeyError),
    /// A host-key scan failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// An RDP certificate scan failed.
    #[error(transparent)]
    RdpScan(#[from] crate::scan_rdp::RdpScanError),
    /// A recording could not be read.
    #[error(transparent)]
    Recording(#[from] recordings::RecordingError),
    /// The search index could not be read or rebuilt.
    #[error(transparent)]
    Review(#[from] crate::review::ReviewError),
    /// The recordings directory could not be listed.
    #[error(transparent)]
    Format(#[from] psm_recorder_format::FormatError),
    /// The audit log could not be read.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Output could not be written.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
    /// This process does not own the data directory, so it may not read its files.
    #[error(
        "permission denied: uid {uid} does not own the data directory {} (owner uid {owner})",
        .dir.display()
    )]
    NotOwner {
        /// Effective uid of psmctl.
        uid: u32,
        /// The data directory (absolute).
        dir: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// The data directory does not exist or cannot be inspected.
    #[error("{}", data_dir_error(.dir, .source))]
    DataDir {
        /// The data directory (absolute).
        dir: PathBuf,
        /// Why it could not be inspected.
        source: io::Error,
    },
}

fn data_dir_error(dir: &Path, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::NotFound {
        format!(
            "no data directory at {}; give --data-dir DIR or set PSM_DATA_DIR to the directory \
             psm runs with",
            dir.display()
        )
    } else {
        format!("cannot access the data directory {}: {e}", dir.display())
    }
}

impl CliError {
    /// Whether this is a closed standard output (`psmctl … | head`), which is not worth a
    /// message.
    pub fn is_broken_pipe(&self) -> bool {
        match self {
            CliError::Output(e)
            | CliError::Recording(recordings::RecordingError::Output(e))
            | CliError::Recording(recordings::RecordingError::Format(
                psm_recorder_format::FormatError::Io(e),
            )) => e.kind() == io::ErrorKind::BrokenPipe,
            _ => false,
        }
    }
}
