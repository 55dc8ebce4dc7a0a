//! Lines of text out of a channel's bytes, sans-IO: bytes in, finished lines out.
//!
//! [`LineSplitter`] turns one direction of one channel into the lines a reader would search
//! for. Output (screen) bytes lose their escape sequences (CSI, OSC, DCS and the like, and
//! two-byte `ESC x`), other control characters and invalid UTF-8; a CR returns to the start of
//! the line (what follows overwrites it, as on a terminal), backspace moves back one character,
//! LF ends the line. Input (typed) bytes are split the same way, on CR or LF, with backspace and
//! DEL erasing the last character, so `lss\x7f\r` is the line `ls`.
//!
//! It is not a terminal emulator: cursor movement, screen clears and full-screen programs are
//! not modelled, so what an editor draws in place is searched as fragments of lines, and text
//! that was drawn and then erased by cursor addressing is still found. Memory is bounded per
//! stream: a line keeps at most [`MAX_LINE`] characters (the rest until its end is dropped),
//! an escape sequence is forgotten after [`MAX_ESCAPE`] bytes, and a partial UTF-8 sequence is
//! at most 3 bytes.

/// Longest line kept, in characters; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 512;
/// Longest escape sequence followed; a longer one ends without effect.
pub const MAX_ESCAPE: usize = 4096;

/// Which way the bytes went, for the splitter's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// What the user typed: split on CR or LF, backspace and DEL erase.
    Input,
    /// What the screen showed: escape sequences stripped, CR returns, LF ends a line.
    Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Esc {
    /// Plain text.
    None,
    /// After ESC.
    Start,
    /// In a CSI sequence (`ESC [` ... final byte 0x40..=0x7e).
    Csi,
    /// In a string (OSC, DCS, SOS, PM, APC) until BEL or ST.
    Str,
    /// In a string, after ESC (ST is `ESC \`).
    StrEscape,
    /// After `ESC` and an intermediate byte (charset selection and the like): one more byte.
    One,
}

/// Splits one stream's bytes into lines. Feed it bytes with their time offset; take finished
/// lines with their offset (the time the line started) from [`feed`](Self::feed)'s output.
#[derive(Debug)]
pub struct LineSplitter {
    kind: Kind,
    line: Vec<char>,
    cursor: usize,
    /// Characters of the current line dropped past [`MAX_LINE`].
    overflow: bool,
    started_us: Option<u64>,
    esc: Esc,
    esc_len: usize,
    utf8: [u8; 4],
    utf8_len: usize,
    utf8_need: usize,
    /// The last byte was a CR (of input): a following LF is the same line end.
    after_cr: bool,
}

/// A finished line and the time offset (microseconds since the session started) at which its
/// first character arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Microseconds since the session started.
    pub ts_us: u64,
    /// The text, without control characters; never empty or only spaces.
    pub text: String,
}

impl LineSplitter {
    /// A splitter for bytes of this kind.
    pub fn new(kind: Kind) -> Self {
        LineSplitter {
            kind,
            line: Vec::new(),
            cursor: 0,
            overflow: false,
            started_us: None,
            esc: Esc::None,
            esc_len: 0,
            utf8: [0; 4],
            utf8_len: 0,
            utf8_need: 0,
            after_cr: false,
        }
    }

    /// Feeds bytes that arrived at `ts_us`; pushes every line they finish onto `out`.
    pub fn feed(&mut self, ts_us: u64, bytes: &[u8], out: &mut Vec<Line>) {
        for &b in bytes {
            self.byte(ts_us, b, out);
        }
    }

    /// Ends the stream: the unfinished line, if any, is pushed onto `out`.
    pub fn finish(&mut self, out: &mut Vec<Line>) {
        self.end_line(out);
        self.esc = Esc::None;
        self.utf8_len = 0;
        self.utf8_need = 0;
    }

