//! The audit log's segments on disk: closed ones in `audit/` beside the live `audit.jsonl`,
//! named `audit-<first seq, 20 digits>.jsonl` so that their names sort by `seq`; and the
//! readers that follow them (`psmctl audit tail`, `psmctl audit verify`, the retention events
//! `recordings verify` looks for).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use psm_control_api::AuditEvent;
use psm_evidence::audit::{self as chain, AuditReport, ChainVerifier};
use psm_evidence::{Hash, PublicKey};

use super::{last_lines, last_seq, AuditError};

/// The directory of closed segments, beside the live segment.
pub const SEGMENT_DIR: &str = "audit";

/// The directory of closed segments of the live segment `live`.
pub fn segment_dir(live: &Path) -> PathBuf {
    live.parent().unwrap_or(Path::new(".")).join(SEGMENT_DIR)
}

/// The file name of the closed segment whose first event is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("audit-{first_seq:020}.jsonl")
}

/// The first `seq` a closed segment's file name says; none for other names.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One closed segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedSegment {
    /// Its path.
    pub path: PathBuf,
    /// Its file name.
    pub file: String,
    /// Its first `seq` (from its name).
    pub first_seq: u64,
    /// Its size.
    pub bytes: u64,
    /// When it was last written, i.e. closed (ms since the epoch).
    pub modified_ms: u64,
}

/// The closed segments of the live segment `live`, oldest first (none when `audit/` is
/// absent).
pub fn closed_segments(live: &Path) -> io::Result<Vec<ClosedSegment>> {
    let dir = segment_dir(live);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(file) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Some(first_seq) = parse_segment_name(&file) else {
            continue;
        };
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        out.push(ClosedSegment {
            path: entry.path(),
            file,
            first_seq,
            bytes: meta.len(),
            modified_ms,
        });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// Every segment in `seq` order: the closed ones, then the live one (when it exists).
pub fn segment_paths(live: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = closed_segments(live)?.into_iter().map(|s| s.path).collect();
    if live.exists() {
        out.push(live.to_path_buf());
    }
    Ok(out)
}

/// The `seq` and time of the first event of the segment at `path` (none when it has none).
pub fn first_event(path: &Path) -> io::Result<Option<(u64, u64)>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for line in BufReader::new(file).split(b'\n') {
        if let Ok(e) = serde_json::from_slice::<AuditEvent>(&line?) {
            return Ok(Some((e.seq, e.ts_ms)));
        }
    }
    Ok(None)
}

/// The last `seq` of the segment at `path` and the hash of its last line: what the next line
/// carries (none when it is empty).
pub fn segment_tail(path: &Path) -> io::Result<Option<(u64, Hash)>> {
    let mut file = File::open(path)?;
    let Some(line) = last_lines(&mut file, 1)?.pop() else {
        return Ok(None);
    };
    Ok(Some((last_seq(&mut file)?, chain::line_hash(&line))))
}

/// The last `n` events of the log whose live segment is `path`, oldest first, reading closed
/// segments when the live one holds fewer; lines that do not parse are skipped. A missing log
/// reads as empty.
pub fn read_tail(path: &Path, n: usize) -> Result<Vec<AuditEvent>, AuditError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuditError::Io { path, source }
    };
    let mut out: Vec<AuditEvent> = Vec::new();
    for seg in segment_paths(path).map_err(io_err(path))?.iter().rev() {
        if out.len() >= n {
            break;
        }
        let mut file = match File::open(seg) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // rotated away meanwhile
            Err(e) => return Err(io_err(seg)(e)),
        };
        let lines = last_lines(&mut file, n - out.len()).map_err(io_err(seg))?;
        let mut events: Vec<AuditEvent> = lines
            .iter()
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        events.append(&mut out);
        out = events;
    }
    Ok(out)
}

/// Checks every segment of the log whose live segment is `path` as one chain: hash chain,
/// `seq` order and checkpoints (signatures against `key`), problems located by segment and
/// line, segments retention deleted told from missing ones. A log that was never rotated is
/// read as the one file it is.
pub fn verify(path: &Path, key: Option<&PublicKey>) -> Result<AuditReport, AuditError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuditError::Io { path, source }
    };
    let paths = segment_paths(path).map_err(io_err(path))?;
    if paths.is_empty() {
        return Err(io_err(path)(io::Error::from(io::ErrorKind::NotFound)));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let named = paths.len() > 1;
    let mut v = ChainVerifier::new(key);
    for p in &paths {
        let file = match File::open(p) {
            Ok(f) => f,
            // deleted by retention since the listing: its retention event is in the live
            // segment, read last
            Err(e) if e.kind() == io::ErrorKind::NotFound && p != path => continue,
            Err(e) => return Err(io_err(p)(e)),
        };
        let name = p.strip_prefix(base).unwrap_or(p).display().to_string();
        v.read(named.then_some(name.as_str()), BufReader::new(file))
            .map_err(io_err(p))?;
    }
    Ok(v.finish())
}
