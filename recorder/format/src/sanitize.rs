//! A streaming, sans-IO filter that makes recorded terminal output safe to replay on a real
//! terminal.
//!
//! A recorded session is written by whoever was on the target, who may be hostile. Its output,
//! replayed raw on an auditor's terminal, could set the clipboard (OSC 52), retitle the window
//! (OSC 0/2), make the terminal answer queries (DSR `CSI 6n`, DA `CSI c`, DECRQSS in a DCS,
//! window reports `CSI t`, DECID `ESC Z`, ENQ) so that the answer lands in the auditor's shell
//! input, switch the keyboard into other modes (application cursor keys, bracketed paste,
//! mouse reporting, modifyOtherKeys, the kitty keyboard protocol), clear the scrollback
//! (`CSI 3 J`), print (`CSI i`) or hyperlink text (OSC 8).
//!
//! [`Sanitizer`] passes what draws the screen and drops everything else:
//!
//! - passed: printable text (valid UTF-8; an invalid byte becomes U+FFFD), BS, HT, LF, VT, FF,
//!   CR; SGR (`CSI … m`); cursor movement and positioning (`CSI A B C D E F G H f d e a \` I Z`,
//!   `CSI s`/`CSI u` without parameters, `ESC 7`, `ESC 8`, `ESC D`, `ESC E`, `ESC M`, `ESC H`);
//!   erase in line and display (`CSI K`, `CSI J` except `3 J`, `CSI X`); insert and delete of
//!   lines and characters (`CSI L M @ P`), scrolling (`CSI S`, `CSI T` with at most one
//!   parameter), the scroll region (`CSI r`), tab clear (`CSI g`), repeat (`CSI b`), insert
//!   mode (`CSI 4 h/l`), the private modes origin (6), autowrap (7), cursor visible (25) and
//!   the alternate screen (47, 1047, 1048, 1049) with `CSI ? … h/l` (other modes in the same
//!   sequence are removed from it), and the G0 character set (`ESC ( X`);
//! - dropped: every string (OSC, DCS, SOS, PM, APC) with its content, every other control
//!   sequence and escape sequence, the other C0 controls (NUL, ENQ, BEL, SO, SI, …), DEL, and
//!   every C1 control, as a UTF-8 character (U+0080–U+009F) or as a raw byte (0x80–0x9F that
//!   is not part of a UTF-8 character); a C1 control that introduces a sequence (CSI 0x9B, OSC
//!   0x9D, DCS 0x90, SOS 0x98, PM 0x9E, APC 0x9F) is dropped with the whole sequence.
//!
//! Parsing follows ECMA-48 and the DEC/xterm conventions: C0 controls inside a sequence are
//! acted on (passed or dropped as above) without ending it, ESC starts a new sequence, CAN and
//! SUB cancel one. A sequence split across [`feed`](Sanitizer::feed) calls is recognised the
//! same as a whole one.
//!
//! Memory is bounded: the sanitizer holds at most [`MAX_SEQUENCE`] bytes of a pending control
//! sequence and 3 bytes of a pending UTF-8 character; a longer control sequence is dropped
//! whole without being held, and strings are never held at all. Its output is at most three
//! times its input (U+FFFD for an invalid byte) plus the few bytes of [`finish`](Sanitizer::finish).
//!
//! [`finish`](Sanitizer::finish) also puts back what the replay left changed (SGR, hidden
//! cursor, alternate screen, scroll region, modes, character set), so the auditor's terminal is
//! left as it was.
//!
//! What it does not do: emulate a terminal, or judge text (bidi characters are passed; the
//! text and asciicast exports escape them, see [`is_bidi_control`]).

/// Longest control or escape sequence held back while it is parsed (longer ones are dropped).
pub const MAX_SEQUENCE: usize = 256;

const ESC: u8 = 0x1b;
const CAN: u8 = 0x18;
const SUB: u8 = 0x1a;
const DEL: u8 = 0x7f;
const BEL: u8 = 0x07;
const REPLACEMENT: &[u8] = "\u{fffd}".as_bytes();