    fn byte(&mut self, ts_us: u64, b: u8, out: &mut Vec<Line>) {
        if self.esc != Esc::None {
            self.escape(b);
            return;
        }
        if self.utf8_need > 0 {
            if b & 0xc0 == 0x80 {
                self.utf8[self.utf8_len] = b;
                self.utf8_len += 1;
                if self.utf8_len == self.utf8_need {
                    // (C1 controls, U+0080 to U+009F, are two-byte sequences: dropped like C0)
                    if let Some(c) = std::str::from_utf8(&self.utf8[..self.utf8_len])
                        .ok()
                        .and_then(|s| s.chars().next())
                        .filter(|c| !c.is_control())
                    {
                        self.put(ts_us, c);
                    }
                    self.utf8_len = 0;
                    self.utf8_need = 0;
                }
                return;
            }
            // an unfinished sequence: dropped, and this byte read afresh
            self.utf8_len = 0;
            self.utf8_need = 0;
        }
        let was_cr = std::mem::replace(&mut self.after_cr, false);
        match b {
            0x1b if self.kind == Kind::Output => {
                self.esc = Esc::Start;
                self.esc_len = 0;
            }
            b'\n' if !(self.kind == Kind::Input && was_cr) => self.end_line(out),
            b'\n' => {}
            b'\r' => match self.kind {
                Kind::Input => {
                    self.end_line(out);
                    self.after_cr = true;
                }
                Kind::Output => self.cursor = 0,
            },
            0x08 | 0x7f => match self.kind {
                Kind::Input => {
                    if self.line.pop().is_some() {
                        self.cursor = self.line.len();
                    }
                }
                Kind::Output => {
                    if b == 0x08 {
                        self.cursor = self.cursor.saturating_sub(1);
                    }
                }
            },
            // ^U kills the typed line
            0x15 if self.kind == Kind::Input => {
                self.line.clear();
                self.cursor = 0;
            }
            b'\t' => self.put(ts_us, ' '),
            0x00..=0x1f => {}
            0x20..=0x7e => self.put(ts_us, b as char),
            0xc2..=0xdf => self.start_utf8(b, 2),
            0xe0..=0xef => self.start_utf8(b, 3),
            0xf0..=0xf4 => self.start_utf8(b, 4),
            _ => {}
        }
    }

    fn start_utf8(&mut self, b: u8, need: usize) {
        self.utf8[0] = b;
        self.utf8_len = 1;
        self.utf8_need = need;
    }

    fn escape(&mut self, b: u8) {
        self.esc_len += 1;
        if self.esc_len > MAX_ESCAPE {
            self.esc = Esc::None;
            return;
        }
        self.esc = match (self.esc, b) {
            (Esc::Start, b'[') => Esc::Csi,
            (Esc::Start, b']' | b'P' | b'X' | b'^' | b'_') => Esc::Str,
            (Esc::Start, 0x20..=0x2f) => Esc::One,
            (Esc::Start, _) => Esc::None,
            (Esc::One, _) => Esc::None,
            (Esc::Csi, 0x40..=0x7e) => Esc::None,
            (Esc::Csi, 0x18 | 0x1a) => Esc::None,
            (Esc::Csi, _) => Esc::Csi,
            (Esc::Str, 0x07) => Esc::None,
            (Esc::Str, 0x1b) => Esc::StrEscape,
            (Esc::Str, _) => Esc::Str,
            (Esc::StrEscape, b'\\') => Esc::None,
            (Esc::StrEscape, _) => Esc::Str,
            (Esc::None, _) => Esc::None,
        };
    }

    fn put(&mut self, ts_us: u64, c: char) {
        if self.started_us.is_none() {
            self.started_us = Some(ts_us);
        }
        if self.cursor < self.line.len() {
            self.line[self.cursor] = c;
            self.cursor += 1;
        } else if self.line.len() < MAX_LINE {
            self.line.push(c);
            self.cursor = self.line.len();
        } else {
            self.overflow = true;
        }
    }

