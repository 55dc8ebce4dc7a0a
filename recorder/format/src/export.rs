//! Renderings of a recording: asciicast v2, plain text, and timed replay.
//!
//! - [`asciicast`]: JSON lines that `asciinema play` understands (header, then `o`/`i`/`r`
//!   events). Bytes are decoded as UTF-8 per channel and direction; a sequence cut between two
//!   records is carried over, invalid bytes become U+FFFD. Besides what JSON requires, DEL, the
//!   C1 controls (U+0080–U+009F, which serde_json would leave raw: U+009B is CSI on many
//!   terminals) and the bidi controls are written as `\u` escapes, so the file holds no raw
//!   control character and still decodes to the exact text.
//! - [`text`]: what was on screen as plain text: the terminal output with escape sequences
//!   removed and carriage returns, backspaces and line erases applied to the current line,
//!   lines wrapped at the terminal's width. Control characters that are left (NUL, BEL, C1
//!   controls, DEL) and the bidi controls and line separators (U+061C, U+200E, U+200F,
//!   U+2028–U+202E, U+2066–U+2069) are shown escaped, `\u{7}` or `\u{202e}`, never raw; a
//!   backslash the session printed is left as it is.
//! - [`play`]: the terminal output written with its original timing, sped up by a factor,
//!   through the [`Sanitizer`] (only what draws the screen reaches the auditor's terminal), or
//!   raw with [`Replay::Raw`].
//!
//! All three merge every channel of the session; `text` and `play` show output and error
//! only (what the user saw), `asciicast` also has input events.
//!
//! # Memory
//!
//! Nothing grows with the length of a recording or of a line in it. Each function holds one
//! record at a time (a DATA record is at most [`MAX_RECORD`] = 16 MiB, as the file format
//! bounds it; the recorder writes far smaller ones) with the reader's buffers (see
//! [`RecordingReader`]: 128 KiB and a zstd window of at most 8 MiB), and decodes, sanitizes
//! and writes it in pieces of 64 KiB (at most 192 KiB of text each). [`text`] holds one line
//! of at most [`MAX_COLUMNS`] characters and at most 16 bytes of a control sequence;
//! [`asciicast`] also holds back up to 1 MiB of records (plus the record that crosses it) while
//! it looks for the terminal size. So a recording is rendered in at most about 50 MiB, and a
//! typical one (records of 32 KiB) in a few MiB: the integration test `replay` exports 256 MiB
//! of output without a newline as text in under 64 MiB of peak RSS for all of psmctl.
//!
//! What it does not do: emulate a full terminal (cursor movement, screens, scroll regions,
//! the width of wide characters: the text rendering counts characters).

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

