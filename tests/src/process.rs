//! Running commands, always bounded.

#[allow(unused_imports)]
use super::*;

/// What a finished command left.
#[derive(Debug, Clone)]
pub struct CmdOut {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// The command line, for messages.
    pub cmdline: String,
}

impl CmdOut {
    /// Exit code (None when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// Standard output as (lossy) text.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Standard error as (lossy) text.
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Everything, for assertion messages.
    pub fn describe(&self) -> String {
        let cap = |s: String| {
            if s.len() > 4000 {
                format!(
                    "{}…[{} bytes]",
                    s.chars().take(4000).collect::<String>(),
                    s.len()
                )
            } else {
                s
            }
        };
        format!(
            "command: {}\nstatus: {:?} (signal {:?})\nstdout: {:?}\nstderr: {:?}",
            self.cmdline,
            self.status.code(),
            self.status.signal(),
            cap(self.stdout_str()),
            cap(self.stderr_str())
        )
    }
}

pub(crate) fn spawn_collector<R: Read + Send + 'static>(
    mut r: R,
) -> (Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let (b, d) = (buf.clone(), done.clone());
    thread::spawn(move || {
        let mut chunk = [0u8; 65536];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b.lock().expect("lock").extend_from_slice(&chunk[..n]),
            }
        }
        d.store(true, Ordering::SeqCst);
    });
    (buf, done)
}

/// Waits for a child up to `timeout`; `None` if it is still running.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with `stdin` (or /dev/null), collecting stdout and stderr; kills it and panics with
/// what it printed if it runs longer than `timeout`.
pub fn run_cmd(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> CmdOut {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let cmdline = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
    if let (Some(data), Some(mut si)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        thread::spawn(move || {
            let _ = si.write_all(&data);
        });
    }
    let (out, out_done) = spawn_collector(child.stdout.take().expect("stdout piped"));
    let (err, err_done) = spawn_collector(child.stderr.take().expect("stderr piped"));
    let status = wait_child(&mut child, timeout);
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        thread::sleep(Duration::from_millis(100));
        panic!(
            "timed out after {timeout:?}: {cmdline}\nstdout so far: {:?}\nstderr so far: {:?}",
            String::from_utf8_lossy(&out.lock().expect("lock")),
            String::from_utf8_lossy(&err.lock().expect("lock"))
        );
    };
    // A grandchild may keep the pipes open; do not wait for it for long.
    wait_for(Duration::from_secs(5), || {
        out_done.load(Ordering::SeqCst) && err_done.load(Ordering::SeqCst)
    });
    let stdout = out.lock().expect("lock").clone();
    let stderr = err.lock().expect("lock").clone();
    CmdOut {
        status,
        stdout,
        stderr,
        cmdline,
    }
}

/// Terminates a child: SIGTERM to its process group (it must lead one), up to `grace`, then
/// SIGKILL to the group.
pub(crate) fn stop_group(child: &mut Child, grace: Duration) {
    let pgid = Pid::from_raw(child.id() as i32);
    if matches!(child.try_wait(), Ok(Some(_))) {
        let _ = killpg(pgid, Signal::SIGKILL);
        return;
    }
    let _ = killpg(pgid, Signal::SIGTERM);
    if wait_child(child, grace).is_none() {
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.kill();
        let _ = wait_child(child, Duration::from_secs(5));
    }
    // children that stayed in the group
    let _ = killpg(pgid, Signal::SIGKILL);
}

pub(crate) fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()));
    let g = f.try_clone().expect("clone log file");
    (Stdio::from(f), Stdio::from(g))
}

pub(crate) fn short_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create temp dir in /tmp")
}
