//! Command control on a channel: exec command lines, and the lines a user submits in a shell.
//!
//! For a shell with a terminal, the relay keeps a terminal model ([`vt100`]) of what the target
//! echoes. The user's Enter is held until the echo of what was typed before it has settled;
//! the command line is then read from the screen, from where the prompt ended to the end of the
//! logical line: line editing, backspace, cursor movement, history recall, tab completion and
//! paste are all in what the shell drew. The line is decided before the Enter reaches the
//! target; a denied line is cleared on the target (Ctrl-E Ctrl-U, then an empty line for a new
//! prompt) and never runs. For a shell without a terminal, each input line is decided before it
//! is forwarded. What the screen does not show (a full-screen program on the alternate screen,
//! a script written to a file and run, a password prompt that does not echo) is not seen.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// How long the target's output must stay quiet before a line is read from the screen.
const SETTLE: Duration = Duration::from_millis(40);
/// The longest psm holds an Enter waiting for the echo.
const SETTLE_MAX: Duration = Duration::from_millis(600);
/// Longest line a shell without a terminal may send before it is forwarded unchecked (and
/// noted).
pub const MAX_STDIN_LINE: usize = 64 * 1024;
/// What psm sends the target to clear a denied line (readline and most line editors: end of
/// line, kill to the start), followed by an Enter for a fresh prompt.
pub const CLEAR_LINE: &[u8] = b"\x05\x15\r";

struct Screen {
    parser: vt100::Parser,
    /// The prompt of the line being typed: its text and where it ends, captured when the user
    /// typed the line's first key.
    prompt: Option<(String, u16)>,
    /// The next key typed starts a new line.
    at_line_start: bool,
    /// When the target last sent output.
    last_output: tokio::time::Instant,
}

/// The command-reading state of one channel.
pub struct Gate {
    /// A terminal model (shell with a pty), or None (shell without a terminal: lines on stdin).
    screen: Option<Mutex<Screen>>,
    /// A partial input line (shell without a terminal).
    stdin: Mutex<Vec<u8>>,
    output: Notify,
}

/// The most cells the terminal model holds (each about 32 bytes in vt100, twice over with the
/// alternate screen): a user's pty-req of 1000 x 1000 would otherwise cost 64 MB a shell.
const MAX_CELLS: u32 = 64 * 1024;

