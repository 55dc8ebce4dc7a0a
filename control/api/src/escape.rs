//! Escaping of strings a peer chose (login names, commands, environment names, signal names)
//! before they are printed to a terminal or written to a log.
//!
//! A client can put anything in its login name: a newline that forges a whole log line, ESC that
//! drives the operator's terminal, NUL, or a bidi override (U+202E) that makes a line read
//! differently from what it holds. [`Escaped`] writes such characters as `\n`, `\r`, `\t`
//! or `\u{…}`, and a backslash as `\\`, so what is shown is unambiguous and inert. Printable
//! text, including non-ASCII letters, passes unchanged.
//!
//! What it does not do: decide what is allowed. The audit log (JSON) keeps the original string;
//! only its human renderings go through here.

use std::fmt::{self, Write as _};

/// Whether `c` reorders or hides text when displayed: the bidi embeddings, overrides and
/// isolates, the directional marks, and the other invisible format characters that matter.
pub fn is_bidi_or_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'              // arabic letter mark
        | '\u{200B}'..='\u{200F}' // zero-width space/joiners, LRM, RLM
        | '\u{2028}'..='\u{202E}' // line/paragraph separators, LRE, RLE, PDF, LRO, RLO
        | '\u{2060}'..='\u{2069}' // word joiner .. isolates (LRI, RLI, FSI, PDI)
        | '\u{FEFF}'            // zero-width no-break space
    )
}

/// Whether `c` must be escaped when shown: C0 and C1 controls, DEL, bidi and invisible format
/// characters, and the backslash (so that escapes cannot be forged).
pub fn needs_escape(c: char) -> bool {
    c.is_control() || is_bidi_or_invisible(c) || c == '\\'
}

/// Displays a string with every [`needs_escape`] character escaped.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let mut last = 0;
        for (i, c) in s.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            f.write_str(&s[last..i])?;
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "\\u{{{:x}}}", c as u32)?,
            }
            last = i + c.len_utf8();
        }
        f.write_str(&s[last..])
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        fmt::Display::fmt(self, f)?;
        f.write_char('"')
    }
}

/// [`Escaped`] as an owned string.
pub fn escape(s: &str) -> String {
    Escaped(s).to_string()
}

/// Cuts `s` to at most `max` bytes on a character boundary; says whether it cut.
pub fn truncate(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_lines_and_terminal_controls_are_inert() {
        let evil =
            "bob\n2026-01-01T00:00:00Z  INFO authenticated user=root\u{1b}[2J\0\u{202e}txt.exe";
        let shown = escape(evil);
        assert!(!shown.contains('\n'));
        assert!(!shown.contains('\u{1b}'));
        assert!(!shown.contains('\0'));
        assert!(!shown.contains('\u{202e}'));
        assert_eq!(
            shown,
            "bob\\n2026-01-01T00:00:00Z  INFO authenticated user=root\\u{1b}[2J\\u{0}\\u{202e}txt.exe"
        );
    }

    #[test]
    fn printable_text_passes_and_backslashes_cannot_forge_escapes() {
        assert_eq!(escape("alice@root@web01"), "alice@root@web01");
        assert_eq!(escape("José@Ωmega"), "José@Ωmega");
        assert_eq!(escape("a\\nb"), "a\\\\nb");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m", "C1 CSI");
        assert_eq!(escape("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
        assert_eq!(format!("{:?}", Escaped("a\tb")), "\"a\\tb\"");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 5), ("abc", false));
        assert_eq!(truncate("abcdef", 3), ("abc", true));
        assert_eq!(truncate("ééé", 3), ("é", true));
    }
}
