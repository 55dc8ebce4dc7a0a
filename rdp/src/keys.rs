//! Typed text from RDP keyboard input: set-1 scancodes (with the session's keyboard layout)
//! and Unicode keyboard events.
//!
//! The decoder is a small state machine fed with one key event at a time. It tracks the
//! modifier keys from their make/break events (Shift, Ctrl, Alt, AltGr) and the lock keys
//! (Caps Lock, Num Lock) from their presses and the client's synchronize events, and returns
//! the text a key-down produced: printable characters, `"\r"` for Enter, `"\t"` for Tab,
//! `"\u{8}"` for Backspace and control characters for Ctrl+letter. Navigation and function
//! keys produce nothing. Dead keys (accents on German and French layouts) produce nothing:
//! the following key's base character is still recorded.

/// Keyboard layouts with a table of their own; everything else is decoded as US.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Us,
    Uk,
    German,
    French,
}

/// Character produced by one key: without modifiers, with Shift, with AltGr (`'\0'` = none).
#[derive(Debug, Clone, Copy, Default)]
struct KeyChars {
    normal: char,
    shift: char,
    altgr: char,
}

/// Size of the scancode tables (set-1 make codes are below 0x80).
const CODES: usize = 0x80;

/// A layout's table: scancode → characters.
struct Table([KeyChars; CODES]);

impl Table {
    /// Sets consecutive keys from `start`: the n-th char of each string belongs to key `start + n`.
    /// `'\0'` marks "no character" (a dead key or an unused position).
    fn row(&mut self, start: u8, normal: &str, shift: &str, altgr: &str) {
        for (i, c) in normal.chars().enumerate() {
            if let Some(k) = self.0.get_mut(usize::from(start) + i) {
                k.normal = c;
            }
        }
        for (i, c) in shift.chars().enumerate() {
            if let Some(k) = self.0.get_mut(usize::from(start) + i) {
                k.shift = c;
            }
        }
        for (i, c) in altgr.chars().enumerate() {
            if let Some(k) = self.0.get_mut(usize::from(start) + i) {
                k.altgr = c;
            }
        }
    }

    fn us() -> Self {
        let mut t = Table([KeyChars::default(); CODES]);
        t.row(0x02, "1234567890-=", "!@#$%^&*()_+", "");
        t.row(0x10, "qwertyuiop[]", "QWERTYUIOP{}", "");
        t.row(0x1E, "asdfghjkl;'`", "ASDFGHJKL:\"~", "");
        t.row(0x2B, "\\zxcvbnm,./", "|ZXCVBNM<>?", "");
        t.row(0x39, " ", " ", "");
        t.row(0x56, "\\", "|", "");
        t
    }

    fn for_layout(layout: Layout) -> Self {
        let mut t = Table::us();
        match layout {
            Layout::Us => {}
            Layout::Uk => {
                t.row(0x02, "1234", "!\"£$", "\0\0\0€");
                t.row(0x28, "'`", "@¬", "");
                t.row(0x2B, "#", "~", "");
                t.row(0x56, "\\", "|", "");
            }
            Layout::German => {
                t.row(
                    0x02,
                    "1234567890ß\0",
                    "!\"§$%&/()=?\0",
                    "\0²³\0\0\0{[]}\\\0",
                );
                t.row(
                    0x10,
                    "qwertzuiopü+",
                    "QWERTZUIOPÜ*",
                    "@\0€\0\0\0\0\0\0\0\0~",
                );
                t.row(0x1E, "asdfghjklöä\0", "ASDFGHJKLÖÄ°", "");
                t.row(0x2B, "#yxcvbnm,.-", "'YXCVBNM;:_", "\0\0\0\0\0\0\0µ");
                t.row(0x56, "<", ">", "|");
            }
            Layout::French => {
                t.row(0x02, "&é\"'(-è_çà)=", "1234567890°+", "\0\0#{[|`\\^@]}");
                t.row(
                    0x10,
                    "azertyuiop\0$",
                    "AZERTYUIOP\0£",
                    "\0\0€\0\0\0\0\0\0\0\0¤",
                );
                t.row(0x1E, "qsdfghjklmù²", "QSDFGHJKLM%\0", "");
                t.row(0x2B, "*wxcvbn,;:!", "µWXCVBN?./§", "");
                t.row(0x56, "<", ">", "");
            }
        }
        t
    }

