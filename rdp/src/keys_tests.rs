use super::Keyboard;

/// Presses and releases one key; returns what the press typed.
fn tap(k: &mut Keyboard, code: u8) -> Option<String> {
    let typed = k.scancode(code, false, false);
    assert_eq!(
        k.scancode(code, false, true),
        None,
        "a release types nothing"
    );
    typed
}

/// Types a sequence of plain (non-extended) taps and concatenates the text.
fn typed(k: &mut Keyboard, codes: &[u8]) -> String {
    codes.iter().filter_map(|c| tap(k, *c)).collect()
}

fn shifted(k: &mut Keyboard, code: u8) -> Option<String> {
    k.scancode(0x2A, false, false);
    let t = tap(k, code);
    k.scancode(0x2A, false, true);
    t
}

#[test]
fn us_letters_digits_and_specials() {
    let mut k = Keyboard::new(0x409);
    assert_eq!(k.note(), None);
    // h e l l o space w o r l d Enter
    let s = typed(
        &mut k,
        &[
            0x23, 0x12, 0x26, 0x26, 0x18, 0x39, 0x11, 0x18, 0x13, 0x26, 0x20, 0x1C,
        ],
    );
    assert_eq!(s, "hello world\r");
    assert_eq!(
        typed(&mut k, &[0x02, 0x0B, 0x0C, 0x0D, 0x0F, 0x0E]),
        "10-=\t\u{8}"
    );
    assert_eq!(shifted(&mut k, 0x03).as_deref(), Some("@"));
    assert_eq!(shifted(&mut k, 0x1E).as_deref(), Some("A"));
    assert_eq!(shifted(&mut k, 0x28).as_deref(), Some("\""));
    assert_eq!(tap(&mut k, 0x29).as_deref(), Some("`"));
    assert_eq!(tap(&mut k, 0x2B).as_deref(), Some("\\"));
    // Right shift works the same.
    k.scancode(0x36, false, false);
    assert_eq!(tap(&mut k, 0x35).as_deref(), Some("?"));
    k.scancode(0x36, false, true);
    assert_eq!(tap(&mut k, 0x35).as_deref(), Some("/"));
}

#[test]
fn caps_lock_shifts_letters_only_and_sync_sets_it() {
    let mut k = Keyboard::new(0x409);
    tap(&mut k, 0x3A);
    assert_eq!(typed(&mut k, &[0x1E, 0x02]), "A1");
    assert_eq!(shifted(&mut k, 0x1E).as_deref(), Some("a"));
    tap(&mut k, 0x3A);
    assert_eq!(tap(&mut k, 0x1E).as_deref(), Some("a"));
    k.sync(true, false);
    assert_eq!(tap(&mut k, 0x1E).as_deref(), Some("A"));
    k.sync(false, false);
    assert_eq!(tap(&mut k, 0x1E).as_deref(), Some("a"));
    // Auto-repeat (downs without a release) toggles Caps Lock once.
    k.scancode(0x3A, false, false);
    k.scancode(0x3A, false, false);
    k.scancode(0x3A, false, true);
    assert_eq!(tap(&mut k, 0x1E).as_deref(), Some("A"));
}

#[test]
fn ctrl_letters_give_control_characters_alt_gives_nothing() {
    let mut k = Keyboard::new(0x409);
    k.scancode(0x1D, false, false);
    assert_eq!(tap(&mut k, 0x2E).as_deref(), Some("\u{3}"), "Ctrl+C");
    assert_eq!(tap(&mut k, 0x20).as_deref(), Some("\u{4}"), "Ctrl+D");
    assert_eq!(tap(&mut k, 0x02), None, "Ctrl+1");
    k.scancode(0x1D, false, true);
    k.scancode(0x1D, true, false);
    assert_eq!(tap(&mut k, 0x1E).as_deref(), Some("\u{1}"), "right Ctrl+A");
    k.scancode(0x1D, true, true);
    k.scancode(0x38, false, false);
    assert_eq!(tap(&mut k, 0x3E), None, "Alt+F4");
    assert_eq!(tap(&mut k, 0x1E), None, "Alt+A");
    k.scancode(0x38, false, true);
    assert_eq!(tap(&mut k, 0x1E).as_deref(), Some("a"));
}

#[test]
fn navigation_and_function_keys_type_nothing_keypad_follows_num_lock() {
    let mut k = Keyboard::new(0x409);
    for code in [0x47u8, 0x48, 0x49, 0x4B, 0x4D, 0x4F, 0x50, 0x51, 0x52, 0x53] {
        assert_eq!(k.scancode(code, true, false), None, "extended {code:#x}");
        k.scancode(code, true, true);
    }
    for code in [0x01u8, 0x3B, 0x44, 0x57, 0x58] {
        assert_eq!(tap(&mut k, code), None, "{code:#x}");
    }
    // Keypad without Num Lock: navigation; operators always type.
    assert_eq!(typed(&mut k, &[0x47, 0x4F, 0x37, 0x4A, 0x4E]), "*-+");
    tap(&mut k, 0x45);
    assert_eq!(typed(&mut k, &[0x4F, 0x50, 0x51, 0x53, 0x52]), "123.0");
    assert_eq!(
        k.scancode(0x1C, true, false).as_deref(),
        Some("\r"),
        "keypad Enter"
    );
    assert_eq!(
        k.scancode(0x35, true, false).as_deref(),
        Some("/"),
        "keypad /"
    );
}