/// The terminal model's size: at least 2 columns and 2 rows (vt100 0.16 overflows on a
/// 1-row terminal, which the fuzzer found), at most 1000 columns, and no more rows than
/// [`MAX_CELLS`] allow at that width (a taller terminal scrolls sooner in the model, which
/// reads the line at the cursor). Should it still fail on some output, [`Gate::output`]
/// resets the model.
fn model_size(cols: u32, rows: u32) -> (u16, u16) {
    let cols = cols.clamp(2, 1000);
    let rows = rows.clamp(2, (MAX_CELLS / cols).min(1000));
    (cols as u16, rows as u16)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gate {
    /// A gate for a shell with a terminal of `cols` x `rows`, or without one (`None`).
    pub fn new(pty: Option<(u32, u32)>) -> Gate {
        Gate {
            screen: pty.map(|(cols, rows)| {
                let (cols, rows) = model_size(cols, rows);
                Mutex::new(Screen {
                    parser: vt100::Parser::new(rows, cols, 0),
                    prompt: None,
                    at_line_start: true,
                    last_output: tokio::time::Instant::now(),
                })
            }),
            stdin: Mutex::new(Vec::new()),
            output: Notify::new(),
        }
    }

    /// Whether the channel has a terminal model.
    pub fn has_screen(&self) -> bool {
        self.screen.is_some()
    }

    /// The target sent `data` to the terminal.
    pub fn output(&self, data: &[u8]) {
        if let Some(s) = &self.screen {
            let mut s = lock(s);
            let parser = &mut s.parser;
            let processed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                parser.process(data);
            }));
            if processed.is_err() {
                // the terminal model broke on what the target sent: start it afresh (the
                // current line is then read without its prompt) rather than lose the session
                let (rows, cols) = s.parser.screen().size();
                s.parser = vt100::Parser::new(rows, cols, 0);
                s.prompt = None;
                tracing::warn!(
                    "command control: the terminal model failed on target output and was reset"
                );
            }
            s.last_output = tokio::time::Instant::now();
        }
        self.output.notify_waiters();
    }

    /// The terminal was resized.
    pub fn resize(&self, cols: u32, rows: u32) {
        if let Some(s) = &self.screen {
            let (cols, rows) = model_size(cols, rows);
            lock(s).parser.screen_mut().set_size(rows, cols);
        }
    }

    /// The user is about to send keys (not an Enter): at the start of a line, remember where
    /// the prompt ends.
    pub fn typing(&self) {
        if let Some(s) = &self.screen {
            let mut s = lock(s);
            if s.at_line_start {
                s.at_line_start = false;
                let (row, col) = s.parser.screen().cursor_position();
                let (_, cols) = s.parser.screen().size();
                let text = s
                    .parser
                    .screen()
                    .rows(0, cols)
                    .nth(usize::from(row))
                    .unwrap_or_default();
                let prompt: String = text.chars().take(usize::from(col)).collect();
                s.prompt = Some((prompt, col));
            }
        }
    }

    /// The Enter went through (or the line was cleared): the next key starts a new line.
    pub fn line_done(&self) {
        if let Some(s) = &self.screen {
            let mut s = lock(s);
            s.at_line_start = true;
            s.prompt = None;
        }
    }

    /// Waits until the echo of what was forwarded has arrived: the output has been quiet for a
    /// moment, or at most 600 ms.
    pub async fn settle(&self) {
        let Some(s) = &self.screen else { return };
        let start = tokio::time::Instant::now();
        loop {
            let last = lock(s).last_output.max(start);
            let quiet_at = last + SETTLE;
            let now = tokio::time::Instant::now();
            if now >= quiet_at || now >= start + SETTLE_MAX {
                return;
            }
            let wake = quiet_at.min(start + SETTLE_MAX);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.output.notified() => {}
            }
        }
    }

    /// The command line on the screen now (None on the alternate screen: a full-screen
    /// program is not a shell prompt).
    pub fn screen_line(&self) -> Option<String> {
        let s = lock(self.screen.as_ref()?);
        let screen = s.parser.screen();
        if screen.alternate_screen() {
            return None;
        }
        let (crow, _) = screen.cursor_position();
        let (rows, cols) = screen.size();
        // the logical line: up through wrapped rows from the cursor, and down through the rows
        // it continues on
        let mut first = crow;
        while first > 0 && screen.row_wrapped(first - 1) {
            first -= 1;
        }
        let mut last = crow;
        while last + 1 < rows && screen.row_wrapped(last) {
            last += 1;
        }
        // where the prompt ends: the row of this logical line that starts with the prompt
        // (each row's text built once: a line wrapped over the whole screen stays linear)
        let start = match &s.prompt {
            Some((prompt, col)) => {
                let texts: Vec<String> = screen
                    .rows(0, cols)
                    .skip(usize::from(first))
                    .take(usize::from(crow - first) + 1)
                    .collect();
                texts
                    .iter()
                    .rposition(|t| t.starts_with(prompt.as_str()))
                    .map(|i| (first + i as u16, *col))
            }
            None => None,
        };
        let line = match start {
            Some((r, c)) => screen.contents_between(r, c, last, cols),
            None => {
                // no prompt seen (typed ahead): the whole logical line, after a shell prompt's
                // usual end if there is one
                let all = screen.contents_between(first, 0, last, cols);
                match all.rfind("$ ").or_else(|| all.rfind("# ")) {
                    Some(i) => all[i + 2..].to_string(),
                    None => all,
                }
            }
        };
        Some(line.replace('\n', " ").trim().to_string())
    }

    /// A shell without a terminal: adds input and returns the complete lines (with their
    /// newline) now ready to be decided, keeping the partial rest. A line longer than
    /// [`MAX_STDIN_LINE`] is returned unfinished (`false`) so it is forwarded unchecked.
    pub fn stdin_lines(&self, data: &[u8]) -> Vec<(Vec<u8>, bool)> {
        let mut buf = lock(&self.stdin);
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            out.push((line, true));
        }
        if buf.len() > MAX_STDIN_LINE {
            out.push((std::mem::take(&mut *buf), false));
        }
        out
    }

    /// What is left of a partial line at EOF.
    pub fn stdin_rest(&self) -> Vec<u8> {
        std::mem::take(&mut *lock(&self.stdin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(g: &Gate, keys: &[u8], echo: &[u8]) {
        g.typing();
        g.output(echo);
        let _ = keys;
    }

    #[test]
    fn the_line_is_read_from_what_the_shell_drew() {
        let g = Gate::new(Some((40, 5)));
        g.output(b"welcome\r\nuser@host:~$ ");
        // typed with a typo and backspaces
        typed(&g, b"rmx", b"rmx");
        g.output(b"\x08 \x08 -rf /tmp/x");
        assert_eq!(g.screen_line().as_deref(), Some("rm -rf /tmp/x"));
        g.line_done();
        g.output(b"\r\nuser@host:~$ ");
        // history recall: the shell redraws the line after the prompt
        typed(&g, b"\x1b[A", b"rm -rf /tmp/x");
        assert_eq!(g.screen_line().as_deref(), Some("rm -rf /tmp/x"));
        g.line_done();
        // a line that wraps and scrolls the screen
        g.output(b"\r\nuser@host:~$ ");
        typed(
            &g,
            b"",
            b"echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        );
        let line = g.screen_line().expect("line");
        assert!(
            line.starts_with("echo aaaa") && line.ends_with("aaa"),
            "{line}"
        );
        assert_eq!(line.len(), "echo ".len() + 69);
        g.line_done();
        // a full-screen program: not a prompt
        g.output(b"\x1b[?1049h");
        assert_eq!(g.screen_line(), None);
    }

    #[test]
    fn the_model_stays_small_whatever_size_the_user_asks_for() {
        for (cols, rows) in [
            (1000, 1000),
            (u32::MAX, u32::MAX),
            (2, 1000),
            (300, 80),
            (0, 0),
        ] {
            let (c, r) = model_size(cols, rows);
            assert!(u32::from(c) * u32::from(r) <= MAX_CELLS, "{cols}x{rows}");
            assert!(c >= 2 && r >= 2, "{cols}x{rows}");
        }
        assert_eq!(model_size(300, 80), (300, 80));
        // a prompt and a line wrapped over every row of the tallest model: still read
        let g = Gate::new(Some((2, 1000)));
        g.output(b"$ ");
        let cmd = format!("echo {}", "b".repeat(3000));
        typed(&g, b"", cmd.as_bytes());
        let line = g.screen_line().expect("line");
        assert!(
            line.ends_with("bbb") && cmd.ends_with(&line),
            "{}",
            line.len()
        );
    }

    #[test]
    fn lines_without_a_terminal_are_split_on_newlines() {
        let g = Gate::new(None);
        assert!(!g.has_screen());
        assert!(g.stdin_lines(b"echo a\nrm -").len() == 1);
        let rest = g.stdin_lines(b"rf /\n");
        assert_eq!(rest, vec![(b"rm -rf /\n".to_vec(), true)]);
        assert!(g.stdin_lines(b"tail").is_empty());
        assert_eq!(g.stdin_rest(), b"tail".to_vec());
        let long = vec![b'a'; MAX_STDIN_LINE + 1];
        let out = g.stdin_lines(&long);
        assert_eq!(out.len(), 1);
        assert!(!out[0].1);
    }
}