    fn end_line(&mut self, out: &mut Vec<Line>) {
        let text: String = self.line.iter().collect();
        let text = text.trim_end();
        if let Some(ts_us) = self.started_us {
            if !text.trim_start().is_empty() {
                out.push(Line {
                    ts_us,
                    text: text.to_string(),
                });
            }
        }
        self.line.clear();
        self.cursor = 0;
        self.overflow = false;
        self.started_us = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(kind: Kind, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::new(kind);
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            s.feed(i as u64, c, &mut out);
        }
        s.finish(&mut out);
        out.into_iter().map(|l| l.text).collect()
    }

    #[test]
    fn output_strips_escape_sequences() {
        let got = lines(
            Kind::Output,
            &[b"\x1b[1;32muser@host\x1b[0m:~$ ls\r\n\x1b]0;title\x07file\x1b(B.txt\r\n"],
        );
        assert_eq!(got, ["user@host:~$ ls", "file.txt"]);
    }

    #[test]
    fn c1_controls_are_dropped_like_c0_ones() {
        // U+0082 and U+009B (a C1 CSI) in UTF-8, in both directions; é and € stay
        for kind in [Kind::Output, Kind::Input] {
            let got = lines(kind, &[b"x\xc2\x82y \xc3\xa9\xc2", b"\x9bz \xe2\x82\xac\n"]);
            assert_eq!(got, ["xy \u{e9}z \u{20ac}"], "{kind:?}");
        }
    }

    #[test]
    fn escape_split_across_chunks() {
        let got = lines(
            Kind::Output,
            &[b"ab\x1b[3", b"1mcd\x1b]2;x", b"y\x1b\\ef\n"],
        );
        assert_eq!(got, ["abcdef"]);
    }

    #[test]
    fn output_cr_overwrites_and_backspace_moves() {
        assert_eq!(lines(Kind::Output, &[b"12345\rab\n"]), ["ab345"]);
        assert_eq!(lines(Kind::Output, &[b"abc\x08\x08XY\n"]), ["aXY"]);
    }

    #[test]
    fn input_backspace_and_line_ends() {
        assert_eq!(
            lines(
                Kind::Input,
                &[b"lss\x7f -l\r", b"\n", b"whoami\n", b"x\x08\x08y\r\n"]
            ),
            ["ls -l", "whoami", "y"]
        );
        assert_eq!(lines(Kind::Input, &[b"rm -rf /\x15echo hi\r"]), ["echo hi"]);
    }

    #[test]
    fn long_lines_are_capped() {
        let long = vec![b'a'; MAX_LINE * 3];
        let got = lines(Kind::Output, &[&long, b"\nnext\n"]);
        assert_eq!(got[0].chars().count(), MAX_LINE);
        assert_eq!(got[1], "next");
    }

    #[test]
    fn unterminated_escape_is_bounded() {
        let mut bytes = b"\x1b]".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', MAX_ESCAPE + 10));
        bytes.extend_from_slice(b"visible\n");
        let got = lines(Kind::Output, &[&bytes]);
        assert_eq!(got.len(), 1);
        assert!(got[0].ends_with("visible"), "{got:?}");
    }

    #[test]
    fn utf8_split_and_invalid() {
        let s = "héllo wörld\n".as_bytes();
        let got = lines(Kind::Output, &[&s[..2], &s[2..9], &s[9..]]);
        assert_eq!(got, ["héllo wörld"]);
        assert_eq!(lines(Kind::Output, &[b"a\xff\xc3b\n"]), ["ab"]);
    }

    #[test]
    fn time_is_the_first_character() {
        let mut s = LineSplitter::new(Kind::Output);
        let mut out = Vec::new();
        s.feed(10, b"\x1b[0m", &mut out);
        s.feed(20, b"ab", &mut out);
        s.feed(30, b"c\n", &mut out);
        assert_eq!(
            out,
            [Line {
                ts_us: 20,
                text: "abc".into()
            }]
        );
    }

    #[test]
    fn blank_lines_are_skipped() {
        assert!(lines(Kind::Output, &[b"\r\n   \r\n\x1b[K\n"]).is_empty());
    }
}