#[test]
fn uk_layout() {
    let mut k = Keyboard::new(0x809);
    assert_eq!(shifted(&mut k, 0x03).as_deref(), Some("\""));
    assert_eq!(shifted(&mut k, 0x04).as_deref(), Some("£"));
    assert_eq!(shifted(&mut k, 0x28).as_deref(), Some("@"));
    assert_eq!(tap(&mut k, 0x2B).as_deref(), Some("#"));
    assert_eq!(tap(&mut k, 0x56).as_deref(), Some("\\"));
    assert_eq!(typed(&mut k, &[0x10, 0x11]), "qw");
}

#[test]
fn german_layout_with_altgr() {
    let mut k = Keyboard::new(0x407);
    assert_eq!(
        typed(&mut k, &[0x15, 0x2C, 0x27, 0x28, 0x1A, 0x0C]),
        "zyöäüß"
    );
    assert_eq!(shifted(&mut k, 0x03).as_deref(), Some("\""));
    assert_eq!(shifted(&mut k, 0x08).as_deref(), Some("/"));
    assert_eq!(shifted(&mut k, 0x27).as_deref(), Some("Ö"));
    assert_eq!(tap(&mut k, 0x35).as_deref(), Some("-"));
    assert_eq!(tap(&mut k, 0x29), None, "dead ^");
    // AltGr as the right Alt key...
    k.scancode(0x38, true, false);
    assert_eq!(tap(&mut k, 0x10).as_deref(), Some("@"));
    assert_eq!(tap(&mut k, 0x12).as_deref(), Some("€"));
    assert_eq!(tap(&mut k, 0x0C).as_deref(), Some("\\"));
    k.scancode(0x38, true, true);
    // ...and as Ctrl+Alt, as Windows clients send it.
    k.scancode(0x1D, false, false);
    k.scancode(0x38, true, false);
    assert_eq!(tap(&mut k, 0x08).as_deref(), Some("{"));
    k.scancode(0x38, true, true);
    k.scancode(0x1D, false, true);
    k.sync(true, false);
    assert_eq!(
        tap(&mut k, 0x27).as_deref(),
        Some("Ö"),
        "Caps Lock on umlauts"
    );
}

#[test]
fn french_layout() {
    let mut k = Keyboard::new(0x40C);
    // a z e r t y q w m
    assert_eq!(
        typed(
            &mut k,
            &[0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x1E, 0x2C, 0x27]
        ),
        "azertyqwm"
    );
    assert_eq!(typed(&mut k, &[0x02, 0x03, 0x0A, 0x0B]), "&éçà");
    assert_eq!(shifted(&mut k, 0x02).as_deref(), Some("1"));
    assert_eq!(shifted(&mut k, 0x0B).as_deref(), Some("0"));
    assert_eq!(typed(&mut k, &[0x32, 0x33, 0x34, 0x35]), ",;:!");
    k.scancode(0x38, true, false);
    assert_eq!(tap(&mut k, 0x0B).as_deref(), Some("@"));
    k.scancode(0x38, true, true);
    k.scancode(0x1D, false, false);
    assert_eq!(
        tap(&mut k, 0x10).as_deref(),
        Some("\u{1}"),
        "Ctrl+A on AZERTY"
    );
}

#[test]
fn unknown_layout_decodes_as_us_with_a_note() {
    let mut k = Keyboard::new(0x0413);
    let note = k.note().unwrap_or_default();
    assert!(note.contains("0x413") && note.contains("US"), "{note}");
    assert_eq!(typed(&mut k, &[0x15]), "y");
}

#[test]
fn unicode_events_and_surrogate_pairs() {
    let mut k = Keyboard::new(0x409);
    assert_eq!(k.unicode(u16::from(b'h'), false).as_deref(), Some("h"));
    assert_eq!(k.unicode(u16::from(b'h'), true), None);
    assert_eq!(k.unicode(0x00E9, false).as_deref(), Some("é"));
    // U+1F600 = D83D DE00
    assert_eq!(k.unicode(0xD83D, false), None);
    assert_eq!(k.unicode(0xD83D, true), None);
    assert_eq!(k.unicode(0xDE00, false).as_deref(), Some("😀"));
    // A lone low surrogate is not a character.
    assert_eq!(k.unicode(0xDE00, false).as_deref(), Some("\u{FFFD}"));
}
