//! `psmctl recordings …`: lists, replays and exports the recordings psm-recorder wrote under
//! `<data-dir>/recordings`, through `psm-recorder-format`.
//!
//! A recording holds what a possibly hostile session printed. `play` sends it through
//! `psm_recorder_format::sanitize` unless asked for the raw bytes (`--raw`), so a replay cannot
//! set the auditor's clipboard or title, make the terminal answer into the auditor's shell, or
//! change the keyboard's modes; the text and asciicast exports escape control and bidi
//! characters (see `psm_recorder_format::export`), and all of them run in bounded memory.
//!
//! A closed recording's duration is its close summary's `end_ms` minus its meta's `start_ms`,
//! the same two instants the `session_end` audit event has, and it is printed with the same
//! function as `audit tail` (`timefmt::duration`), so both show the same figure. A recording
//! still running (or cut short) lasts up to its last record. The caller
//! ([`crate::cli`]) checks first that it may read the data directory.
//!
//! `verify` checks recordings' seal chains and signed trailers against the evidence public key
//! (`psm_recorder_format::verify`); it needs no recording key, encrypted or not. Replay, watch
//! and export of an encrypted recording take the recording key ([`crate::reckey`]).
//!
//! What it does not do: parse the recording format itself, or talk to psm-recorder.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use psm_control_api::Escaped;
use psm_evidence::PublicKey;
use psm_recorder_format::export::{self, Replay};
use psm_recorder_format::file::{self, RecordingInfo, RecordingReader};
use psm_recorder_format::verify::Report;
use psm_recorder_format::FormatError;
use serde::Serialize;

use crate::datadir::DataDir;

mod frames;
mod rdp;
#[cfg(test)]
mod rdp_export_tests;

pub use rdp::parse_every;

/// Errors of the recording commands.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// No recording with this id.
    #[error("no recording '{id}' in {}", .dir.display())]
    NotFound {
        /// The id asked for.
        id: String,
        /// The recordings directory.
        dir: std::path::PathBuf,
    },
    /// The recordings directory could not be listed.
    #[error("cannot list recordings in {}: {source}", .dir.display())]
    List {
        /// The recordings directory.
        dir: std::path::PathBuf,
        /// What failed.
        source: FormatError,
    },
    /// The recording could not be read or rendered.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The output could not be written.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// The recording is encrypted and no recording key is configured.
    #[error("recording {recording} is encrypted with key {key_id}; configure [recorder] encryption_key_file in psm.toml")]
    KeyNeeded {
        /// The recording.
        recording: String,
        /// The key it needs.
        key_id: psm_evidence::KeyId,
    },
    /// The configured recording key cannot be used.
    #[error(transparent)]
    Key(#[from] psm_recorder_format::crypt::KeyFileError),
    /// An RDP recording could not be exported this way (the message says why and what to do).
    #[error("{0}")]
    Rdp(String),
    /// `psm.toml` cannot be read.
    #[error("config {}: {message}", .path.display())]
    Config {
        /// The config file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
}
use crate::table::write_table;
use crate::timefmt;

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// asciicast v2 (asciinema).
    Asciicast,
    /// Plain text of the terminal output (SSH); typed lines and session events (RDP).
    Text,
    /// PNG frames of the screen into the directory `-o` names (RDP).
    Png,
    /// A video of the screen into the file `-o` names, `.webm` (VP9) or `.mp4` (H.264),
    /// encoded by the system ffmpeg (RDP).
    Video,
}

/// Default interval between two frames of a PNG or video export: one second of recorded time.
pub const DEFAULT_EVERY_US: u64 = 1_000_000;

/// A recording as printed by `recordings list --json`.
#[derive(Clone, Debug, Serialize)]
pub struct RecordingRow {
    /// Recording id.
    pub id: String,
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
    /// Start, ms since the epoch.
    pub start_ms: u64,
    /// Duration in ms: end minus start when complete, else up to the last record.
    pub duration_ms: u64,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Whether the recording was closed (the session ended and the file is complete).
    pub complete: bool,
    /// End, ms since the epoch, when complete.
    pub end_ms: Option<u64>,
    /// Why the session ended, when complete.
    pub reason: Option<String>,
    /// Exit status, when the target sent one.
    pub exit_status: Option<u32>,
    /// The recording file.
    pub path: String,
}

