//! Entry point of the `index_lines` fuzz target (`fuzz/`) and of its corpus replay test: the
//! line extraction reads bytes a peer chose (the session's input and output).

use crate::lines::{Kind, Line, LineSplitter, MAX_LINE};

/// Feeds `data` to a splitter (first byte: input or output; then pieces cut where the bytes
/// say) and checks every line: at most [`MAX_LINE`] characters, no control characters, not
/// blank, times never before the piece they came from.
pub fn lines(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let kind = if first & 1 == 0 {
        Kind::Input
    } else {
        Kind::Output
    };
    let mut s = LineSplitter::new(kind);
    let mut out: Vec<Line> = Vec::new();
    let step = 1 + usize::from(first >> 1) % 64;
    for (i, piece) in rest.chunks(step).enumerate() {
        s.feed(i as u64, piece, &mut out);
    }
    s.finish(&mut out);
    for l in &out {
        assert!(l.text.chars().count() <= MAX_LINE, "line too long");
        assert!(!l.text.trim().is_empty(), "blank line kept");
        assert!(
            !l.text.chars().any(|c| c.is_control()),
            "control character kept: {:?}",
            l.text
        );
    }
}