#[cfg(doc)]
use crate::file::MAX_RECORD;
use crate::file::{Record, RecordingReader};
use crate::sanitize::{is_bidi_control, Sanitizer};
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
/// Widest line of [`text`]: lines wrap at the terminal's width, or at this many characters
/// when the width is unknown (no pty, or one without a size) or larger.
pub const MAX_COLUMNS: usize = 1024;
/// How many DATA bytes are decoded (or sanitized) and written at once.
const PIECE: usize = 64 * 1024;
/// CSI parameter bytes [`text`] keeps (it only needs to recognise erase in line).
const MAX_CSI_PARAMS: usize = 16;

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
    /// Decodes `data` into `s` (cleared first).
    fn decode(&mut self, channel: u32, direction: Direction, data: &[u8], s: &mut String) {
        s.clear();
        self.0
            .entry((channel, direction as u8))
            .or_default()
            .decode(data, s);
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

/// Whether the asciicast writes `c` as a `\u` escape although JSON allows it raw.
fn cast_escapes(c: char) -> bool {
    ('\u{7f}'..='\u{9f}').contains(&c) || is_bidi_control(c)
}

/// serde_json's compact output, with [`cast_escapes`] characters written as `\u00XX`.
struct CastFormatter;

impl serde_json::ser::Formatter for CastFormatter {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> std::io::Result<()>
    where
        W: ?Sized + Write,
    {
        let mut last = 0;
        for (i, c) in fragment.char_indices() {
            if cast_escapes(c) {
                writer.write_all(&fragment.as_bytes()[last..i])?;
                // all of them are in the BMP: four hex digits
                write!(writer, "\\u{:04x}", c as u32)?;
                last = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[last..])
    }
}

/// Writes `value` as JSON with [`CastFormatter`].
fn cast_json<T: Serialize + ?Sized>(out: &mut impl Write, value: &T) -> Result<(), FormatError> {
    let mut ser = serde_json::Serializer::with_formatter(out, CastFormatter);
    value.serialize(&mut ser).map_err(json_err)
}

/// Writes one `[time, "code", "text"]` line.
fn cast_event(out: &mut impl Write, ts_us: u64, code: &str, text: &str) -> Result<(), FormatError> {
    write!(
        out,
        "[{}.{:06}, \"{code}\", ",
        ts_us / 1_000_000,
        ts_us % 1_000_000
    )?;
    cast_json(out, text)?;
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
/// (those without a size are left out), output and error `o` events, input `i` events. A
/// DATA record longer than 64 KiB becomes several events with its timestamp.
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
            // each record counts its size in memory too: a file of empty records ends the
            // lookahead as one of large ones does
            Record::Data { data, .. } => {
                held_bytes += data.len() + std::mem::size_of::<Record>();
            }
            Record::Close { .. } => held_bytes += std::mem::size_of::<Record>(),
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
    cast_json(&mut out, &header)?;
    out.write_all(b"\n")?;

    let mut decoders = Decoders::default();
    let mut text = String::new();
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
                let code = if is_screen(direction) { "o" } else { "i" };
                for piece in data.chunks(PIECE) {
                    decoders.decode(channel, direction, piece, &mut text);
                    if !text.is_empty() {
                        cast_event(out, ts_us, code, &text)?;
                    }
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
///
/// Holds one line of at most [`MAX_COLUMNS`] characters and [`MAX_CSI_PARAMS`] parameter
/// bytes, whatever it is fed.
struct Screen {
    state: State,
    /// CSI parameter bytes (the first [`MAX_CSI_PARAMS`]), to tell erase-line apart.
    params: String,
    /// The CSI had more parameter bytes than were kept.
    params_cut: bool,
    line: Vec<char>,
    cursor: usize,
    /// Where lines wrap (1..=MAX_COLUMNS).
    width: usize,
}

impl Screen {
    fn new() -> Self {
        Screen {
            state: State::Ground,
            params: String::with_capacity(MAX_CSI_PARAMS),
            params_cut: false,
            line: Vec::new(),
            cursor: 0,
            width: MAX_COLUMNS,
        }
    }

    /// The terminal now has `cols` columns (0: unknown).
    fn set_width(&mut self, cols: u32) {
        self.width = match usize::try_from(cols) {
            Ok(c) if (1..=MAX_COLUMNS).contains(&c) => c,
            _ => MAX_COLUMNS,
        };
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
                // other controls (C1 included) and the bidi controls are shown escaped
                c => self.put(c, out)?,
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
                '\x30'..='\x3f' => {
                    if self.params.len() < MAX_CSI_PARAMS {
                        self.params.push(c);
                    } else {
                        self.params_cut = true;
                    }
                }
                '\x20'..='\x2f' => {}
                '\x40'..='\x7e' => {
                    let erase_to_end =
                        !self.params_cut && (self.params.is_empty() || self.params == "0");
                    if c == 'K' && erase_to_end {
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
        self.params_cut = false;
        self.state = State::Csi;
    }

    /// Writes `c` at the cursor; past the last column the line wraps first, as a terminal's.
    fn put(&mut self, c: char, out: &mut impl Write) -> std::io::Result<()> {
        if self.cursor >= self.width {
            self.newline(out)?;
        }
        if self.cursor < self.line.len() {
            self.line[self.cursor] = c;
        } else {
            self.line.push(c);
        }
        self.cursor += 1;
        Ok(())
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
        let mut buf = [0u8; 4];
        for c in self.line.drain(..) {
            if shown_escaped(c) {
                write!(out, "\\u{{{:x}}}", c as u32)?;
            } else {
                out.write_all(c.encode_utf8(&mut buf).as_bytes())?;
            }
        }
        self.cursor = 0;
        Ok(())
    }
}

/// Whether [`text`] shows `c` as `\u{…}`: control characters but the tab, and the bidi
/// controls and line separators.
fn shown_escaped(c: char) -> bool {
    (c.is_control() && c != '\t') || is_bidi_control(c)
}

/// Writes what was on screen as plain text: output and error with escape sequences removed,
/// `\r\n` as `\n`, a lone `\r` going back to the line start, backspace deleting the previous
/// character, lines wrapped at the terminal's width (from the resize records; [`MAX_COLUMNS`]
/// when unknown or wider); other control characters but `\n` and `\t`, and the bidi controls,
/// are written escaped (`\u{7}`, `\u{202e}`). Memory stays bounded (see the module docs).
pub fn text<R: Read>(mut reader: RecordingReader<R>, out: impl Write) -> Result<(), FormatError> {
    let mut out = BufWriter::new(out);
    let mut decoders = Decoders::default();
    let mut screen = Screen::new();
    let mut s = String::new();
    while let Some(rec) = reader.next_record()? {
        match rec {
            Record::Data {
                channel,
                direction,
                data,
                ..
            } if is_screen(direction) => {
                for piece in data.chunks(PIECE) {
                    decoders.decode(channel, direction, piece, &mut s);
                    screen.feed(&s, &mut out)?;
                }
            }
            Record::Resize { cols, .. } => screen.set_width(cols),
            _ => {}
        }
    }
    let mut tails: Vec<_> = decoders.0.into_iter().collect();
    tails.sort_by_key(|(key, _)| *key);
    for (_, mut stream) in tails {
        s.clear();
        stream.finish(&mut s);
        screen.feed(&s, &mut out)?;
    }
    screen.flush_line(&mut out)?;
    out.flush()?;
    Ok(())
}

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
    let mut sanitizer = Sanitizer::new();
    let mut safe = Vec::new();
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
        match mode {
            Replay::Raw => out.write_all(&data)?,
            Replay::Safe => {
                for piece in data.chunks(PIECE) {
                    safe.clear();
                    sanitizer.feed(piece, &mut safe);
                    out.write_all(&safe)?;
                }
            }
        }
        out.flush()?;
    }
    if mode == Replay::Safe {
        safe.clear();
        sanitizer.finish(&mut safe);
        out.write_all(&safe)?;
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
    fn asciicast_lookahead_is_bounded_by_records_not_only_bytes() {
        // empty DATA records carry no bytes, but each one held costs memory: the lookahead
        // for the terminal size stops within its bound (the default size, not the late resize)
        let mut recs: Vec<Record> = (0..100_000)
            .map(|i| data(i, Direction::Output, b""))
            .collect();
        recs.push(resize(100_000, 132, 50));
        let lines = cast(&recs);
        assert_eq!(
            (&lines[0]["width"], &lines[0]["height"]),
            (&80.into(), &24.into())
        );
        assert_eq!(lines.last().expect("events")[2], "132x50");
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
            "plaint\\u{7}\\u{0}\tz"
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
            Replay::Safe,
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
            Replay::Raw,
            Vec::new()
        )
        .is_err());
    }

    const HOSTILE: &[u8] = b"\x1b]52;c;SGVsbG8=\x07\x1b]0;pwned\x07\x1bP$q m\x1b\\\x1b[6n\x1b[>c\x9b6n\x1b[1;31mred\x1b[0m \xc2\x9d8;;x\x07ok\r\n";

    #[test]
    fn play_is_safe_by_default_and_raw_on_request() {
        let bytes = recording(&[
            data(0, Direction::Output, &HOSTILE[..7]),
            data(1, Direction::Output, &HOSTILE[7..]),
        ]);
        let mut out = Vec::new();
        let reader = RecordingReader::open(&bytes[..]).expect("open");
        play(reader, f64::INFINITY, Replay::Safe, &mut out).expect("play");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "\x1b[1;31mred\x1b[0m ok\r\n\x1b[0m"
        );
        let mut out = Vec::new();
        let reader = RecordingReader::open(&bytes[..]).expect("open");
        play(reader, f64::INFINITY, Replay::Raw, &mut out).expect("play");
        assert_eq!(out, HOSTILE);
    }

    #[test]
    fn asciicast_escapes_c1_and_bidi_controls() {
        let shown = "a\u{9b}6n\u{9d}52;c;eA==\u{7}\u{85}\u{7f}\u{202e}cba \u{1b}[1mb";
        let bytes = recording(&[data(0, Direction::Output, shown.as_bytes())]);
        let mut out = Vec::new();
        asciicast(RecordingReader::open(&bytes[..]).expect("open"), &mut out).expect("cast");
        let file = String::from_utf8(out).expect("utf-8");
        let raw: Vec<char> = file
            .chars()
            .filter(|c| (c.is_control() && *c != '\n') || is_bidi_control(*c))
            .collect();
        assert!(raw.is_empty(), "raw controls {raw:?} in {file}");
        assert!(file.contains("\\u009b6n\\u009d52"), "{file}");
        assert!(file.contains("\\u202e"), "{file}");
        let event: serde_json::Value =
            serde_json::from_str(file.lines().nth(1).expect("event")).expect("json");
        assert_eq!(event[2], shown);
    }

    #[test]
    fn text_escapes_bidi_and_control_characters() {
        assert_eq!(
            render(&["abc\u{202e}txt.exe".as_bytes()]),
            "abc\\u{202e}txt.exe"
        );
        assert_eq!(
            render(&["\u{2066}x\u{2069}\u{200f}\u{61c}".as_bytes()]),
            "\\u{2066}x\\u{2069}\\u{200f}\\u{61c}"
        );
        // C1 controls, raw in UTF-8, are shown, not acted on
        assert_eq!(
            render(&["\u{9b}31mx\u{85}".as_bytes()]),
            "\\u{9b}31mx\\u{85}"
        );
        assert_eq!(render(&[b"a\x07b\x7f"]), "a\\u{7}b\\u{7f}");
        // escape sequences are still removed, text kept as printed
        assert_eq!(render(&[b"\x1b[31mC:\\dir\x1b[0m"]), "C:\\dir");
    }

    #[test]
    fn text_wraps_at_the_terminal_width() {
        let long = vec![b'a'; 200];
        let render_with = |recs: &[Record]| {
            let bytes = recording(recs);
            let mut out = Vec::new();
            text(RecordingReader::open(&bytes[..]).expect("open"), &mut out).expect("text");
            String::from_utf8(out).expect("utf-8")
        };
        let lens = |s: &str| s.split('\n').map(str::len).collect::<Vec<_>>();
        let got = render_with(&[resize(0, 80, 24), data(1, Direction::Output, &long)]);
        assert_eq!(lens(&got), [80, 80, 40]);
        // exactly the width: no empty line after it
        let got = render_with(&[resize(0, 100, 24), data(1, Direction::Output, &long[..100])]);
        assert_eq!(lens(&got), [100]);
        let got = render_with(&[
            resize(0, 100, 24),
            data(1, Direction::Output, &[&long[..100], &b"\r\n"[..]].concat()),
        ]);
        assert_eq!(lens(&got), [100, 0]);
        // unknown (no pty, or 0x0) and absurd widths: MAX_COLUMNS
        let huge = vec![b'b'; 2 * MAX_COLUMNS + 5];
        for recs in [
            vec![data(1, Direction::Output, &huge)],
            vec![resize(0, 0, 0), data(1, Direction::Output, &huge)],
            vec![resize(0, u32::MAX, 24), data(1, Direction::Output, &huge)],
        ] {
            assert_eq!(lens(&render_with(&recs)), [MAX_COLUMNS, MAX_COLUMNS, 5]);
        }
        // a resize applies to what follows
        let got = render_with(&[
            resize(0, 10, 24),
            data(1, Direction::Output, &long[..15]),
            resize(2, 20, 24),
            data(3, Direction::Output, &long[..25]),
        ]);
        assert_eq!(lens(&got), [10, 20, 10]);
    }

    #[test]
    fn text_memory_does_not_grow_with_a_line() {
        let mut screen = Screen::new();
        let chunk = "x".repeat(PIECE);
        for _ in 0..64 {
            screen.feed(&chunk, &mut std::io::sink()).expect("feed");
        }
        assert!(
            screen.line.capacity() <= MAX_COLUMNS,
            "{}",
            screen.line.capacity()
        );
        let params = format!("\x1b[{}K", "1;".repeat(1_000_000));
        screen.feed(&params, &mut std::io::sink()).expect("feed");
        assert!(screen.params.capacity() <= MAX_CSI_PARAMS);
    }
}
