//! `psmctl recordings search|reindex` and `play --from/--idle-limit`: finding the session
//! where something was typed or shown, and replaying it from there.
//!
//! `search` reads the index psm-recorder writes beside the recordings
//! (`recordings/index.db`, see `psm_recorder_index`), read-only; it never decompresses a
//! recording. A missing or damaged index is reported with the way to rebuild it: `reindex`
//! reads every recording file and replaces its rows (SQLite's locks keep it safe beside a
//! running psm-recorder; a file that is not a database any more is set aside first).
//! Every peer-chosen string is printed through `psm_control_api::escape`.
//!
//! What it does not do: talk to psm-recorder, or show anything the index did not keep
//! (`psm_recorder_index::lines` says what a line is).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use psm_control_api::escape;
use psm_recorder_format::export::Replay;
use psm_recorder_format::file::{self, Record};
use psm_recorder_format::sanitize::Sanitizer;
use psm_recorder_format::Direction;
use psm_recorder_index::{Hit, IndexError, IndexReader, IndexWriter, Query, INDEX_FILE};

use crate::recordings::RecordingError;

/// Errors of search and reindex.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The index cannot be read or written.
    #[error("{0}")]
    Index(#[from] IndexError),
    /// A recording could not be read.
    #[error(transparent)]
    Recording(#[from] RecordingError),
    /// The output could not be written.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

fn index_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("recordings").join(INDEX_FILE)
}

/// Runs `q` on the index of `data_dir`.
pub fn search(data_dir: &Path, q: &Query) -> Result<Vec<Hit>, ReviewError> {
    let reader = IndexReader::open(&index_path(data_dir)).map_err(|e| match e {
        IndexError::Missing(_) => e,
        other => IndexError::Missing(format!(
            "{} ({other}; psmctl recordings reindex rebuilds it)",
            index_path(data_dir).display()
        )),
    })?;
    Ok(reader.search(q)?)
}

/// An offset in a session as `1h02m03.4s`, `2m03.4s` or `3.4s` (what `play --from` takes).
pub fn offset(ts_us: u64) -> String {
    let tenths = ts_us / 100_000;
    let (h, m, s, t) = (
        tenths / 36_000,
        (tenths / 600) % 60,
        (tenths / 10) % 60,
        tenths % 10,
    );
    if h > 0 {
        format!("{h}h{m:02}m{s:02}.{t}s")
    } else if m > 0 {
        format!("{m}m{s:02}.{t}s")
    } else {
        format!("{s}.{t}s")
    }
}

/// Prints hits, one a line: recording, user, account@target, offset, typed or screen, line.
pub fn print_hits(out: &mut dyn Write, hits: &[Hit]) -> std::io::Result<()> {
    for h in hits {
        writeln!(
            out,
            "{}  {}  {}@{}  +{}  {}  {}",
            escape(&h.recording_id),
            escape(&h.user),
            escape(&h.account),
            escape(&h.target),
            offset(h.ts_us),
            if h.typed { "typed" } else { "screen" },
            escape(&h.text),
        )?;
    }
    Ok(())
}

/// Rebuilds the index from every recording file; returns (recordings, lines, failures).
pub fn reindex(data_dir: &Path, out: &mut dyn Write) -> Result<(u64, u64, u64), ReviewError> {
    let path = index_path(data_dir);
    let mut writer = match IndexWriter::open(&path) {
        Ok(w) => w,
        Err(e) => {
            // not a database any more: set it aside and start afresh
            let aside = path.with_extension("db.damaged");
            writeln!(
                out,
                "index {} unusable ({e}); moved to {}",
                path.display(),
                aside.display()
            )?;
            std::fs::rename(&path, &aside)?;
            for ext in ["db-wal", "db-shm"] {
                let _ = std::fs::remove_file(path.with_extension(ext));
            }
            IndexWriter::open(&path)?
        }
    };
    let dir = data_dir.join("recordings");
    let listing = file::list(&dir).map_err(|source| RecordingError::List {
        dir: dir.clone(),
        source,
    })?;
    let (mut recs, mut lines, mut failed) = (0, 0, 0);
    for info in listing {
        match writer.index_file(&info.path) {
            Ok(n) => {
                recs += 1;
                lines += n;
            }
            Err(e) => {
                failed += 1;
                writeln!(out, "{}: {e}", escape(&info.path.display().to_string()))?;
            }
        }
    }
    Ok((recs, lines, failed))
}

/// How `play` replays.
#[derive(Clone, Copy, Debug)]
pub struct PlayOptions {
    /// Speed factor (positive).
    pub speed: f64,
    /// Start here (µs into the session): the output before it is written at once.
    pub from_us: u64,
    /// Longest idle gap kept, µs (before the speed factor).
    pub idle_limit_us: u64,
    /// Sanitized or raw.
    pub mode: Replay,
}

/// Replays recording `id`'s screen output to `out` with `opts`.
pub fn play(
    data_dir: &Path,
    id: &str,
    opts: PlayOptions,
    out: &mut dyn Write,
) -> Result<(), RecordingError> {
    let mut reader = crate::recordings::open_reader(data_dir, id)?;
    let started = Instant::now();
    let mut offset = Duration::ZERO;
    let mut last_ts: Option<u64> = None;
    let mut sanitizer = Sanitizer::new();
    let mut safe = Vec::new();
    while let Some(rec) = reader.next_record().map_err(RecordingError::Format)? {
        let Record::Data {
            ts_us,
            direction,
            data,
            ..
        } = rec
        else {
            continue;
        };
        if direction == Direction::Input {
            continue;
        }
        if ts_us >= opts.from_us {
            let prev = last_ts.unwrap_or(opts.from_us).max(opts.from_us);
            let gap = ts_us.saturating_sub(prev).min(opts.idle_limit_us);
            let secs = gap as f64 / 1e6 / opts.speed;
            offset =
                offset.saturating_add(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
            last_ts = Some(ts_us);
            if let Some(due) = started.checked_add(offset) {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
        }
        match opts.mode {
            Replay::Raw => out.write_all(&data)?,
            Replay::Safe => {
                for piece in data.chunks(64 * 1024) {
                    safe.clear();
                    sanitizer.feed(piece, &mut safe);
                    out.write_all(&safe)?;
                }
            }
        }
        if ts_us >= opts.from_us {
            out.flush()?;
        }
    }
    if opts.mode == Replay::Safe {
        safe.clear();
        sanitizer.finish(&mut safe);
        out.write_all(&safe)?;
    }
    out.flush()?;
    Ok(())
}

/// Parses an offset: `90`, `90s`, `1m30s`, `1h`, `0`.
pub fn parse_offset(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok((secs * 1e6) as u64);
        }
    }
    if t.trim_end_matches('s').parse::<f64>() == Ok(0.0) {
        return Ok(0);
    }
    psm_control_api::conditions::parse_duration(t).map(|ms| ms.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets() {
        assert_eq!(offset(3_400_000), "3.4s");
        assert_eq!(offset(90_000_000), "1m30.0s");
        assert_eq!(offset(3_723_400_000), "1h02m03.4s");
        assert_eq!(parse_offset("90s"), Ok(90_000_000));
        assert_eq!(parse_offset("1m30s"), Ok(90_000_000));
        assert_eq!(parse_offset("2.5"), Ok(2_500_000));
        assert_eq!(parse_offset("0"), Ok(0));
        assert_eq!(parse_offset("0s"), Ok(0));
        assert!(parse_offset("soon").is_err());
    }
}