/// Whether `c` reorders text when displayed or breaks a line where none is: the Unicode bidi
/// controls (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069) and the line and
/// paragraph separators (U+2028, U+2029). The text and asciicast exports escape them.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// Where the parser is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ground,
    /// Inside a UTF-8 character: `need` continuation bytes to come (the bytes so far in `utf8`).
    Utf8 {
        need: u8,
    },
    /// After ESC (held in `seq`).
    Escape,
    /// After ESC and intermediate bytes (held in `seq`).
    EscIntermediate,
    /// An escape sequence being dropped: up to its final byte.
    EscDrop,
    /// A control sequence (`ESC [` …, held in `seq`).
    Csi,
    /// A control sequence being dropped: up to its final byte.
    CsiDrop,
    /// A string (OSC when `bel_ends`; DCS, SOS, PM, APC otherwise) being dropped, up to ST.
    Str {
        bel_ends: bool,
    },
    /// ESC inside a string: `\` ends it (ST), anything else ends it and starts a new sequence.
    StrEscape,
}

/// What the replay changed in the terminal, to be put back by [`Sanitizer::finish`].
#[derive(Clone, Copy, Debug, Default)]
struct Changed {
    sgr: bool,
    cursor_hidden: bool,
    alt_screen: bool,
    scroll_region: bool,
    origin_mode: bool,
    no_autowrap: bool,
    insert_mode: bool,
    charset: bool,
}

/// Streaming filter of terminal output: bytes in, the safe bytes out. See the module docs.
#[derive(Debug)]
pub struct Sanitizer {
    state: State,
    /// The pending sequence, from its ESC (at most [`MAX_SEQUENCE`] bytes).
    seq: Vec<u8>,
    /// The pending UTF-8 character.
    utf8: [u8; 4],
    utf8_len: u8,
    /// Inside a dropped string: continuation bytes still expected after a UTF-8 lead byte, and
    /// that lead byte (so `C2 9C`, U+009C, ends the string while `C3 9C`, Ü, does not).
    str_need: u8,
    str_lead: u8,
    changed: Changed,
}

impl Default for Sanitizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Sanitizer {
    /// A sanitizer in the ground state.
    pub fn new() -> Self {
        Sanitizer {
            state: State::Ground,
            seq: Vec::with_capacity(MAX_SEQUENCE),
            utf8: [0; 4],
            utf8_len: 0,
            str_need: 0,
            str_lead: 0,
            changed: Changed::default(),
        }
    }