    fn get(&self, code: u8) -> KeyChars {
        self.0.get(usize::from(code)).copied().unwrap_or_default()
    }
}

impl Layout {
    fn from_id(id: u32) -> Option<Layout> {
        match id {
            0x0409 => Some(Layout::Us),
            0x0809 => Some(Layout::Uk),
            0x0407 | 0x0C07 => Some(Layout::German),
            0x040C => Some(Layout::French),
            _ => None,
        }
    }
}

// Set-1 scancodes with a meaning of their own.
const SC_BACKSPACE: u8 = 0x0E;
const SC_TAB: u8 = 0x0F;
const SC_ENTER: u8 = 0x1C;
const SC_CTRL: u8 = 0x1D;
const SC_LSHIFT: u8 = 0x2A;
const SC_RSHIFT: u8 = 0x36;
const SC_KP_STAR: u8 = 0x37;
const SC_ALT: u8 = 0x38;
const SC_CAPS: u8 = 0x3A;
const SC_NUMLOCK: u8 = 0x45;
const SC_SLASH: u8 = 0x35;

/// The typed-text decoder of one RDP session's keyboard (see the module docs).
pub struct Keyboard {
    layout_id: u32,
    known_layout: bool,
    table: Table,
    altgr_layout: bool,
    lshift: bool,
    rshift: bool,
    lctrl: bool,
    rctrl: bool,
    lalt: bool,
    ralt: bool,
    caps_lock: bool,
    num_lock: bool,
    caps_down: bool,
    num_down: bool,
    high_surrogate: Option<u16>,
}

impl Keyboard {
    /// A decoder for the keyboard layout the client announced (`ClientCoreData.keyboard_layout`,
    /// e.g. `0x409` US, `0x809` UK, `0x407` German, `0x40C` French). Unknown layouts are decoded
    /// as US; [`Keyboard::note`] then says so.
    pub fn new(layout: u32) -> Self {
        let known = Layout::from_id(layout);
        let l = known.unwrap_or(Layout::Us);
        Keyboard {
            layout_id: layout,
            known_layout: known.is_some(),
            table: Table::for_layout(l),
            altgr_layout: l != Layout::Us,
            lshift: false,
            rshift: false,
            lctrl: false,
            rctrl: false,
            lalt: false,
            ralt: false,
            caps_lock: false,
            num_lock: false,
            caps_down: false,
            num_down: false,
            high_surrogate: None,
        }
    }

    /// A note for the session's events when the layout is not one psm has a table for.
    pub fn note(&self) -> Option<String> {
        (!self.known_layout).then(|| {
            format!(
                "keyboard layout 0x{:x} unknown to psm: typed text decoded as US",
                self.layout_id
            )
        })
    }

    /// The client's synchronize event: the lock keys' state (sent at connection and on focus).
    pub fn sync(&mut self, caps_lock: bool, num_lock: bool) {
        self.caps_lock = caps_lock;
        self.num_lock = num_lock;
        // A synchronize event also means "no key is down" (the client sends it on focus-in).
        self.lshift = false;
        self.rshift = false;
        self.lctrl = false;
        self.rctrl = false;
        self.lalt = false;
        self.ralt = false;
    }

