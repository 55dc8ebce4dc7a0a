//! Recordings on disk as listings see them: ids and paths, what one file holds ([`info`]), and
//! every recording in a folder ([`scan`], [`list`]).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::{Item, Record, RecordingReader, EXTENSION};
use crate::{CloseSummary, FormatError, RecordingMeta};

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
