//! RDP recordings as text: what was typed, line by line, and the session's events, each with
//! its time since the session started (`[00:00:03.120] hello world`, `[00:00:00.000] * connect
//! …`). Used by `recordings export --format text` and `sessions watch`.
//!
//! The typed text is the relay's decoding of the keyboard ([`RDP_KEYS_CHANNEL`]): a line ends
//! with Enter, Backspace erases the last character of the line being typed. Everything the
//! client chose is printed escaped ([`psm_control_api::Escaped`]): control characters typed
//! (Ctrl+C is `\u{3}`) and bidi overrides show as escapes. Raw PDUs are skipped.

use std::io::{Read, Write};

use psm_control_api::Escaped;
use psm_recorder_format::file::{Record, RecordingReader};
use psm_recorder_format::wire::rdp::{PROTOCOL, RDP_EVENTS_CHANNEL, RDP_KEYS_CHANNEL};
use psm_recorder_format::{Direction, RecordingMeta};

use super::RecordingError;

/// Longest typed line kept, in characters; the rest of a longer line is dropped.
const MAX_LINE: usize = 4096;

/// Whether `meta` is an RDP recording's.
pub(crate) fn is_rdp(meta: &RecordingMeta) -> bool {
    meta.protocol == PROTOCOL
}

/// `[HH:MM:SS.mmm]` of `ts_us` microseconds since the session started.
pub(crate) fn stamp(ts_us: u64) -> String {
    let ms = ts_us / 1000;
    format!(
        "[{:02}:{:02}:{:02}.{:03}]",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Turns typed text and events into lines.
#[derive(Default)]
struct Lines {
    line: String,
    chars: usize,
    started_us: Option<u64>,
}

impl Lines {
    fn typed(&mut self, ts_us: u64, text: &str, out: &mut dyn Write) -> std::io::Result<()> {
        for c in text.chars() {
            match c {
                '\r' | '\n' => self.end_line(out)?,
                '\u{8}' | '\u{7f}' => {
                    if self.line.pop().is_some() {
                        self.chars -= 1;
                    }
                }
                c => {
                    self.started_us.get_or_insert(ts_us);
                    if self.chars < MAX_LINE {
                        self.line.push(c);
                        self.chars += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the line being typed, if any.
    fn end_line(&mut self, out: &mut dyn Write) -> std::io::Result<()> {
        if let Some(ts) = self.started_us.take() {
            if !self.line.is_empty() {
                writeln!(out, "{} {}", stamp(ts), Escaped(&self.line))?;
            }
        }
        self.line.clear();
        self.chars = 0;
        Ok(())
    }

    fn event(&mut self, ts_us: u64, text: &str, out: &mut dyn Write) -> std::io::Result<()> {
        // a line typed before the event is shown before it
        self.end_line(out)?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(out, "{} * {}", stamp(ts_us), Escaped(line))?;
        }
        Ok(())
    }
}

/// Writes an RDP recording's typed lines and events to `out`; with `live`, flushes `out` after
/// each line (`sessions watch`).
pub(crate) fn text<R: Read>(
    mut reader: RecordingReader<R>,
    out: &mut dyn Write,
    live: bool,
) -> Result<(), RecordingError> {
    let mut lines = Lines::default();
    while let Some(rec) = reader.next_record()? {
        let Record::Data {
            ts_us,
            channel,
            direction,
            data,
        } = rec
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&data);
        match (channel, direction) {
            (RDP_KEYS_CHANNEL, Direction::Input) => lines.typed(ts_us, &text, out)?,
            (RDP_EVENTS_CHANNEL, Direction::Output) => lines.event(ts_us, &text, out)?,
            _ => continue,
        }
        if live {
            out.flush()?;
        }
    }
    lines.end_line(out)?;
    out.flush()?;
    Ok(())
}

/// Parses `--every`: a number with `ms`, `s` or `m` (`1s`, `500ms`, `0.5s`, `2m`); microseconds,
/// between 10 ms and one hour.
pub fn parse_every(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit_us) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000_000.0)
    } else {
        return Err(format!(
            "'{}' is not an interval (e.g. 1s, 500ms, 2m)",
            Escaped(s)
        ));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{}' is not an interval (e.g. 1s, 500ms, 2m)", Escaped(s)))?;
    let us = v * unit_us;
    if !us.is_finite() || !(10_000.0..=3_600_000_000.0).contains(&us) {
        return Err(format!(
            "interval '{}' is out of range (10ms to 60m)",
            Escaped(s)
        ));
    }
    Ok(us.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_intervals() {
        assert_eq!(stamp(3_120_000), "[00:00:03.120]");
        assert_eq!(stamp(3_723_004_999), "[01:02:03.004]");
        assert_eq!(parse_every("1s"), Ok(1_000_000));
        assert_eq!(parse_every("500ms"), Ok(500_000));
        assert_eq!(parse_every("0.25s"), Ok(250_000));
        assert_eq!(parse_every("2m"), Ok(120_000_000));
        for bad in ["", "1", "fast", "1ms", "2h", "-1s", "NaNs", "61m"] {
            assert!(parse_every(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn typed_lines_with_backspace_and_events_between() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        l.typed(1_000, "helo", &mut out).expect("w");
        l.typed(2_000, "\u{8}lo wor", &mut out).expect("w");
        l.typed(3_000, "ld\r\r", &mut out).expect("w");
        l.typed(4_000, "half", &mut out).expect("w");
        l.event(5_000, "end client_closed\n", &mut out).expect("w");
        l.typed(6_000, "\u{3}\u{202e}x", &mut out).expect("w");
        l.end_line(&mut out).expect("w");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "[00:00:00.001] hello world\n\
             [00:00:00.004] half\n\
             [00:00:00.005] * end client_closed\n\
             [00:00:00.006] \\u{3}\\u{202e}x\n"
        );
    }
}
