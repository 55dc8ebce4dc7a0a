//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests for the relay's
//! parsers of what a peer chose: the command gate reads the target's terminal output and the
//! user's keys.

use crate::commands::Gate;

/// Terminal output and keystrokes, interleaved: reading the command line never panics, and a
/// line without a terminal is split at newlines with nothing lost.
///
/// The first byte picks the terminal size (or none); then each chunk of up to 64 bytes goes to
/// the target side or the user side by the low bit of its first byte.
pub fn gate(data: &[u8]) {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let pty = (size != 0).then(|| (u32::from(size % 200) + 1, u32::from(size / 4 % 60) + 1));
    let gate = Gate::new(pty);
    let mut fed_stdin = 0usize;
    let mut got_stdin = 0usize;
    for chunk in rest.chunks(64) {
        let Some((&sel, body)) = chunk.split_first() else {
            continue;
        };
        match sel % 4 {
            0 => gate.output(body),
            1 => {
                gate.typing();
                gate.output(body);
            }
            2 => {
                let _ = gate.screen_line();
                gate.line_done();
            }
            _ => {
                fed_stdin += body.len();
                got_stdin += gate
                    .stdin_lines(body)
                    .iter()
                    .map(|(l, _)| l.len())
                    .sum::<usize>();
                if sel & 0x10 != 0 {
                    gate.resize(u32::from(sel), u32::from(size));
                }
            }
        }
    }
    let _ = gate.screen_line();
    got_stdin += gate.stdin_rest().len();
    assert_eq!(fed_stdin, got_stdin, "input lines lose nothing");
}
