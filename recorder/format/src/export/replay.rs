//! The timed replay ([`play`]): the terminal output with its original timing, sped up, through
//! a [`Sanitizer`] unless [`Replay::Raw`] is asked for.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::{is_screen, PIECE};
use crate::file::{Record, RecordingReader};
use crate::sanitize::Sanitizer;
use crate::FormatError;

/// Longest idle gap [`play`] reproduces (before dividing by the speed).
const MAX_GAP_US: u64 = 2_000_000;

/// How [`play`] writes the recorded output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Through a [`Sanitizer`]: only what draws the screen reaches the terminal, and what the
    /// replay changed in it is put back at the end.
    Safe,
    /// The bytes as they were recorded. Unsafe on a terminal: the session's output can set the
    /// clipboard, make the terminal type into the shell, and the like.
    Raw,
}

/// What a replay's pacing says before each screen record is written ([`replay_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write the record; with `flush`, flush the output after it.
    Write {
        /// Flush after this record (the replay is showing it now, not catching up).
        flush: bool,
    },
    /// End the replay before this record (the screen is still put back in [`Replay::Safe`]).
    Stop,
}

/// Why a replay ended early.
#[derive(Debug)]
pub enum ReplayError {
    /// The recording could not be read.
    Read(FormatError),
    /// The output could not be written.
    Write(std::io::Error),
}

impl From<ReplayError> for FormatError {
    fn from(e: ReplayError) -> FormatError {
        match e {
            ReplayError::Read(e) => e,
            ReplayError::Write(e) => FormatError::Io(e),
        }
    }
}

/// The loop every replay shares (psmctl's timed, interactive player and [`play`]): writes the
/// terminal output of `reader` (output and error bytes) to `out` in `mode`, record by record,
/// asking `pace` with each record's time first; then, in [`Replay::Safe`], what puts back what
/// the replay changed on the screen, and flushes.
pub fn replay_with<R: Read>(
    reader: &mut RecordingReader<R>,
    mode: Replay,
    out: &mut dyn Write,
    mut pace: impl FnMut(u64) -> Step,
) -> Result<(), ReplayError> {
    let mut sanitizer = Sanitizer::new();
    let mut safe = Vec::new();
    while let Some(rec) = reader.next_record().map_err(ReplayError::Read)? {
        let Record::Data {
            ts_us,
            direction,
            data,
            ..
        } = rec
        else {
            continue;
        };
        if !is_screen(direction) {
            continue;
        }
        let Step::Write { flush } = pace(ts_us) else {
            break;
        };
        match mode {
            Replay::Raw => out.write_all(&data).map_err(ReplayError::Write)?,
            Replay::Safe => {
                for piece in data.chunks(PIECE) {
                    safe.clear();
                    sanitizer.feed(piece, &mut safe);
                    out.write_all(&safe).map_err(ReplayError::Write)?;
                }
            }
        }
        if flush {
            out.flush().map_err(ReplayError::Write)?;
        }
    }
    if mode == Replay::Safe {
        safe.clear();
        sanitizer.finish(&mut safe);
        out.write_all(&safe).map_err(ReplayError::Write)?;
    }
    out.flush().map_err(ReplayError::Write)
}

/// Replays the terminal output (output and error bytes) to `out`, flushing after each record,
/// with the original delays between records divided by `speed`. A single idle gap lasts at
/// most 2 s / `speed`. `speed` must be positive; `f64::INFINITY` replays without delay.
/// `mode` says whether the bytes go through a [`Sanitizer`] first.
pub fn play<R: Read>(
    mut reader: RecordingReader<R>,
    speed: f64,
    mode: Replay,
    mut out: impl Write,
) -> Result<(), FormatError> {
    if speed.is_nan() || speed <= 0.0 {
        return Err(FormatError::Malformed(format!(
            "replay speed must be positive, not {speed}"
        )));
    }
    let started = Instant::now();
    let mut offset = Duration::ZERO;
    let mut last_ts = None;
    let pace = |ts_us: u64| {
        if let Some(prev) = last_ts {
            let gap_us = ts_us.saturating_sub(prev).min(MAX_GAP_US);
            let secs = gap_us as f64 / 1e6 / speed;
            offset =
                offset.saturating_add(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
        }
        last_ts = Some(ts_us);
        if let Some(due) = started.checked_add(offset) {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Step::Write { flush: true }
    };
    Ok(replay_with(&mut reader, mode, &mut out, pace)?)
}