    /// Filters `input`, appending the bytes that are safe to `out`. What a sequence split at the
    /// end of `input` needs is kept for the next call.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.step(b, out);
        }
    }

    /// Ends the stream: an incomplete UTF-8 character becomes U+FFFD, an incomplete sequence is
    /// dropped, and what the replay changed in the terminal is put back. The sanitizer can then
    /// be fed a new stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if matches!(self.state, State::Utf8 { .. }) {
            out.extend_from_slice(REPLACEMENT);
        }
        self.state = State::Ground;
        self.seq.clear();
        self.utf8_len = 0;
        let c = std::mem::take(&mut self.changed);
        if c.alt_screen {
            out.extend_from_slice(b"\x1b[?1049l");
        }
        if c.scroll_region {
            // DECSTBM homes the cursor: keep it where it is
            out.extend_from_slice(b"\x1b7\x1b[r\x1b8");
        }
        if c.origin_mode {
            out.extend_from_slice(b"\x1b[?6l");
        }
        if c.no_autowrap {
            out.extend_from_slice(b"\x1b[?7h");
        }
        if c.insert_mode {
            out.extend_from_slice(b"\x1b[4l");
        }
        if c.charset {
            out.extend_from_slice(b"\x1b(B");
        }
        if c.sgr {
            out.extend_from_slice(b"\x1b[0m");
        }
        if c.cursor_hidden {
            out.extend_from_slice(b"\x1b[?25h");
        }
    }

    fn step(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Ground => self.ground(b, out),
            State::Utf8 { need } => self.utf8_continue(b, need, out),
            State::Escape => self.escape(b, out),
            State::EscIntermediate => self.esc_intermediate(b, out),
            State::EscDrop => {
                if !self.in_sequence_control(b, out) {
                    match b {
                        0x20..=0x2f => {}
                        _ => self.state = State::Ground,
                    }
                }
            }
            State::Csi => self.csi(b, out),
            State::CsiDrop => {
                if !self.in_sequence_control(b, out) {
                    match b {
                        0x20..=0x3f => {}
                        _ => self.state = State::Ground,
                    }
                }
            }
            State::Str { bel_ends } => self.string(b, bel_ends),
            State::StrEscape => {
                if b == b'\\' {
                    self.state = State::Ground;
                } else {
                    self.start_escape();
                    self.step(b, out);
                }
            }
        }
    }

    fn ground(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            0x20..=0x7e => out.push(b),
            ESC => self.start_escape(),
            0x00..=0x1f => control(b, out),
            DEL => {}
            0x80..=0x9f => self.c1(b),
            0xc2..=0xdf => self.start_utf8(b, 1),
            0xe0..=0xef => self.start_utf8(b, 2),
            0xf0..=0xf4 => self.start_utf8(b, 3),
            // a continuation byte out of place, or a byte UTF-8 never has
            _ => out.extend_from_slice(REPLACEMENT),
        }
    }

    fn start_utf8(&mut self, lead: u8, need: u8) {
        self.utf8[0] = lead;
        self.utf8_len = 1;
        self.state = State::Utf8 { need };
    }

    fn utf8_continue(&mut self, b: u8, need: u8, out: &mut Vec<u8>) {
        let lead = self.utf8[0];
        let first = self.utf8_len == 1;
        let (lo, hi) = match lead {
            0xe0 if first => (0xa0, 0xbf),
            0xed if first => (0x80, 0x9f),
            0xf0 if first => (0x90, 0xbf),
            0xf4 if first => (0x80, 0x8f),
            _ => (0x80, 0xbf),
        };
        if !(lo..=hi).contains(&b) {
            out.extend_from_slice(REPLACEMENT);
            self.state = State::Ground;
            self.utf8_len = 0;
            self.step(b, out);
            return;
        }
        if lead == 0xc2 && b <= 0x9f {
            // U+0080..U+009F: a C1 control written in UTF-8
            self.state = State::Ground;
            self.utf8_len = 0;
            self.c1(b);
            return;
        }
        self.utf8[self.utf8_len as usize] = b;
        self.utf8_len += 1;
        if need == 1 {
            out.extend_from_slice(&self.utf8[..self.utf8_len as usize]);
            self.utf8_len = 0;
            self.state = State::Ground;
        } else {
            self.state = State::Utf8 { need: need - 1 };
        }
    }

    /// A C1 control (from a raw byte or UTF-8): dropped, with the sequence it introduces.
    fn c1(&mut self, b: u8) {
        self.state = match b {
            0x9b => State::CsiDrop,
            0x9d => self.start_string(true),
            0x90 | 0x98 | 0x9e | 0x9f => self.start_string(false),
            _ => State::Ground,
        };
    }

    fn start_escape(&mut self) {
        self.seq.clear();
        self.seq.push(ESC);
        self.state = State::Escape;
    }

    fn start_string(&mut self, bel_ends: bool) -> State {
        self.seq.clear();
        self.str_need = 0;
        State::Str { bel_ends }
    }

    /// What a byte that cannot continue a sequence does there: C0 controls are acted on, ESC
    /// restarts, CAN and SUB cancel, DEL is ignored, a byte of 0x80 or more cancels the
    /// sequence and is read again. True when `b` was such a byte.
    fn in_sequence_control(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        match b {
            ESC => self.start_escape(),
            CAN | SUB => self.state = State::Ground,
            0x00..=0x1f => control(b, out),
            DEL => {}
            0x80..=0xff => {
                self.state = State::Ground;
                self.step(b, out);
            }
            _ => return false,
        }
        true
    }

    fn escape(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.in_sequence_control(b, out) {
            return;
        }
        match b {
            b'[' => {
                self.seq.push(b);
                self.state = State::Csi;
            }
            b']' => self.state = self.start_string(true),
            b'P' | b'X' | b'^' | b'_' => self.state = self.start_string(false),
            0x20..=0x2f => {
                self.seq.push(b);
                self.state = State::EscIntermediate;
            }
            _ => {
                // a final byte: save/restore cursor, index, next line, reverse index, tab set
                if matches!(b, b'7' | b'8' | b'D' | b'E' | b'M' | b'H') {
                    out.extend_from_slice(&[ESC, b]);
                }
                self.state = State::Ground;
            }
        }
    }

    fn esc_intermediate(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.in_sequence_control(b, out) {
            return;
        }
        match b {
            0x20..=0x2f => {
                // only `ESC ( X` passes: more intermediates make it something to drop
                self.state = State::EscDrop;
            }
            _ => {
                if self.seq == [ESC, b'('] {
                    out.extend_from_slice(&[ESC, b'(', b]);
                    self.changed.charset = b != b'B';
                }
                self.state = State::Ground;
            }
        }
    }

    fn csi(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.in_sequence_control(b, out) {
            return;
        }
        match b {
            0x20..=0x3f => {
                let after_intermediate = self.seq.last().is_some_and(|l| (0x20..=0x2f).contains(l));
                if self.seq.len() >= MAX_SEQUENCE || (b >= 0x30 && after_intermediate) {
                    self.state = State::CsiDrop;
                } else {
                    self.seq.push(b);
                }
            }
            _ => {
                self.state = State::Ground;
                let body = std::mem::take(&mut self.seq);
                self.control_sequence(&body[2..], b, out);
                self.seq = body;
            }
        }
    }

    fn string(&mut self, b: u8, bel_ends: bool) {
        if self.str_need > 0 && (0x80..=0xbf).contains(&b) {
            if self.str_lead == 0xc2 && b == 0x9c {
                // U+009C, ST, in UTF-8
                self.state = State::Ground;
            } else {
                self.str_need -= 1;
            }
            return;
        }
        self.str_need = 0;
        match b {
            BEL if bel_ends => self.state = State::Ground,
            ESC => self.state = State::StrEscape,
            CAN | SUB | 0x9c => self.state = State::Ground,
            0xc2..=0xf4 => {
                self.str_lead = b;
                self.str_need = match b {
                    0xc2..=0xdf => 1,
                    0xe0..=0xef => 2,
                    _ => 3,
                };
            }
            _ => {}
        }
    }

    /// Decides on a complete control sequence: `ESC [`, `body` (parameter and intermediate
    /// bytes), `fin`.
    fn control_sequence(&mut self, body: &[u8], fin: u8, out: &mut Vec<u8>) {
        let (marker, params) = match body.first() {
            Some(m @ (b'<' | b'=' | b'>' | b'?')) => (Some(*m), &body[1..]),
            _ => (None, body),
        };
        // intermediates, or a marker byte anywhere else: nothing that draws
        if !params
            .iter()
            .all(|p| p.is_ascii_digit() || *p == b';' || *p == b':')
        {
            return;
        }
        let pass = |out: &mut Vec<u8>| {
            out.extend_from_slice(b"\x1b[");
            out.extend_from_slice(body);
            out.push(fin);
        };
        let numbers = || params.split(|p| *p == b';');
        match (marker, fin) {
            (None, b'm') => {
                self.changed.sgr = true;
                pass(out);
            }
            (
                None,
                b'A' | b'B' | b'C' | b'D' | b'E' | b'F' | b'G' | b'H' | b'f' | b'd' | b'e' | b'a'
                | b'`' | b'I' | b'Z' | b'K' | b'X' | b'L' | b'M' | b'@' | b'P' | b'S' | b'g' | b'b',
            ) => pass(out),
            // 3 J clears the scrollback
            (None, b'J') if numbers().all(|n| matches!(n, b"" | b"0" | b"1" | b"2")) => pass(out),
            // more parameters make it xterm's mouse highlight tracking
            (None, b'T') if !params.contains(&b';') => pass(out),
            (None, b'r') => {
                self.changed.scroll_region = !params.is_empty();
                pass(out);
            }
            // with parameters these are other things (margins, the kitty keyboard protocol)
            (None, b's' | b'u') if params.is_empty() => pass(out),
            (None, b'h' | b'l') => {
                let set = fin == b'h';
                self.modes(b"", numbers(), fin, out, |c, mode| match mode {
                    b"4" => {
                        c.insert_mode = set;
                        true
                    }
                    _ => false,
                });
            }
            (Some(b'?'), b'h' | b'l') => {
                let set = fin == b'h';
                self.modes(b"?", numbers(), fin, out, |c, mode| {
                    match mode {
                        b"6" => c.origin_mode = set,
                        b"7" => c.no_autowrap = !set,
                        b"25" => c.cursor_hidden = !set,
                        b"47" | b"1047" | b"1049" => c.alt_screen = set,
                        b"1048" => {}
                        _ => return false,
                    }
                    true
                });
            }
            _ => {}
        }
    }

    /// Writes `ESC [ marker` with the modes `allow` keeps, and `fin`; nothing when none is kept.
    fn modes<'a>(
        &mut self,
        marker: &[u8],
        modes: impl Iterator<Item = &'a [u8]>,
        fin: u8,
        out: &mut Vec<u8>,
        mut allow: impl FnMut(&mut Changed, &[u8]) -> bool,
    ) {
        let start = out.len();
        out.extend_from_slice(b"\x1b[");
        out.extend_from_slice(marker);
        let mut kept = 0;
        for mode in modes {
            if allow(&mut self.changed, mode) {
                if kept > 0 {
                    out.push(b';');
                }
                out.extend_from_slice(mode);
                kept += 1;
            }
        }
        if kept == 0 {
            out.truncate(start);
        } else {
            out.push(fin);
        }
    }
}