impl From<&RecordingInfo> for RecordingRow {
    fn from(r: &RecordingInfo) -> Self {
        RecordingRow {
            id: r.id.clone(),
            session_id: r.meta.session_id.clone(),
            user: r.meta.user.clone(),
            target: r.meta.target.clone(),
            account: r.meta.account.clone(),
            source: r.meta.source.clone(),
            start_ms: r.meta.start_ms,
            duration_ms: match &r.summary {
                Some(s) => s.end_ms.saturating_sub(r.meta.start_ms),
                None => r.duration_ms,
            },
            size_bytes: r.size_bytes,
            complete: r.summary.is_some(),
            end_ms: r.summary.as_ref().map(|s| s.end_ms),
            reason: r.summary.as_ref().map(|s| s.reason.clone()),
            exit_status: r.summary.as_ref().and_then(|s| s.exit_status),
            path: r.path.display().to_string(),
        }
    }
}

/// The recordings of `data_dir`, oldest first (none when the recordings directory does not
/// exist yet; an error when it cannot be read).
pub fn list(data_dir: &Path) -> Result<Vec<RecordingRow>, RecordingError> {
    let dir = DataDir::new(data_dir).recordings();
    let found = file::list(&dir).map_err(|source| RecordingError::List {
        dir: dir.clone(),
        source,
    })?;
    let mut rows: Vec<RecordingRow> = found.iter().map(RecordingRow::from).collect();
    rows.sort_by(|a, b| (a.start_ms, &a.id).cmp(&(b.start_ms, &b.id)));
    Ok(rows)
}

/// Prints recordings as a table or a JSON array.
pub fn print_list(out: &mut dyn Write, rows: &[RecordingRow], json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, rows)?;
        return writeln!(out);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.user.clone(),
                format!("{}@{}", r.account, r.target),
                r.source.clone(),
                timefmt::utc(r.start_ms),
                timefmt::duration(r.duration_ms),
                timefmt::size(r.size_bytes),
                match &r.reason {
                    Some(reason) => reason.clone(),
                    None => "(in progress or cut short)".to_string(),
                },
            ]
        })
        .collect();
    write_table(
        out,
        &[
            "ID",
            "USER",
            "ACCOUNT",
            "SOURCE",
            "STARTED (UTC)",
            "DURATION",
            "SIZE",
            "END",
        ],
        &table,
    )
}

/// Verifies recording `id` against `key`.
pub fn verify(data_dir: &Path, id: &str, key: &PublicKey) -> Result<Report, RecordingError> {
    let f = open_file(data_dir, id)?;
    Ok(psm_recorder_format::verify::verify(f, id, Some(key)))
}

/// Verifies every recording (`*.psmrec`) against `key`, in the order of their ids.
pub fn verify_all(data_dir: &Path, key: &PublicKey) -> Result<Vec<Report>, RecordingError> {
    let dir = DataDir::new(data_dir).recordings();
    let list_err = |e: std::io::Error| RecordingError::List {
        dir: dir.clone(),
        source: FormatError::Io(e),
    };
    let mut ids = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry.map_err(list_err)?.path();
                if path.extension().and_then(|e| e.to_str()) != Some(file::EXTENSION) {
                    continue;
                }
                if let Some(id) = path.file_stem().and_then(|s| s.to_str()) {
                    if file::valid_id(id) {
                        ids.push(id.to_string());
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(list_err(e)),
    }
    ids.sort();
    ids.iter().map(|id| verify(data_dir, id, key)).collect()
}

/// Opens recording `id` for reading (`review`'s replay).
pub(crate) fn open_reader(
    data_dir: &Path,
    id: &str,
) -> Result<RecordingReader<File>, RecordingError> {
    open(data_dir, id)
}

fn open(data_dir: &Path, id: &str) -> Result<RecordingReader<File>, RecordingError> {
    crate::reckey::open_for_replay(data_dir, || open_file(data_dir, id))
}

fn open_file(data_dir: &Path, id: &str) -> Result<File, RecordingError> {
    let dir = DataDir::new(data_dir).recordings();
    let path = file::path_for(&dir, id)?;
    let f = File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            RecordingError::NotFound {
                id: id.to_string(),
                dir,
            }
        } else {
            RecordingError::Format(FormatError::Io(e))
        }
    })?;
    Ok(f)
}

/// A recording file being written: reading past its end waits for more, as long as `live`
/// says the session runs (asked at most twice a second); then the rest is read and the end
/// reported.
struct Follow<F: FnMut() -> bool> {
    file: File,
    live: F,
    checked: std::time::Instant,
    running: bool,
}

