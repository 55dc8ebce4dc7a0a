//! Renderings of a recording: asciicast v2, plain text, and timed replay.
//!
//! - [`asciicast`]: JSON lines that `asciinema play` understands (header, then `o`/`i`/`r`
//!   events). Bytes are decoded as UTF-8 per channel and direction; a sequence cut between two
//!   records is carried over, invalid bytes become U+FFFD.
//! - [`text`]: what was on screen as plain text: the terminal output with escape sequences
//!   removed and carriage returns, backspaces and line erases applied to the current line.
//! - [`play`]: the terminal output written with its original timing, sped up by a factor.
//!
//! All three merge every channel of the session; `text` and `play` show output and error
//! only (what the user saw), `asciicast` also has input events.
//!
//! What it does not do: emulate a full terminal (cursor movement, screens, scroll regions).

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::file::{Record, RecordingReader};
use crate::{Direction, FormatError};

/// Terminal size assumed when a recording has no resize record, or when the pty was requested
/// without a size (0x0: `ssh -tt` with no terminal on its standard input).
const DEFAULT_SIZE: (u32, u32) = (80, 24);
/// `TERM` written in the asciicast header (the relay does not record the client's).
const DEFAULT_TERM: &str = "xterm-256color";
/// How many DATA bytes [`asciicast`] holds back while looking for the first resize.
const LOOKAHEAD_BYTES: usize = 1024 * 1024;
/// Longest idle gap [`play`] reproduces (before dividing by the speed).
const MAX_GAP_US: u64 = 2_000_000;

/// Decodes a byte stream as UTF-8 across record boundaries.
#[derive(Default)]
struct Utf8Stream {
    /// Start of a sequence that the previous record cut (at most 3 bytes).
    carry: Vec<u8>,
}