/// A C0 control in the text: the ones that move the cursor on the screen pass.
fn control(b: u8, out: &mut Vec<u8>) {
    if matches!(b, 0x08..=0x0d) {
        out.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sanitizes `input` whole, then one byte at a time, and checks both agree.
    fn clean(input: &[u8]) -> Vec<u8> {
        let mut whole = Vec::new();
        Sanitizer::new().feed(input, &mut whole);
        let mut s = Sanitizer::new();
        let mut bytewise = Vec::new();
        for b in input {
            s.feed(std::slice::from_ref(b), &mut bytewise);
        }
        assert_eq!(
            String::from_utf8_lossy(&bytewise),
            String::from_utf8_lossy(&whole),
            "byte at a time differs for {:?}",
            String::from_utf8_lossy(input)
        );
        // and split in two at every point
        for cut in 1..input.len() {
            let mut s = Sanitizer::new();
            let mut split = Vec::new();
            s.feed(&input[..cut], &mut split);
            s.feed(&input[cut..], &mut split);
            assert_eq!(split, whole, "split at {cut}");
        }
        whole
    }

    fn clean_str(input: &[u8]) -> String {
        String::from_utf8(clean(input)).expect("sanitized output is UTF-8")
    }

    #[test]
    fn strings_are_dropped_with_their_content() {
        for evil in [
            &b"\x1b]52;c;SGVsbG8=\x07"[..],
            b"\x1b]52;c;SGVsbG8=\x1b\\",
            b"\x1b]0;pwned\x07",
            b"\x1b]2;pwned\x1b\\",
            b"\x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\",
            b"\x1b]1337;File=name=eA==:eA==\x07",
            b"\x1bP$q m\x1b\\",
            b"\x1bP+q544e\x1b\\",
            b"\x1b_Gf=100;AAAA\x1b\\",
            b"\x1b^privacy\x1b\\",
            b"\x1bXstart of string\x1b\\",
            "\x1b]0;Übersicht\x07".as_bytes(),
            "\x1b]0;title\u{9c}".as_bytes(),
        ] {
            let got = clean_str(&[b"a", evil, b"z"].concat());
            let want = if evil.starts_with(b"\x1b]8;;") {
                "alinkz"
            } else {
                "az"
            };
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(evil));
        }
    }

    #[test]
    fn queries_and_input_modes_are_dropped() {
        for evil in [
            &b"\x1b[5n"[..],
            b"\x1b[6n",
            b"\x1b[?6n",
            b"\x1b[c",
            b"\x1b[0c",
            b"\x1b[>c",
            b"\x1b[>0c",
            b"\x1b[=c",
            b"\x1b[?2026$p",
            b"\x1b[4$p",
            b"\x1b[14t",
            b"\x1b[21t",
            b"\x1b[8;100;100t",
            b"\x1b[x",
            b"\x1b[3J",
            b"\x1b[5i",
            b"\x1b[?1h",
            b"\x1b[?1000h",
            b"\x1b[?1006h",
            b"\x1b[?2004h",
            b"\x1b[?1004h",
            b"\x1b[20h",
            b"\x1b[>4;2m",
            b"\x1b[>1u",
            b"\x1b[?u",
            b"\x1b[1;2;3;4;5T",
            b"\x1bZ",
            b"\x1b=",
            b"\x1bc",
            b"\x1b F",
            b"\x1b%G",
            b"\x1b)0",
            b"\x05\x07\x00\x0e\x0f\x7f",
        ] {
            assert_eq!(
                clean_str(&[b"a", evil, b"z"].concat()),
                "az",
                "{:?}",
                String::from_utf8_lossy(evil)
            );
        }
    }

    #[test]
    fn c1_controls_are_dropped_raw_and_in_utf8() {
        // raw bytes: CSI 6n, OSC 52, DCS, APC, a lone NEL
        let raw = b"a\x9b6nb\x9d52;c;SGVsbG8=\x07c\x90$q m\x9cd\x9fapc\x9ce\x85f";
        assert_eq!(clean_str(raw), "abcdef");
        let utf8 = "a\u{9b}6nb\u{9d}0;t\u{9c}c\u{90}$q m\u{9c}d\u{85}e\u{9b}31mf";
        assert_eq!(clean_str(utf8.as_bytes()), "abcdef");
        // U+0080..U+009F never come out, whatever follows
        for c in 0x80u32..=0x9f {
            let c = char::from_u32(c).expect("char");
            let out = clean_str(format!("x{c}y").as_bytes());
            assert!(!out.contains(c), "{c:?} in {out:?}");
            assert!(!clean(&[b'x', c as u8, b'y'])
                .iter()
                .any(|b| (0x80..=0x9f).contains(b)));
        }
    }

    #[test]
    fn what_draws_the_screen_passes() {
        for good in [
            &b"\x1b[m"[..],
            b"\x1b[0m",
            b"\x1b[1;31m",
            b"\x1b[38;5;208m",
            b"\x1b[38:2::10:20:30m",
            b"\x1b[A",
            b"\x1b[3B",
            b"\x1b[10C",
            b"\x1b[D",
            b"\x1b[5;10H",
            b"\x1b[H",
            b"\x1b[2;3f",
            b"\x1b[12d",
            b"\x1b[40G",
            b"\x1b[K",
            b"\x1b[2K",
            b"\x1b[J",
            b"\x1b[2J",
            b"\x1b[3L",
            b"\x1b[2M",
            b"\x1b[4@",
            b"\x1b[4P",
            b"\x1b[5X",
            b"\x1b[2S",
            b"\x1b[T",
            b"\x1b[1;20r",
            b"\x1b[r",
            b"\x1b[?1049h",
            b"\x1b[?1049l",
            b"\x1b[?25l",
            b"\x1b[?25h",
            b"\x1b[?1047h",
            b"\x1b[?47l",
            b"\x1b[s",
            b"\x1b[u",
            b"\x1b7",
            b"\x1b8",
            b"\x1bM",
            b"\x1b(0",
            b"\x1b(B",
            b"\r\n\t\x08",
        ] {
            let input = [b"a", good, b"z"].concat();
            assert_eq!(clean(&input), input, "{:?}", String::from_utf8_lossy(good));
        }
        let text = "héllo wörld € 𝄞 日本";
        assert_eq!(clean_str(text.as_bytes()), text);
    }

    #[test]
    fn mixed_modes_keep_only_the_screen_ones() {
        assert_eq!(clean_str(b"\x1b[?1049;1000;25h"), "\x1b[?1049;25h");
        assert_eq!(clean_str(b"\x1b[?1;1000l"), "");
        assert_eq!(clean_str(b"\x1b[4;20h"), "\x1b[4h");
    }

    #[test]
    fn controls_inside_sequences_act_and_cancel() {
        // CR inside a CSI is acted on; the CSI still completes
        assert_eq!(clean_str(b"\x1b[1\r;31mx"), "\r\x1b[1;31mx");
        // ESC restarts, CAN cancels
        assert_eq!(clean_str(b"\x1b[6\x1b[32mx"), "\x1b[32mx");
        assert_eq!(clean_str(b"\x1b[6\x18nx"), "nx");
        // ESC inside an OSC that is not ST ends it and starts a new sequence
        assert_eq!(clean_str(b"\x1b]0;t\x1b[1mx"), "\x1b[1mx");
        // a DCS is not ended by BEL
        assert_eq!(clean_str(b"\x1bPq\x07#0\x1b\\x"), "x");
    }

    #[test]
    fn invalid_utf8_becomes_replacement() {
        assert_eq!(clean_str(b"a\xffb\xc3(c\xe2\x82"), "a\u{fffd}b\u{fffd}(c");
        let mut s = Sanitizer::new();
        let mut out = Vec::new();
        s.feed(b"a\xe2\x82", &mut out);
        s.finish(&mut out);
        assert_eq!(String::from_utf8(out).expect("utf-8"), "a\u{fffd}");
    }

    #[test]
    fn over_long_sequences_are_dropped_whole_in_bounded_memory() {
        let mut s = Sanitizer::new();
        let mut out = Vec::new();
        s.feed(b"a\x1b[", &mut out);
        for _ in 0..100_000 {
            s.feed(b"1;1;1;1;1;", &mut out);
            assert!(s.seq.len() <= MAX_SEQUENCE);
        }
        s.feed(b"mz", &mut out);
        assert_eq!(out, b"az");
        assert!(s.seq.capacity() <= MAX_SEQUENCE);
        // an unterminated string holds nothing
        let mut s = Sanitizer::new();
        let mut out = Vec::new();
        s.feed(b"\x1b]52;c;", &mut out);
        for _ in 0..100_000 {
            s.feed(b"QUFBQUFB", &mut out);
        }
        assert!(out.is_empty() && s.seq.capacity() <= MAX_SEQUENCE);
        s.feed(b"\x07ok", &mut out);
        assert_eq!(out, b"ok");
    }

    #[test]
    fn finish_puts_the_terminal_back() {
        let mut s = Sanitizer::new();
        let mut out = Vec::new();
        s.feed(b"\x1b[?1049h\x1b[?25l\x1b[1;10r\x1b(0\x1b[31mx", &mut out);
        out.clear();
        s.feed(b"\x1b[?25h\x1b]0;t", &mut out);
        s.finish(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "\x1b[?25h\x1b[?1049l\x1b7\x1b[r\x1b8\x1b(B\x1b[0m"
        );
        // nothing changed: nothing to put back
        let mut out = Vec::new();
        s.feed(b"plain", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"plain");
    }
}
