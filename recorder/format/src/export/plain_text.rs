//! The plain-text rendering ([`text`]): what was on screen, through a small terminal that
//! keeps one line and drops escape sequences (memory bounds: see the parent module's docs).

use std::io::{BufWriter, Read, Write};

use super::{is_screen, Decoders, PIECE};
use crate::file::{Record, RecordingReader};
use crate::sanitize::is_bidi_control;
use crate::FormatError;

/// Widest line of [`text`]: lines wrap at the terminal's width, or at this many characters
/// when the width is unknown (no pty, or one without a size) or larger.
pub const MAX_COLUMNS: usize = 1024;
/// CSI parameter bytes [`text`] keeps (it only needs to recognise erase in line).
const MAX_CSI_PARAMS: usize = 16;

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

#[cfg(test)]
mod tests {
    use super::*;

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