impl<F: FnMut() -> bool> std::io::Read for Follow<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.file.read(buf)?;
            if n > 0 || !self.running {
                return Ok(n);
            }
            if self.checked.elapsed() >= std::time::Duration::from_millis(500) {
                self.checked = std::time::Instant::now();
                self.running = (self.live)();
                if !self.running {
                    // the recorder flushes the end of a session before it is reported ended
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    continue;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// `sessions watch`: shows recording `id` as it is written (only what draws the screen), until
/// `live` says the session ended. An RDP session shows its typed lines and events instead.
pub fn watch(
    data_dir: &Path,
    id: &str,
    live: impl FnMut() -> bool,
    out: &mut dyn Write,
) -> Result<(), RecordingError> {
    let key = crate::reckey::key_if_encrypted(data_dir, open_file(data_dir, id)?)?;
    let reader = RecordingReader::open_with_key(
        Follow {
            file: open_file(data_dir, id)?,
            live,
            checked: std::time::Instant::now(),
            running: true,
        },
        key.as_ref(),
    )?;
    if rdp::is_rdp(reader.meta()) {
        // typed lines and events as they happen; the screen is in the exports
        return rdp::text(reader, out, true);
    }
    export::play(reader, f64::INFINITY, Replay::Safe, out)?;
    Ok(())
}

/// Writes recording `id` to `out` in `format` (text or asciicast; an RDP recording: text).
pub fn export(
    data_dir: &Path,
    id: &str,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<(), RecordingError> {
    let reader = open(data_dir, id)?;
    let is_rdp = rdp::is_rdp(reader.meta());
    match format {
        ExportFormat::Text if is_rdp => rdp::text(reader, &mut *out, false)?,
        ExportFormat::Asciicast if is_rdp => {
            return Err(RecordingError::Rdp(format!(
            "recording {} is an RDP session: asciicast is for SSH; use --format png, video or text",
            Escaped(id)
        )))
        }
        ExportFormat::Asciicast => export::asciicast(reader, &mut *out)?,
        ExportFormat::Text => export::text(reader, &mut *out)?,
        ExportFormat::Png | ExportFormat::Video => {
            return Err(RecordingError::Rdp(
                "--format png and video write to the directory or file -o names".into(),
            ))
        }
    };
    out.flush()?;
    Ok(())
}

/// Exports RDP recording `id` as PNG frames into the directory `path` or as the video file
/// `path`, one frame every `every_us` of recorded time; `ffmpeg` is the program encoding videos.
/// Returns the number of frames.
pub fn export_frames(
    data_dir: &Path,
    id: &str,
    format: ExportFormat,
    path: &Path,
    every_us: u64,
    ffmpeg: &std::ffi::OsStr,
) -> Result<u64, RecordingError> {
    let reader = open(data_dir, id)?;
    if !rdp::is_rdp(reader.meta()) {
        return Err(RecordingError::Rdp(format!(
            "recording {} is an SSH session: png and video are for RDP; use --format text or asciicast",
            Escaped(id)
        )));
    }
    match format {
        ExportFormat::Png => frames::png(reader, id, path, every_us),
        ExportFormat::Video => frames::video(reader, id, path, every_us, ffmpeg),
        ExportFormat::Text | ExportFormat::Asciicast => Err(RecordingError::Rdp(
            "text and asciicast exports write to standard output or -o FILE".into(),
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use psm_recorder_format::file::{Record, RecordingWriter};
    use psm_recorder_format::{CloseSummary, Direction, RecordingMeta};

    fn write_recording(data_dir: &Path, id: &str) {
        write_timed_recording(data_dir, id, 2_500_000, 1_700_000_002_500);
    }

    /// A recording that started at `1_700_000_000_000` whose close record is at `close_ts_us`
    /// (from the recorder's own start) and says the session ended at `end_ms`.
    pub(crate) fn write_timed_recording(data_dir: &Path, id: &str, close_ts_us: u64, end_ms: u64) {
        let dir = DataDir::new(data_dir).recordings();
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = File::create(file::path_for(&dir, id).expect("path")).expect("create");
        let meta = RecordingMeta {
            protocol: String::new(),
            recording_id: id.into(),
            session_id: "s1".into(),
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            source: "127.0.0.1:5000".into(),
            start_ms: 1_700_000_000_000,
        };
        let mut w = RecordingWriter::new(f, &meta).expect("writer");
        w.write(&Record::Resize {
            ts_us: 0,
            channel: 0,
            cols: 80,
            rows: 24,
        })
        .expect("resize");
        w.write(&Record::Data {
            ts_us: 1_000,
            channel: 0,
            direction: Direction::Output,
            data: bytes::Bytes::from_static(b"hello from web01\r\n"),
        })
        .expect("data");
        w.write(&Record::Close {
            ts_us: close_ts_us,
            summary: CloseSummary {
                end_ms,
                exit_status: Some(0),
                exit_signal: None,
                reason: "client closed".into(),
            },
        })
        .expect("close");
        w.finish().expect("finish");
    }

    #[test]
    fn duration_is_end_minus_start() {
        // the recorder's clock starts after login and target connection: its last record is at
        // 40 ms while the session lasted 150 ms
        let tmp = tempfile::tempdir().expect("tempdir");
        write_timed_recording(tmp.path(), "rec-1", 40_000, 1_700_000_000_150);
        let rows = list(tmp.path()).expect("list");
        assert_eq!(rows[0].duration_ms, 150);
        assert_eq!(rows[0].end_ms, Some(1_700_000_000_150));
        let mut table = Vec::new();
        print_list(&mut table, &rows, false).expect("table");
        let table = String::from_utf8(table).expect("utf8");
        assert!(table.contains(" 0.1s "), "{table}");
        // an end before the start (clock stepped back) is no duration, not an overflow
        write_timed_recording(tmp.path(), "rec-2", 40_000, 1_699_999_999_000);
        let rows = list(tmp.path()).expect("list");
        assert_eq!(
            rows.iter().find(|r| r.id == "rec-2").map(|r| r.duration_ms),
            Some(0)
        );
    }

    #[test]
    fn an_unreadable_recordings_directory_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // a file where the directory should be: listing fails instead of showing nothing
        std::fs::write(DataDir::new(tmp.path()).recordings(), b"x").expect("write");
        let e = list(tmp.path()).expect_err("not a directory");
        assert!(
            e.to_string().starts_with("cannot list recordings in "),
            "{e}"
        );
    }

    #[test]
    fn list_and_export() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(list(tmp.path()).expect("no dir yet").is_empty());
        write_recording(tmp.path(), "rec-1");
        let rows = list(tmp.path()).expect("list");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id, "rec-1");
        assert_eq!(rows[0].user, "alice");
        assert!(rows[0].complete);
        assert_eq!(rows[0].reason.as_deref(), Some("client closed"));

        let mut table = Vec::new();
        print_list(&mut table, &rows, false).expect("table");
        let table = String::from_utf8(table).expect("utf8");
        assert!(table.contains("root@web01"), "{table}");
        assert!(table.contains("client closed"), "{table}");
        let mut json = Vec::new();
        print_list(&mut json, &rows, true).expect("json");
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v[0]["id"], "rec-1");

        let mut text = Vec::new();
        export(tmp.path(), "rec-1", ExportFormat::Text, &mut text).expect("text");
        assert!(String::from_utf8_lossy(&text).contains("hello from web01"));
        let mut cast = Vec::new();
        export(tmp.path(), "rec-1", ExportFormat::Asciicast, &mut cast).expect("cast");
        let cast = String::from_utf8(cast).expect("utf8");
        assert!(
            cast.lines()
                .next()
                .is_some_and(|l| l.contains("\"version\":2")),
            "{cast}"
        );

        let e =
            export(tmp.path(), "nope", ExportFormat::Text, &mut Vec::new()).expect_err("missing");
        assert!(e.to_string().starts_with("no recording 'nope' in "), "{e}");
        assert!(export(tmp.path(), "../etc", ExportFormat::Text, &mut Vec::new()).is_err());
    }

    #[test]
    fn verify_says_unsealed_truncated_and_ok() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (key, _) = psm_evidence::EvidenceKey::load_or_create(tmp.path()).expect("key");
        // written without a trailer: it ends with CLOSE but is not signed
        write_recording(tmp.path(), "unsigned");
        let r = verify(tmp.path(), "unsigned", key.public()).expect("verify");
        assert!(!r.ok());
        assert!(r.to_string().contains("trailer missing"), "{r}");
        // signed by the recorder's key
        let dir = DataDir::new(tmp.path()).recordings();
        let meta = RecordingMeta {
            recording_id: "signed".into(),
            session_id: "s2".into(),
            ..RecordingMeta::default()
        };
        let f = File::create(file::path_for(&dir, "signed").expect("path")).expect("create");
        let mut w = RecordingWriter::new(f, &meta).expect("writer");
        w.flush().expect("flush");
        w.write(&Record::Close {
            ts_us: 5,
            summary: CloseSummary {
                end_ms: 1,
                exit_status: None,
                exit_signal: None,
                reason: "client closed".into(),
            },
        })
        .expect("close");
        w.finish_signed(&key, true).expect("finish");
        let r = verify(tmp.path(), "signed", key.public()).expect("verify");
        assert!(r.ok(), "{r}");
        let all = verify_all(tmp.path(), key.public()).expect("all");
        assert_eq!(
            all.iter()
                .map(|r| (r.id.as_str(), r.ok()))
                .collect::<Vec<_>>(),
            [("signed", true), ("unsigned", false)]
        );
        assert!(matches!(
            verify(tmp.path(), "nope", key.public()),
            Err(RecordingError::NotFound { .. })
        ));
    }
}
