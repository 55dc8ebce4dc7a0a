//! `psmctl recordings …`: list, play, search, export and verify recordings, read from
//! `recordings/` directly (see [`crate::recordings`] and [`crate::review`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use psm_control_api::{AuditEvent, AuditKind};
use psm_recorder_format::export::Replay;

use super::{check_data_dir_owner, evidence_public_key, CliError, RecordingsCmd};
use crate::datadir::DataDir;
use crate::recordings::{self, ExportFormat};
use crate::timefmt;

/// Runs one `psmctl recordings …` command.
pub(super) fn recordings_cmd(
    data_dir: &Path,
    cmd: RecordingsCmd,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if let RecordingsCmd::Keygen { file } = &cmd {
        // needs no data directory: the key may be made before psm is set up
        let key = psm_recorder_format::crypt::RecordingKey::create(file)
            .map_err(recordings::RecordingError::Key)?;
        writeln!(
            out,
            "recording key {} written to {}; set [recorder] encryption_key_file to it in psm.toml and restart psm; keep a copy apart from the data directory: without it encrypted recordings cannot be replayed",
            key.id(),
            file.display()
        )?;
        return Ok(());
    }
    check_data_dir_owner(data_dir)?;
    match cmd {
        RecordingsCmd::Keygen { .. } => {}
        RecordingsCmd::List(f) => {
            let rows = recordings::list(data_dir)?;
            recordings::print_list(out, &rows, f.json)?;
        }
        RecordingsCmd::Play {
            id,
            speed,
            raw,
            from,
            idle_limit,
        } => {
            if !(speed.is_finite() && speed > 0.0) {
                return Err(CliError::Usage(format!(
                    "invalid --speed {speed}: must be a positive number"
                )));
            }
            if !(idle_limit.is_finite() && idle_limit >= 0.0) {
                return Err(CliError::Usage(format!(
                    "invalid --idle-limit {idle_limit}: must be zero or more seconds"
                )));
            }
            let from_us = match from {
                Some(f) => crate::review::parse_offset(&f)
                    .map_err(|e| CliError::Usage(format!("invalid --from: {e}")))?,
                None => 0,
            };
            let mode = if raw { Replay::Raw } else { Replay::Safe };
            let opts = crate::review::PlayOptions {
                speed,
                from_us,
                idle_limit_us: (idle_limit * 1e6) as u64,
                mode,
            };
            // keys when stdin is a terminal: the guard puts it back when dropped
            let raw = crate::review::RawInput::start();
            let keys = raw.as_ref().map(|(_, rx)| rx);
            crate::review::play(data_dir, &id, opts, keys, out)?;
            drop(raw);
        }
        RecordingsCmd::Search {
            text,
            regex,
            user,
            target,
            since,
            until,
        } => {
            let time = |s: Option<String>, flag: &str| -> Result<Option<u64>, CliError> {
                s.map(|s| {
                    psm_control_api::conditions::parse_time(&s)
                        .map_err(|e| CliError::Usage(format!("invalid --{flag}: {e}")))
                })
                .transpose()
            };
            let q = psm_recorder_index::Query {
                regex: regex.is_some(),
                text: regex.or(text).unwrap_or_default(),
                user,
                target,
                since_ms: time(since, "since")?,
                until_ms: time(until, "until")?,
            };
            let hits = crate::review::search(data_dir, &q)?;
            crate::review::print_hits(out, &hits)?;
            if hits.len() >= psm_recorder_index::MAX_HITS {
                writeln!(
                    out,
                    "(stopped at {} hits; narrow the search)",
                    psm_recorder_index::MAX_HITS
                )?;
            }
        }
        RecordingsCmd::Reindex => {
            let (recs, lines, failed) = crate::review::reindex(data_dir, out)?;
            writeln!(
                out,
                "indexed {recs} recording(s), {lines} line(s); {failed} could not be read"
            )?;
        }
        RecordingsCmd::Verify { id, all } => {
            let key = evidence_public_key(data_dir)?;
            let reports = match (id, all) {
                (Some(id), false) => match recordings::verify(data_dir, &id, &key) {
                    Ok(r) => vec![r],
                    Err(e) => {
                        // a recording retention deleted is not missing: the audit log says so
                        if let Some(line) = deleted_by_retention(data_dir, &id) {
                            writeln!(out, "{line}")?;
                            return Ok(());
                        }
                        return Err(e.into());
                    }
                },
                _ => recordings::verify_all(data_dir, &key)?,
            };
            let mut bad = 0;
            for r in &reports {
                writeln!(out, "{r}")?;
                if !r.ok() {
                    bad += 1;
                }
            }
            if all {
                writeln!(
                    out,
                    "{} recording(s): {} OK, {bad} not OK",
                    reports.len(),
                    reports.len() - bad
                )?;
            }
            if bad > 0 {
                return Err(CliError::Unverified);
            }
        }
        RecordingsCmd::Pubkey => {
            writeln!(out, "{}", evidence_public_key(data_dir)?)?;
        }
        RecordingsCmd::Export {
            id,
            format: format @ (ExportFormat::Png | ExportFormat::Video),
            output,
            every,
        } => {
            let Some(path) = output else {
                return Err(CliError::Usage(
                    "--format png needs -o DIR, --format video needs -o FILE (.webm or .mp4)"
                        .into(),
                ));
            };
            let every = every.unwrap_or(recordings::DEFAULT_EVERY_US);
            let n = recordings::export_frames(
                data_dir,
                &id,
                format,
                &path,
                every,
                std::ffi::OsStr::new("ffmpeg"),
            )?;
            writeln!(out, "{n} frames written to {}", path.display())?;
        }
        RecordingsCmd::Export { every: Some(_), .. } => {
            return Err(CliError::Usage(
                "--every is for --format png and video".into(),
            ))
        }
        RecordingsCmd::Export {
            id,
            format,
            output,
            every: None,
        } => match output {
            Some(path) => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| CliError::File {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                recordings::export(data_dir, &id, format, &mut f)?;
            }
            None => recordings::export(data_dir, &id, format, out)?,
        },
    }
    Ok(())
}

/// What the audit log says of a recording retention deleted (`ID: DELETED by retention …`).
fn deleted_by_retention(data_dir: &Path, id: &str) -> Option<String> {
    let mut text = String::new();
    for path in crate::audit::segment_paths(&DataDir::new(data_dir).audit_log()).ok()? {
        text.push_str(&fs::read_to_string(path).unwrap_or_default());
    }
    text.lines().rev().find_map(|l| {
        let e: AuditEvent = serde_json::from_str(l).ok()?;
        match e.kind {
            AuditKind::Retention {
                recording_id,
                bytes,
                reason,
                modified_ms,
                ..
            } if recording_id == id => Some(format!(
                "{id}: DELETED: deleted by retention at {} ({reason}, {bytes} bytes, last written {}; audit seq {})",
                timefmt::utc(e.ts_ms),
                timefmt::utc(modified_ms),
                e.seq
            )),
            _ => None,
        }
    })
}
