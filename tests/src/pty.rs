//! A real pseudo-terminal driving `ssh -tt`.

#[allow(unused_imports)]
use super::*;

pub(crate) const PTY_DRIVER: &str = r#"
import os, sys, pty, select, fcntl, termios, struct, signal
rows, cols = int(sys.argv[1]), int(sys.argv[2])
argv = sys.argv[3:]
def setsize(fd, r, c):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', r, c, 0, 0))
pid, fd = pty.fork()
if pid == 0:
    try:
        setsize(0, rows, cols)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
setsize(fd, rows, cols)
out = sys.stdout.buffer
inbuf = b''
stdin_open = True
while True:
    rl = [fd] + ([0] if stdin_open else [])
    try:
        r, _, _ = select.select(rl, [], [], 0.5)
    except InterruptedError:
        continue
    if fd in r:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b''
        if not data:
            break
        out.write(data)
        out.flush()
    if stdin_open and 0 in r:
        chunk = os.read(0, 65536)
        if not chunk:
            stdin_open = False
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            continue
        inbuf += chunk
        while b'\n' in inbuf:
            line, inbuf = inbuf.split(b'\n', 1)
            parts = line.decode().split()
            if not parts:
                continue
            if parts[0] == 'w':
                os.write(fd, bytes.fromhex(parts[1]) if len(parts) > 1 else b'')
            elif parts[0] == 'r':
                setsize(fd, int(parts[1]), int(parts[2]))
                try:
                    os.kill(pid, signal.SIGWINCH)
                except OSError:
                    pass
            elif parts[0] == 'k':
                try:
                    os.kill(pid, int(parts[1]))
                except OSError:
                    pass
_, st = os.waitpid(pid, 0)
if os.WIFEXITED(st):
    sys.exit(os.WEXITSTATUS(st))
sys.exit(128 + os.WTERMSIG(st))
"#;

/// The python3 that has the test dependencies (asyncssh): Debian's.
pub fn python3() -> PathBuf {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("python3")
}

/// A command (normally `ssh -tt …`) running under a real pseudo-terminal.
pub struct PtySession {
    child: Child,
    input: Option<ChildStdin>,
    output: Arc<Mutex<Vec<u8>>>,
    cursor: usize,
}

impl PtySession {
    /// Starts `cmd` (program and arguments; its environment comes from `env` on top of ours)
    /// under a pty of `rows` x `cols`.
    pub fn spawn(cmd: &Command, env: &[(&str, &str)], rows: u16, cols: u16) -> PtySession {
        let mut c = Command::new(python3());
        c.arg("-c")
            .arg(PTY_DRIVER)
            .arg(rows.to_string())
            .arg(cols.to_string())
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .expect("start python3 pty driver (is python3 installed?)");
        let input = child.stdin.take();
        let (output, _) = spawn_collector(child.stdout.take().expect("stdout"));
        // driver errors (tracebacks) land in the same buffer, marked
        let err = child.stderr.take().expect("stderr");
        let (eb, _) = spawn_collector(err);
        let ob = output.clone();
        thread::spawn(move || loop {
            thread::sleep(Duration::from_millis(200));
            let mut e = eb.lock().expect("lock");
            if !e.is_empty() {
                let mut o = ob.lock().expect("lock");
                o.extend_from_slice(b"\n[pty driver stderr] ");
                o.append(&mut e);
            }
            if Arc::strong_count(&eb) == 1 {
                break;
            }
        });
        PtySession {
            child,
            input,
            output,
            cursor: 0,
        }
    }

    fn command(&mut self, line: &str) {
        let inp = self.input.as_mut().expect("pty input open");
        inp.write_all(line.as_bytes()).expect("write to pty driver");
        inp.write_all(b"\n").expect("write to pty driver");
        inp.flush().expect("flush pty driver");
    }

    /// Types `text` (use `\r` for Enter).
    pub fn send(&mut self, text: &str) {
        let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
        self.command(&format!("w {hex}"));
    }

    /// Types `line` followed by Enter.
    pub fn send_line(&mut self, line: &str) {
        self.send(&format!("{line}\r"));
    }

    /// Sets the terminal size and signals SIGWINCH.
    pub fn resize(&mut self, rows: u16, cols: u16) {
        self.command(&format!("r {rows} {cols}"));
    }

    /// Everything the terminal showed so far, as text.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("lock")).into_owned()
    }

    /// Waits until `needle` appears after the previous match; returns the text up to and
    /// including it. Panics with the whole screen output after `timeout`.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        let mut res = None;
        let cursor = self.cursor;
        wait_for(timeout, || {
            let out = self.output.lock().expect("lock");
            let hay = &out[cursor.min(out.len())..];
            if let Some(pos) = find_bytes(hay, needle.as_bytes()) {
                res = Some((
                    cursor + pos + needle.len(),
                    String::from_utf8_lossy(&hay[..pos + needle.len()]).into_owned(),
                ));
                true
            } else {
                false
            }
        });
        match res {
            Some((end, text)) => {
                self.cursor = end;
                text
            }
            None => panic!(
                "pty: {needle:?} did not appear within {timeout:?}; terminal output:\n{}",
                self.output()
            ),
        }
    }

    /// Waits until `needle` appears and returns the rest of that line (up to `\r` or `\n`).
    pub fn expect_line_after(&mut self, needle: &str, timeout: Duration) -> String {
        self.expect(needle, timeout);
        let cursor = self.cursor;
        let mut line = None;
        wait_for(timeout, || {
            let out = self.output.lock().expect("lock");
            let hay = &out[cursor.min(out.len())..];
            if let Some(pos) = hay.iter().position(|b| *b == b'\r' || *b == b'\n') {
                line = Some(String::from_utf8_lossy(&hay[..pos]).into_owned());
                true
            } else {
                false
            }
        });
        line.unwrap_or_else(|| {
            panic!(
                "pty: no end of line after {needle:?}; output:\n{}",
                self.output()
            )
        })
    }

    /// Waits for the command to exit (and the driver with it); returns its exit code
    /// (128+N when killed by signal N), or None after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        wait_child(&mut self.child, timeout).and_then(|s| s.code())
    }
}

impl Drop for PtySession {
    fn drop(&mut self) {
        // closing the driver's stdin makes it SIGKILL the command and exit
        self.input.take();
        if wait_child(&mut self.child, Duration::from_secs(3)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects_accepts_arrays_and_lines() {
        assert_eq!(json_objects("[{\"a\":1},{\"a\":2}]").len(), 2);
        assert_eq!(json_objects("{\"a\":1}\n{\"a\":2}\n").len(), 2);
        assert_eq!(json_objects("{\"a\":1}").len(), 1);
        assert!(json_objects("  \n").is_empty());
    }

    #[test]
    fn find_bytes_finds() {
        assert_eq!(find_bytes(b"hello world", b"world"), Some(6));
        assert_eq!(find_bytes(b"hello", b"xyz"), None);
    }

    #[test]
    fn run_cmd_collects_and_passes_stdin() {
        let out = run_cmd(
            Command::new("sh").args(["-c", "cat; echo e >&2; exit 3"]),
            Some(b"in"),
            Duration::from_secs(10),
        );
        assert_eq!(out.code(), Some(3));
        assert_eq!(out.stdout, b"in");
        assert_eq!(out.stderr_str(), "e\n");
    }
}
