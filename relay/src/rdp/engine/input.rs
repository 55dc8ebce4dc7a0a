//! The user's input: keyboard events become typed text (for the recording's keys channel and
//! search), and any keyboard or mouse event counts as activity (for the idle timeout).

use ironrdp_core::decode;
use ironrdp_pdu::input::fast_path::{
    FastPathInput, FastPathInputEvent, KeyboardFlags, SynchronizeFlags,
};
use ironrdp_pdu::input::scan_code::KeyboardFlags as SlowKeyboardFlags;
use ironrdp_pdu::input::sync::SyncToggleFlags;
use ironrdp_pdu::input::unicode::KeyboardFlags as SlowUnicodeFlags;
use ironrdp_pdu::input::InputEvent;
use psm_rdp::keys::Keyboard;

/// Typed-text decoding for one session.
pub(super) struct Input {
    keyboard: Keyboard,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Input")
    }
}

/// What one input PDU gave.
#[derive(Debug, Default)]
pub(super) struct Fed {
    /// Text typed.
    pub typed: String,
    /// Whether it held a keyboard or mouse event.
    pub activity: bool,
}

impl Input {
    /// Decoding for the client's keyboard layout.
    pub fn new(layout: u32) -> Input {
        Input {
            keyboard: Keyboard::new(layout),
        }
    }

    /// A fast-path input frame (whole, header included).
    pub fn fast_path(&mut self, frame: &[u8]) -> Result<Fed, String> {
        check_fast_path_header(frame)?;
        let input: FastPathInput = decode(frame).map_err(|e| format!("fast-path input: {e}"))?;
        let mut fed = Fed::default();
        for ev in input.input_events() {
            match *ev {
                FastPathInputEvent::KeyboardEvent(flags, code) => {
                    fed.activity = true;
                    fed.push(self.keyboard.scancode(
                        code,
                        flags.contains(KeyboardFlags::EXTENDED),
                        flags.contains(KeyboardFlags::RELEASE),
                    ));
                }
                FastPathInputEvent::UnicodeKeyboardEvent(flags, unit) => {
                    fed.activity = true;
                    fed.push(
                        self.keyboard
                            .unicode(unit, flags.contains(KeyboardFlags::RELEASE)),
                    );
                }
                FastPathInputEvent::MouseEvent(_)
                | FastPathInputEvent::MouseEventEx(_)
                | FastPathInputEvent::MouseEventRel(_) => fed.activity = true,
                FastPathInputEvent::SyncEvent(flags) => self.keyboard.sync(
                    flags.contains(SynchronizeFlags::CAPS_LOCK),
                    flags.contains(SynchronizeFlags::NUM_LOCK),
                ),
                FastPathInputEvent::QoeEvent(_) => {}
            }
        }
        Ok(fed)
    }

    /// The events of a slow-path Input PDU.
    pub fn slow_path(&mut self, events: &[InputEvent]) -> Fed {
        let mut fed = Fed::default();
        for ev in events {
            match ev {
                InputEvent::ScanCode(s) => {
                    fed.activity = true;
                    // Set-1 scancodes fit a byte; a larger key code is no key psm knows.
                    if let Ok(code) = u8::try_from(s.key_code) {
                        fed.push(self.keyboard.scancode(
                            code,
                            s.flags.contains(SlowKeyboardFlags::EXTENDED),
                            s.flags.contains(SlowKeyboardFlags::RELEASE),
                        ));
                    }
                }
                InputEvent::Unicode(u) => {
                    fed.activity = true;
                    fed.push(
                        self.keyboard
                            .unicode(u.unicode_code, u.flags.contains(SlowUnicodeFlags::RELEASE)),
                    );
                }
                InputEvent::Mouse(_) | InputEvent::MouseX(_) | InputEvent::MouseRel(_) => {
                    fed.activity = true;
                }
                InputEvent::Sync(s) => self.keyboard.sync(
                    s.flags.contains(SyncToggleFlags::CAPS_LOCK),
                    s.flags.contains(SyncToggleFlags::NUM_LOCK),
                ),
                InputEvent::Unused(_) => {}
            }
        }
        fed
    }
}

impl Fed {
    fn push(&mut self, text: Option<String>) {
        if let Some(t) = text {
            self.typed.push_str(&t);
        }
    }
}

/// Refuses fast-path input headers whose length cannot hold the header itself (the decoder
/// would compute a negative data length).
fn check_fast_path_header(frame: &[u8]) -> Result<(), String> {
    let short = || "fast-path input header truncated".to_string();
    let first = *frame.first().ok_or_else(short)?;
    let a = *frame.get(1).ok_or_else(short)?;
    let (length, size_of_length) = if a & 0x80 != 0 {
        let b = *frame.get(2).ok_or_else(short)?;
        ((usize::from(a & 0x7f) << 8) | usize::from(b), 2)
    } else {
        (usize::from(a), 1)
    };
    let num_events_in_header = (first >> 2) & 0x0f;
    let extra = usize::from(num_events_in_header == 0);
    if length < 1 + size_of_length + extra {
        return Err("fast-path input length shorter than its header".into());
    }
    if first & 0xc0 != 0 {
        return Err("encrypted fast-path input (psm relays TLS sessions only)".into());
    }
    Ok(())
}