    /// One set-1 scancode event (`extended`: the E0 prefix, `released`: a break). Returns the
    /// text this key-down typed, if any.
    pub fn scancode(&mut self, code: u8, extended: bool, released: bool) -> Option<String> {
        let down = !released;
        match (code, extended) {
            (SC_LSHIFT, false) => self.lshift = down,
            (SC_RSHIFT, _) => self.rshift = down,
            (SC_CTRL, false) => self.lctrl = down,
            (SC_CTRL, true) => self.rctrl = down,
            (SC_ALT, false) => self.lalt = down,
            (SC_ALT, true) => self.ralt = down,
            (SC_CAPS, _) => {
                if down && !self.caps_down {
                    self.caps_lock = !self.caps_lock;
                }
                self.caps_down = down;
            }
            (SC_NUMLOCK, _) => {
                if down && !self.num_down {
                    self.num_lock = !self.num_lock;
                }
                self.num_down = down;
            }
            _ if released => {}
            _ => return self.key_down(code, extended),
        }
        None
    }

    /// One Unicode keyboard event (a UTF-16 code unit). Surrogate pairs arrive as two events;
    /// the character is returned with the second.
    pub fn unicode(&mut self, unit: u16, released: bool) -> Option<String> {
        if released {
            return None;
        }
        if (0xD800..0xDC00).contains(&unit) {
            self.high_surrogate = Some(unit);
            return None;
        }
        let high = self.high_surrogate.take();
        let units: Vec<u16> = match high {
            Some(h) if (0xDC00..0xE000).contains(&unit) => vec![h, unit],
            _ => vec![unit],
        };
        let s: String = char::decode_utf16(units)
            .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect();
        Some(s)
    }

    fn key_down(&mut self, code: u8, extended: bool) -> Option<String> {
        let ctrl = self.lctrl || self.rctrl;
        // Windows clients send AltGr as LCtrl + RAlt; Ctrl+Alt is AltGr on Windows too.
        let altgr = self.altgr_layout && (self.ralt || (ctrl && self.lalt));
        let alt = (self.lalt || self.ralt) && !altgr;
        let shift = self.lshift || self.rshift;
        if extended {
            return match code {
                SC_ENTER => Some("\r".into()),
                SC_SLASH if !ctrl && !alt => Some("/".into()),
                _ => None, // navigation keys, Windows keys, right Ctrl/Alt handled above
            };
        }
        match code {
            SC_ENTER => return Some("\r".into()),
            SC_TAB if !alt => return Some("\t".into()),
            SC_BACKSPACE => return Some("\u{8}".into()),
            _ => {}
        }
        if let Some(kp) = keypad(code, self.num_lock) {
            return (!ctrl && !alt).then(|| kp.to_string());
        }
        let k = self.table.get(code);
        if k.normal == '\0' && k.shift == '\0' {
            return None;
        }
        if altgr {
            return (k.altgr != '\0').then(|| k.altgr.to_string());
        }
        if alt {
            return None;
        }
        if ctrl {
            let base = k.normal.to_ascii_lowercase();
            return base
                .is_ascii_lowercase()
                .then(|| char::from(base as u8 - b'a' + 1).to_string());
        }
        // Caps Lock shifts letters only.
        let letter = k.normal.is_alphabetic() && k.normal.to_uppercase().eq([k.shift]);
        let shifted = if letter {
            shift != self.caps_lock
        } else {
            shift
        };
        let c = if shifted { k.shift } else { k.normal };
        (c != '\0').then(|| c.to_string())
    }
}

/// The keypad's characters (non-extended codes): digits and the point only with Num Lock on.
fn keypad(code: u8, num_lock: bool) -> Option<char> {
    let digit = match code {
        0x47 => '7',
        0x48 => '8',
        0x49 => '9',
        0x4B => '4',
        0x4C => '5',
        0x4D => '6',
        0x4F => '1',
        0x50 => '2',
        0x51 => '3',
        0x52 => '0',
        0x53 => '.',
        SC_KP_STAR => return Some('*'),
        0x4A => return Some('-'),
        0x4E => return Some('+'),
        _ => return None,
    };
    // Without Num Lock these are navigation keys (the table has nothing for them either).
    num_lock.then_some(digit)
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
