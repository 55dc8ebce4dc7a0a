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
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use psm_control_api::escape;
use psm_recorder_format::export::{replay_with, Replay, ReplayError, Step};
use psm_recorder_format::file::{self, RecordingReader};
use psm_recorder_format::FormatError;
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
/// Encrypted recordings are left out unless `[recorder] index_encrypted` is set (then they are
/// read with the recording key); rows of recordings whose files are gone, or that are left
/// out, are removed.
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
    let settings = crate::reckey::settings(data_dir)?;
    let (mut recs, mut lines, mut failed) = (0, 0, 0);
    // what the index may keep: the recordings whose files are there and may be indexed
    let mut keep = std::collections::HashSet::new();
    for info in listing {
        let open = || std::fs::File::open(&info.path).map(std::io::BufReader::new);
        let indexed = match open()
            .map_err(FormatError::Io)
            .and_then(RecordingReader::open)
        {
            Ok(r) if r.encrypted_with().is_some() => {
                if !settings.index_encrypted {
                    // the index is in the clear: an encrypted recording's text stays out of it
                    // unless `[recorder] index_encrypted` says otherwise
                    continue;
                }
                keep.insert(info.id.clone());
                crate::reckey::open_for_replay(data_dir, || Ok(open()?))
                    .map_err(|e| e.to_string())
                    .and_then(|r| writer.index_recording(r).map_err(|e| e.to_string()))
            }
            _ => {
                keep.insert(info.id.clone());
                writer.index_file(&info.path).map_err(|e| e.to_string())
            }
        };
        match indexed {
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
    // rows of recordings deleted since, or encrypted ones no longer meant to be indexed
    for id in writer.ids()? {
        if !keep.contains(&id) {
            writer.forget(&id)?;
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

/// What a key pressed during `play` asks for.
enum Pace {
    Go,
    Quit,
}

/// Keys read while playing: space pauses and resumes, `+`/`-` double or halve the speed, `q`
/// (or Ctrl-C, Ctrl-D) quits. Waits until `due`, handling keys meanwhile; moves `due` on by a
/// pause and rescales what is left of it on a speed change.
fn wait_until(due: &mut Instant, speed: &mut f64, keys: Option<&Receiver<u8>>) -> Pace {
    let Some(keys) = keys else {
        let now = Instant::now();
        if *due > now {
            std::thread::sleep(*due - now);
        }
        return Pace::Go;
    };
    loop {
        let now = Instant::now();
        let key = if *due > now {
            match keys.recv_timeout(*due - now) {
                Ok(k) => k,
                Err(RecvTimeoutError::Timeout) => return Pace::Go,
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(*due - now);
                    return Pace::Go;
                }
            }
        } else {
            match keys.try_recv() {
                Ok(k) => k,
                Err(_) => return Pace::Go,
            }
        };
        match key {
            b'q' | b'Q' | 0x03 | 0x04 => return Pace::Quit,
            b' ' => {
                let paused = Instant::now();
                loop {
                    match keys.recv() {
                        Ok(b' ') => break,
                        Ok(b'q' | b'Q' | 0x03 | 0x04) => return Pace::Quit,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                *due += paused.elapsed();
            }
            b'+' | b'=' | b'-' => {
                let old = *speed;
                *speed = if key == b'-' {
                    (old / 2.0).max(1.0 / 64.0)
                } else {
                    (old * 2.0).min(64.0)
                };
                let now = Instant::now();
                let left = due.saturating_duration_since(now).mul_f64(old / *speed);
                *due = now + left;
            }
            _ => {}
        }
    }
}

/// Replays recording `id`'s screen output to `out` with `opts`; with `keys`, takes keys
/// meanwhile (see `wait_until`). Output before `from_us` is written at once.
pub fn play(
    data_dir: &Path,
    id: &str,
    opts: PlayOptions,
    keys: Option<&Receiver<u8>>,
    out: &mut dyn Write,
) -> Result<(), RecordingError> {
    let mut reader = crate::recordings::open_reader(data_dir, id)?;
    if reader.meta().protocol == psm_recorder_format::wire::rdp::PROTOCOL {
        return Err(RecordingError::Rdp(format!(
            "recording {id} is an RDP session: play replays terminals; use recordings export {id} --format png|video|text, or sessions watch while it runs"
        )));
    }
    let mut speed = opts.speed;
    let mut due = Instant::now();
    let mut last_ts: Option<u64> = None;
    let pace = |ts_us: u64| {
        if ts_us < opts.from_us {
            // before the starting point: written at once, shown when the replay gets there
            return Step::Write { flush: false };
        }
        let prev = last_ts.unwrap_or(opts.from_us).max(opts.from_us);
        let gap = ts_us.saturating_sub(prev).min(opts.idle_limit_us);
        let secs = gap as f64 / 1e6 / speed;
        let step = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
        due = due.checked_add(step).unwrap_or(due);
        last_ts = Some(ts_us);
        match wait_until(&mut due, &mut speed, keys) {
            Pace::Quit => Step::Stop,
            Pace::Go => Step::Write { flush: true },
        }
    };
    replay_with(&mut reader, opts.mode, out, pace).map_err(|e| match e {
        ReplayError::Read(e) => RecordingError::Format(e),
        ReplayError::Write(e) => RecordingError::Output(e),
    })
}

/// The terminal in raw input mode (no line editing, no echo, no signals: Ctrl-C is a key)
/// while it lives; put back as it was when dropped, also on an error or a panic that unwinds.
pub struct RawInput {
    saved: nix::sys::termios::Termios,
}

impl RawInput {
    /// Puts standard input in raw mode and starts a thread that sends each byte read to the
    /// returned receiver. None when standard input is not a terminal.
    pub fn start() -> Option<(RawInput, Receiver<u8>)> {
        use nix::sys::termios::{
            tcgetattr, tcsetattr, LocalFlags, SetArg, SpecialCharacterIndices,
        };
        use std::io::{IsTerminal, Read};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG | LocalFlags::IEXTEN);
        raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        let guard = RawInput { saved };
        // the thread reads its own handle of the terminal: psmctl's main thread holds the lock
        // of `std::io::stdin()` (it reads passwords through it), so reading through that would
        // wait for ever
        use std::os::fd::AsFd;
        let mut input = std::fs::File::from(stdin.as_fd().try_clone_to_owned().ok()?);
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("play-keys".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                while let Ok(1) = input.read(&mut b) {
                    if tx.send(b[0]).is_err() {
                        break;
                    }
                }
            });
        // without the thread no key arrives; the guard still restores the terminal
        spawned.ok()?;
        Some((guard, rx))
    }
}

impl Drop for RawInput {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
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
    use psm_recorder_format::file::Record;
    use psm_recorder_format::Direction;

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

    fn data_dir_with(id: &str, recs: &[(u64, &[u8])]) -> tempfile::TempDir {
        use psm_recorder_format::file::RecordingWriter;
        let dir = tempfile::tempdir().expect("tempdir");
        let rdir = dir.path().join("recordings");
        std::fs::create_dir(&rdir).expect("mkdir");
        let meta = psm_recorder_format::RecordingMeta {
            recording_id: id.into(),
            ..Default::default()
        };
        let f = std::fs::File::create(rdir.join(format!("{id}.psmrec"))).expect("create");
        let mut w = RecordingWriter::new(f, &meta).expect("writer");
        for (ts, b) in recs {
            w.write(&Record::Data {
                ts_us: *ts,
                channel: 0,
                direction: Direction::Output,
                data: b.to_vec().into(),
            })
            .expect("write");
        }
        w.finish().expect("finish");
        dir
    }

    fn opts() -> PlayOptions {
        PlayOptions {
            speed: 1.0,
            from_us: 0,
            idle_limit_us: 60_000_000,
            mode: Replay::Safe,
        }
    }

    #[test]
    fn from_skips_waiting_and_keys_quit_and_speed_up() {
        let d = data_dir_with(
            "r1",
            &[
                (0, b"one\r\n"),
                (30_000_000, b"two\r\n"),
                (60_000_000, b"three\r\n"),
            ],
        );
        // from 60 s: the first two are drawn at once, nothing waits
        let mut out = Vec::new();
        let t = Instant::now();
        let o = PlayOptions {
            from_us: 60_000_000,
            ..opts()
        };
        play(d.path(), "r1", o, None, &mut out).expect("play");
        assert!(t.elapsed() < Duration::from_secs(5));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("one") && text.contains("three"), "{text}");

        // q quits at once, before the 30 s gap
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(b'q').expect("send");
        let mut out = Vec::new();
        let t = Instant::now();
        play(d.path(), "r1", opts(), Some(&rx), &mut out).expect("play");
        assert!(t.elapsed() < Duration::from_secs(5));
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("two"), "{text}");

        // + six times: 64x, the 30 s gaps take under a second each
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..6 {
            tx.send(b'+').expect("send");
        }
        let mut out = Vec::new();
        let t = Instant::now();
        play(d.path(), "r1", opts(), Some(&rx), &mut out).expect("play");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(String::from_utf8_lossy(&out).contains("three"));
    }
}