impl Utf8Stream {
    /// Appends the text of `data` to `out`, keeping an incomplete final sequence for later.
    fn decode(&mut self, data: &[u8], out: &mut String) {
        let joined;
        let mut input: &[u8] = if self.carry.is_empty() {
            data
        } else {
            self.carry.extend_from_slice(data);
            joined = std::mem::take(&mut self.carry);
            &joined
        };
        loop {
            match std::str::from_utf8(input) {
                Ok(s) => {
                    out.push_str(s);
                    return;
                }
                Err(e) => {
                    let (valid, rest) = input.split_at(e.valid_up_to());
                    if let Ok(s) = std::str::from_utf8(valid) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            input = &rest[n..];
                        }
                        None => {
                            self.carry = rest.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: an incomplete sequence left over becomes U+FFFD.
    fn finish(&mut self, out: &mut String) {
        if !self.carry.is_empty() {
            self.carry.clear();
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
}

/// One decoder per (channel, direction): sequences never continue across them.
#[derive(Default)]
struct Decoders(HashMap<(u32, u8), Utf8Stream>);

impl Decoders {
    fn decode(&mut self, channel: u32, direction: Direction, data: &[u8]) -> String {
        let mut s = String::new();
        self.0
            .entry((channel, direction as u8))
            .or_default()
            .decode(data, &mut s);
        s
    }
}

fn is_screen(direction: Direction) -> bool {
    matches!(direction, Direction::Output | Direction::Error)
}

#[derive(Serialize)]
struct CastHeader<'a> {
    version: u8,
    width: u32,
    height: u32,
    timestamp: u64,
    title: String,
    env: CastEnv<'a>,
}

#[derive(Serialize)]
struct CastEnv<'a> {
    #[serde(rename = "TERM")]
    term: &'a str,
}

fn json_err(e: serde_json::Error) -> FormatError {
    FormatError::Io(e.into())
}

/// Writes one `[time, "code", "text"]` line.
fn cast_event(out: &mut impl Write, ts_us: u64, code: &str, text: &str) -> Result<(), FormatError> {
    write!(
        out,
        "[{}.{:06}, \"{code}\", ",
        ts_us / 1_000_000,
        ts_us % 1_000_000
    )?;
    serde_json::to_writer(&mut *out, text).map_err(json_err)?;
    out.write_all(b"]\n")?;
    Ok(())
}

/// The size a resize record gives a terminal: 80x24 when a side is 0 (a pty requested without a
/// size), as no player can show a 0-column terminal.
fn usable_size(cols: u32, rows: u32) -> (u32, u32) {
    if cols == 0 || rows == 0 {
        DEFAULT_SIZE
    } else {
        (cols, rows)
    }
}

/// Writes the recording as an asciicast v2 file.
///
/// Width and height come from the first resize record, the size the pty was requested with
/// (80x24 without one, or when it was requested as 0x0); later resizes become `r` events
/// (those without a size are left out), output and error `o` events, input `i` events.
pub fn asciicast<R: Read>(
    mut reader: RecordingReader<R>,
    out: impl Write,
) -> Result<(), FormatError> {
    let mut out = BufWriter::new(out);
    // Hold records back until the first resize tells the terminal size.
    let mut held = Vec::new();
    let mut held_bytes = 0usize;
    let mut size = None;
    while size.is_none() && held_bytes <= LOOKAHEAD_BYTES {
        let Some(rec) = reader.next_record()? else {
            break;
        };
        match &rec {
            Record::Resize { cols, rows, .. } => size = Some(usable_size(*cols, *rows)),
            Record::Data { data, .. } => held_bytes += data.len(),
            Record::Close { .. } => {}
        }
        held.push(rec);
    }
    let (width, height) = size.unwrap_or(DEFAULT_SIZE);
    let meta = reader.meta();
    let header = CastHeader {
        version: 2,
        width,
        height,
        timestamp: meta.start_ms / 1000,
        title: format!("{}@{}@{}", meta.user, meta.account, meta.target),
        env: CastEnv { term: DEFAULT_TERM },
    };
    serde_json::to_writer(&mut out, &header).map_err(json_err)?;
    out.write_all(b"\n")?;

    let mut decoders = Decoders::default();
    let mut first_resize = size.is_some();
    let mut last_ts = 0;
    let mut emit = |rec: Record, out: &mut BufWriter<_>| -> Result<(), FormatError> {
        last_ts = last_ts.max(rec.ts_us());
        match rec {
            Record::Data {
                ts_us,
                channel,
                direction,
                data,
            } => {
                let text = decoders.decode(channel, direction, &data);
                if !text.is_empty() {
                    let code = if is_screen(direction) { "o" } else { "i" };
                    cast_event(out, ts_us, code, &text)?;
                }
            }
            Record::Resize {
                ts_us, cols, rows, ..
            } => {
                if first_resize {
                    // it is the header's size
                    first_resize = false;
                } else if cols != 0 && rows != 0 {
                    cast_event(out, ts_us, "r", &format!("{cols}x{rows}"))?;
                }
            }
            Record::Close { .. } => {}
        }
        Ok(())
    };
    for rec in held {
        emit(rec, &mut out)?;
    }
    while let Some(rec) = reader.next_record()? {
        emit(rec, &mut out)?;
    }
    let mut tails: Vec<_> = decoders.0.into_iter().collect();
    tails.sort_by_key(|(key, _)| *key);
    for ((_, direction), mut stream) in tails {
        let mut text = String::new();
        stream.finish(&mut text);
        if !text.is_empty() {
            let code = if direction == Direction::Input as u8 {
                "i"
            } else {
                "o"
            };
            cast_event(&mut out, last_ts, code, &text)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Escape-sequence parser state of [`Screen`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ground,
    /// After ESC.
    Escape,
    /// After ESC and intermediates (charset selects `ESC ( B` and the like).
    EscapeIntermediate,
    /// Control sequence: `ESC [` params intermediates final.
    Csi,
    /// Operating system command (`ESC ]`) or DCS/SOS/PM/APC: up to BEL or `ESC \`.
    Str,
    /// ESC inside a string: `\` ends it, anything else starts a new escape.
    StrEscape,
}

/// Turns terminal output into plain text, one line at a time.
struct Screen {
    state: State,
    /// CSI parameter bytes, to tell erase-line apart.
    params: String,
    line: Vec<char>,
    cursor: usize,
}

impl Screen {
    fn new() -> Self {
        Screen {
            state: State::Ground,
            params: String::new(),
            line: Vec::new(),
            cursor: 0,
        }
    }

    fn feed(&mut self, text: &str, out: &mut impl Write) -> std::io::Result<()> {
        for c in text.chars() {
            self.step(c, out)?;
        }
        Ok(())
    }

    fn step(&mut self, c: char, out: &mut impl Write) -> std::io::Result<()> {
        const ESC: char = '\x1b';
        const BEL: char = '\x07';
        const CAN: char = '\x18';
        const SUB: char = '\x1a';
        match self.state {
            State::Ground => match c {
                ESC => self.state = State::Escape,
                '\n' => self.newline(out)?,
                '\r' => self.cursor = 0,
                '\x08' => self.backspace(),
                '\t' => self.put('\t'),
                '\u{9b}' => self.start_csi(),
                c if c.is_control() => {}
                c => self.put(c),
            },
            State::Escape => match c {
                '[' => self.start_csi(),
                ']' | 'P' | 'X' | '^' | '_' => self.state = State::Str,
                ESC => {}
                CAN | SUB => self.state = State::Ground,
                '\x20'..='\x2f' => self.state = State::EscapeIntermediate,
                // final byte of a two-byte sequence (ESC 7, ESC M, ESC =, ...)
                _ => self.state = State::Ground,
            },
            State::EscapeIntermediate => match c {
                '\x20'..='\x2f' => {}
                ESC => self.state = State::Escape,
                _ => self.state = State::Ground,
            },
            State::Csi => match c {
                '\x30'..='\x3f' => self.params.push(c),
                '\x20'..='\x2f' => {}
                '\x40'..='\x7e' => {
                    if c == 'K' && (self.params.is_empty() || self.params == "0") {
                        // erase to the end of the line
                        self.line.truncate(self.cursor);
                    }
                    self.state = State::Ground;
                }
                ESC => self.state = State::Escape,
                CAN | SUB => self.state = State::Ground,
                // other controls inside a sequence are ignored
                _ => {}
            },
            State::Str => match c {
                BEL | CAN | SUB | '\u{9c}' => self.state = State::Ground,
                ESC => self.state = State::StrEscape,
                _ => {}
            },
            State::StrEscape => {
                if c == '\\' {
                    self.state = State::Ground;
                } else {
                    self.state = State::Escape;
                    self.step(c, out)?;
                }
            }
        }
        Ok(())
    }

    fn start_csi(&mut self) {
        self.params.clear();
        self.state = State::Csi;
    }

    fn put(&mut self, c: char) {
        if self.cursor < self.line.len() {
            self.line[self.cursor] = c;
        } else {
            self.line.push(c);
        }
        self.cursor += 1;
    }

    fn backspace(&mut self) {
        if self.cursor == 0 {
            return;
        }
        if self.cursor == self.line.len() {
            self.line.pop();
        }
        self.cursor -= 1;
    }

    fn newline(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        self.flush_line(out)?;
        out.write_all(b"\n")
    }

    fn flush_line(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        let s: String = self.line.drain(..).collect();
        self.cursor = 0;
        out.write_all(s.as_bytes())
    }
}

/// Writes what was on screen as plain text: output and error with escape sequences removed,
/// `\r\n` as `\n`, a lone `\r` going back to the line start, backspace deleting the previous
/// character; other control characters except `\n` and `\t` are dropped.
pub fn text<R: Read>(mut reader: RecordingReader<R>, out: impl Write) -> Result<(), FormatError> {
    let mut out = BufWriter::new(out);
    let mut decoders = Decoders::default();
    let mut screen = Screen::new();
    while let Some(rec) = reader.next_record()? {
        if let Record::Data {
            channel,
            direction,
            data,
            ..
        } = rec
        {
            if is_screen(direction) {
                let s = decoders.decode(channel, direction, &data);
                screen.feed(&s, &mut out)?;
            }
        }
    }
    let mut tails: Vec<_> = decoders.0.into_iter().collect();
    tails.sort_by_key(|(key, _)| *key);
    for (_, mut stream) in tails {
        let mut s = String::new();
        stream.finish(&mut s);
        screen.feed(&s, &mut out)?;
    }
    screen.flush_line(&mut out)?;
    out.flush()?;
    Ok(())
}

/// Replays the terminal output (output and error bytes, as they were) to `out`, flushing after
/// each record, with the original delays between records divided by `speed`. A single idle gap
/// lasts at most 2 s / `speed`. `speed` must be positive; `f64::INFINITY` replays without delay.
pub fn play<R: Read>(
    mut reader: RecordingReader<R>,
    speed: f64,
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
    while let Some(rec) = reader.next_record()? {
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
        out.write_all(&data)?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::RecordingWriter;
    use crate::{CloseSummary, RecordingMeta};
    use bytes::Bytes;

    fn recording(recs: &[Record]) -> Vec<u8> {
        let meta = RecordingMeta {
            recording_id: "r".into(),
            user: "alice".into(),
            account: "root".into(),
            target: "db1".into(),
            start_ms: 1_700_000_000_500,
            ..Default::default()
        };
        let mut w = RecordingWriter::new(Vec::new(), &meta).expect("new");
        for r in recs {
            w.write(r).expect("write");
        }
        w.finish().expect("finish")
    }

    fn data(ts_us: u64, direction: Direction, bytes: &[u8]) -> Record {
        Record::Data {
            ts_us,
            channel: 0,
            direction,
            data: Bytes::copy_from_slice(bytes),
        }
    }

    fn resize(ts_us: u64, cols: u32, rows: u32) -> Record {
        Record::Resize {
            ts_us,
            channel: 0,
            cols,
            rows,
        }
    }

    fn cast(recs: &[Record]) -> Vec<serde_json::Value> {
        let bytes = recording(recs);
        let mut out = Vec::new();
        asciicast(RecordingReader::open(&bytes[..]).expect("open"), &mut out).expect("cast");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.ends_with('\n'));
        text.lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    fn render(chunks: &[&[u8]]) -> String {
        let recs: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| data(i as u64, Direction::Output, c))
            .collect();
        let bytes = recording(&recs);
        let mut out = Vec::new();
        text(RecordingReader::open(&bytes[..]).expect("open"), &mut out).expect("text");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn asciicast_header_events_and_split_utf8() {
        let euro = "€".as_bytes(); // 3 bytes
        let lines = cast(&[
            data(5, Direction::Output, b"$ "),
            resize(6, 100, 30),
            data(1_500_000, Direction::Output, &[b'a', euro[0]]),
            data(1_600_000, Direction::Output, &euro[1..]),
            data(1_700_000, Direction::Input, b"ls\r"),
            resize(2_000_001, 120, 40),
            data(2_100_000, Direction::Error, b"bad \xff byte"),
            data(2_200_000, Direction::Output, &euro[..2]),
            Record::Close {
                ts_us: 3_000_000,
                summary: CloseSummary::default(),
            },
        ]);
        let header = &lines[0];
        assert_eq!(header["version"], 2);
        assert_eq!(header["width"], 100);
        assert_eq!(header["height"], 30);
        assert_eq!(header["timestamp"], 1_700_000_000u64);
        assert_eq!(header["title"], "alice@root@db1");
        assert_eq!(header["env"]["TERM"], DEFAULT_TERM);
        let events: Vec<(f64, String, String)> = lines[1..]
            .iter()
            .map(|e| {
                (
                    e[0].as_f64().expect("time"),
                    e[1].as_str().expect("code").to_string(),
                    e[2].as_str().expect("data").to_string(),
                )
            })
            .collect();
        let expect = [
            (0.000005, "o", "$ "),
            (1.5, "o", "a"),
            (1.6, "o", "€"),
            (1.7, "i", "ls\r"),
            (2.000001, "r", "120x40"),
            (2.1, "o", "bad \u{fffd} byte"),
            (3.0, "o", "\u{fffd}"),
        ];
        assert_eq!(events.len(), expect.len(), "{events:?}");
        for (got, want) in events.iter().zip(expect) {
            assert!((got.0 - want.0).abs() < 1e-9, "{got:?} vs {want:?}");
            assert_eq!((got.1.as_str(), got.2.as_str()), (want.1, want.2));
        }
    }

    #[test]
    fn asciicast_default_size_without_resize() {
        let lines = cast(&[data(0, Direction::Output, b"\x1b[1mhi\x1b[0m\r\n\"q\"")]);
        assert_eq!(lines[0]["width"], 80);
        assert_eq!(lines[0]["height"], 24);
        assert_eq!(lines[1][2], "\x1b[1mhi\x1b[0m\r\n\"q\"");
    }

    #[test]
    fn asciicast_pty_without_a_size_gets_the_default() {
        // `ssh -tt` with no terminal on stdin requests a 0x0 pty
        let lines = cast(&[
            resize(1, 0, 0),
            data(2, Direction::Output, b"$ "),
            resize(3, 0, 0),
            resize(4, 132, 0),
            resize(5, 100, 30),
        ]);
        assert_eq!(lines[0]["width"], 80);
        assert_eq!(lines[0]["height"], 24);
        // sizeless resizes are not events; a real one is
        let events: Vec<&serde_json::Value> = lines[1..].iter().collect();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0][1], "o");
        assert_eq!(events[1][1], "r");
        assert_eq!(events[1][2], "100x30");
        // the size the pty asked for wins when it has one
        let lines = cast(&[resize(1, 120, 40), data(2, Direction::Output, b"x")]);
        assert_eq!(
            (&lines[0]["width"], &lines[0]["height"]),
            (&120.into(), &40.into())
        );
        assert_eq!(lines.len(), 2);
        // one side 0 is no size either
        let lines = cast(&[resize(1, 0, 40)]);
        assert_eq!(
            (&lines[0]["width"], &lines[0]["height"]),
            (&80.into(), &24.into())
        );
    }

    #[test]
    fn text_strips_escapes_and_applies_controls() {
        assert_eq!(render(&[b"\x1b[1;31mred\x1b[0m"]), "red");
        assert_eq!(render(&[b"\x1b]0;title\x07x"]), "x");
        assert_eq!(render(&[b"\x1b]0;title\x1b\\x"]), "x");
        assert_eq!(render(&[b"abc\x08d"]), "abd");
        assert_eq!(render(&[b"a\r\nb\r\n"]), "a\nb\n");
        assert_eq!(render(&[b"hello\rj"]), "jello");
        assert_eq!(render(&[b"abc\x08 \x08\x08x"]), "ax");
        assert_eq!(render(&[b"abcdef\r\x1b[2Cx\x1b[K\n"]), "x\n");
        assert_eq!(
            render(&[b"\x1b(Bplain\x1b)0\x1b=\x1b7t\x07\x00\tz"]),
            "plaint\tz"
        );
        assert_eq!(render(&[b"\x1bP1$r\x1b\\ok"]), "ok");
    }

    #[test]
    fn text_state_survives_record_boundaries() {
        assert_eq!(
            render(&[b"\x1b[1", b";31mred\x1b", b"[0m", "é".as_bytes()]),
            "redé"
        );
        let e = "é".as_bytes();
        assert_eq!(render(&[&e[..1], &e[1..], b"\r", b"\n"]), "é\n");
    }

    #[test]
    fn play_writes_output_only_and_caps_gaps() {
        let bytes = recording(&[
            data(0, Direction::Output, b"a"),
            data(1, Direction::Input, b"x"),
            data(100_000_000, Direction::Error, b"b"),
            resize(100_000_001, 1, 1),
            data(100_200_000, Direction::Output, b"c"),
        ]);
        let started = Instant::now();
        let mut out = Vec::new();
        play(
            RecordingReader::open(&bytes[..]).expect("open"),
            20.0,
            &mut out,
        )
        .expect("play");
        let took = started.elapsed();
        assert_eq!(out, b"abc");
        // 2 s (capped) + 0.2 s at 20x
        assert!(took >= Duration::from_millis(105), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(play(
            RecordingReader::open(&bytes[..]).expect("open"),
            0.0,
            Vec::new()
        )
        .is_err());
    }
}
