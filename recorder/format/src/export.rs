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

#[cfg(doc)]
use crate::file::{RecordingReader, MAX_RECORD};
#[cfg(doc)]
use crate::sanitize::Sanitizer;
use crate::Direction;

mod cast;
mod plain_text;
mod replay;

pub use cast::asciicast;
pub use plain_text::{text, MAX_COLUMNS};
pub use replay::{play, replay_with, Replay, ReplayError, Step};

/// How many DATA bytes are decoded (or sanitized) and written at once.
const PIECE: usize = 64 * 1024;

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

#[cfg(test)]
mod tests {
    use super::cast::DEFAULT_TERM;
    use super::*;
    use crate::file::{Record, RecordingReader, RecordingWriter};
    use crate::sanitize::is_bidi_control;
    use crate::{CloseSummary, RecordingMeta};
    use bytes::Bytes;
    use std::time::{Duration, Instant};

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
}
