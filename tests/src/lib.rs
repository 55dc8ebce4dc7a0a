//! Harness for psm's end-to-end tests: real OpenSSH clients talk to a real psm (started with
//! `psm up`, or as three separate daemons) which brokers sessions to a real OpenSSH `sshd`.
//!
//! What it provides:
//! - [`Sshd`]: a throw-away `sshd` on 127.0.0.1 with its own host key, and the local unix account
//!   [`TARGET_USER`] (password [`TARGET_PASSWORD`] and an authorized ed25519 key) to log in as.
//! - [`Psm`]: a psm instance in a temporary data directory, with a `psmctl` helper, the audit log,
//!   and (in [`PsmMode::Separate`]) control over psm-recorder alone.
//! - [`World`]: both of the above with the standard policy (user `alice`, target `web01`,
//!   account `psmtarget@web01`, a grant) and `ssh`/`scp`/`sftp` command builders.
//! - [`PtySession`]: an `ssh -tt` under a real pseudo-terminal (driven by a small python3
//!   helper) that can type, read and resize.
//! - [`run_cmd`], [`wait_for`], [`audit_events`], [`json_objects`]: bounded helpers.
//!
//! What it does not do: build the binaries (run `cargo build --workspace --bins` first, or point
//! `PSM_BIN_DIR` at them), install OpenSSH (`openssh-server`, `openssh-client`), or touch any
//! address other than 127.0.0.1.
#![forbid(unsafe_code)]

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Local unix account on the target sshd that the vaulted credentials log in as.
pub const TARGET_USER: &str = "psmtarget";
/// Password of [`TARGET_USER`] (set on every run, so a stale account is fixed up).
pub const TARGET_PASSWORD: &str = "Psm-Target-Pw-4711";
/// Password of the psm user `alice` in a [`World`].
pub const ALICE_PASSWORD: &str = "alice-Secret-42";
/// The psm binaries a [`Psm`] needs.
pub const PSM_BINARIES: [&str; 5] = ["psm", "psmctl", "psm-control", "psm-recorder", "psm-relay"];

/// Default bound for one ssh/scp/sftp/psmctl command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------------------------

/// Folder with the workspace binaries: `$PSM_BIN_DIR`, else `target/<profile>` derived from the
/// test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PSM_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, panicking with a clear message when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "psm binary {} is missing: run `cargo build --workspace --bins` first (or set PSM_BIN_DIR)",
        p.display()
    );
    p
}

/// Panics with one message listing every psm binary that is missing.
pub fn require_psm_binaries() {
    let dir = bin_dir();
    let missing: Vec<&str> = PSM_BINARIES
        .iter()
        .copied()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "psm binaries missing from {}: {}; run `cargo build --workspace --bins` first (or set PSM_BIN_DIR)",
        dir.display(),
        missing.join(", ")
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("addr"),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Last `max` bytes of a (log) file, as text, without ANSI colour sequences.
pub fn file_tail(path: &Path, max: usize) -> String {
    let data = fs::read(path).unwrap_or_default();
    let text = strip_ansi(&String::from_utf8_lossy(&data));
    let start = text.len().saturating_sub(max);
    let mut start = start;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

/// Removes `ESC [ … letter` sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `sha256sum` of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let out = run_cmd(
        Command::new("sha256sum").arg(path),
        None,
        Duration::from_secs(120),
    );
    assert!(
        out.success(),
        "sha256sum {}: {}",
        path.display(),
        out.describe()
    );
    out.stdout_str()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Writes `len` random bytes (from /dev/urandom) to `path`.
pub fn random_file(path: &Path, len: u64) {
    let mut src = fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst = fs::File::create(path).expect("create random file");
    let copied = std::io::copy(&mut (&mut src).take(len), &mut dst).expect("copy random bytes");
    assert_eq!(copied, len);
}

/// Generates an ed25519 key pair at `path` / `path.pub`; returns the public key line
/// (`ssh-ed25519 AAAA…`, without the comment).
pub fn gen_key(path: &Path) -> String {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    let out = run_cmd(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "psm-tests", "-f"])
            .arg(path),
        None,
        Duration::from_secs(30),
    );
    assert!(out.success(), "ssh-keygen: {}", out.describe());
    pub_line(&pub_path(path))
}

/// `KEY.pub` next to a private key path.
pub fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

/// First two fields (`type base64`) of an OpenSSH public key file.
pub fn pub_line(pub_file: &Path) -> String {
    let text = fs::read_to_string(pub_file).expect("read public key");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `SHA256:…` fingerprint of a public key file (`ssh-keygen -lf`).
pub fn fingerprint(pub_file: &Path) -> String {
    let out = run_cmd(
        Command::new("ssh-keygen").arg("-lf").arg(pub_file),
        None,
        Duration::from_secs(10),
    );
    assert!(out.success(), "ssh-keygen -lf: {}", out.describe());
    out.stdout_str()
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .unwrap_or_default()
        .to_string()
}

/// Sends `sig` to every process whose command line contains `needle` (a unique temp path), other
/// than this test process.
pub fn signal_matching(needle: &str, sig: Signal) {
    for pid in pids_matching(needle, None) {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Pids of processes whose command line contains `needle`, optionally only those whose `argv[0]`
/// file name is `exe_name`.
pub fn pids_matching(needle: &str, exe_name: Option<&str>) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if !cmdline.contains(needle) {
            continue;
        }
        if let Some(name) = exe_name {
            let argv0 = raw.split(|b| *b == 0).next().unwrap_or_default();
            let argv0 = String::from_utf8_lossy(argv0);
            let base = argv0.rsplit('/').next().unwrap_or_default();
            if base != name {
                continue;
            }
        }
        pids.push(pid);
    }
    pids
}

/// Every process below `pid` (children, grandchildren, …), from `/proc`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let (_, rest) = stat.rsplit_once(')')?;
                    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Resident set size now (`VmRSS`) of a process, in KiB; 0 when it is gone.
pub fn vm_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Parses psmctl `--json` output: one JSON array, one JSON object, or one JSON value per line.
/// Returns the objects (the elements of an array).
pub fn json_objects(text: &str) -> Vec<Value> {
    let t = text.trim();
    if t.is_empty() {
        return Vec::new();
    }
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return match v {
            Value::Array(a) => a,
            other => vec![other],
        };
    }
    t.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap_or_else(|e| {
                panic!("psmctl --json printed a line that is not JSON ({e}): {l}")
            })
        })
        .flat_map(|v| match v {
            Value::Array(a) => a,
            other => vec![other],
        })
        .collect()
}

/// Reads `DATA/audit.jsonl` (lines that do not parse, e.g. a half-written last line, are skipped).
pub fn audit_events(data_dir: &Path) -> Vec<Value> {
    let text = fs::read_to_string(data_dir.join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// A string field of a JSON object, or "".
pub fn jstr<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// running commands, bounded
// ---------------------------------------------------------------------------------------------

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

fn spawn_collector<R: Read + Send + 'static>(mut r: R) -> (Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>) {
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
fn stop_group(child: &mut Child, grace: Duration) {
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

fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()));
    let g = f.try_clone().expect("clone log file");
    (Stdio::from(f), Stdio::from(g))
}

fn short_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create temp dir in /tmp")
}

// ---------------------------------------------------------------------------------------------
// the target: a real OpenSSH sshd
// ---------------------------------------------------------------------------------------------

/// Creates the local account [`TARGET_USER`] if missing and (re)sets its password, so it is not
/// locked. Serialized across test processes with flock.
pub fn ensure_target_user() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let script = format!(
            "id -u {u} >/dev/null 2>&1 || useradd -m -s /bin/bash {u} || id -u {u} >/dev/null; \
             echo '{u}:{p}' | chpasswd && usermod -U {u} >/dev/null 2>&1; \
             usermod -s /bin/bash {u}; true",
            u = TARGET_USER,
            p = TARGET_PASSWORD
        );
        let out = run_cmd(
            Command::new("flock").args(["/tmp/psm-tests-user.lock", "sh", "-c", &script]),
            None,
            Duration::from_secs(60),
        );
        assert!(
            out.success(),
            "creating the target account {TARGET_USER}: {}",
            out.describe()
        );
        let check = run_cmd(
            Command::new("id").arg("-u").arg(TARGET_USER),
            None,
            Duration::from_secs(10),
        );
        assert!(
            check.success(),
            "account {TARGET_USER} missing after useradd: {}",
            out.describe()
        );
    });
}

fn sshd_path() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/bin/sshd", "/usr/local/sbin/sshd"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("sshd not found: install openssh-server (apt-get install -y openssh-server)");
}

fn openssh_version() -> (u32, u32) {
    let out = run_cmd(Command::new("ssh").arg("-V"), None, Duration::from_secs(10));
    let text = out.stderr_str() + &out.stdout_str();
    // "OpenSSH_9.2p1 Debian-2+deb12u6, …"
    let v = text
        .split("OpenSSH_")
        .nth(1)
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// A real OpenSSH sshd on 127.0.0.1 with its own host key, letting [`TARGET_USER`] log in with
/// [`TARGET_PASSWORD`] or with [`Sshd::target_key`].
pub struct Sshd {
    dir: TempDir,
    port: u16,
    host_key_line: String,
    target_key: PathBuf,
    child: Child,
    log: PathBuf,
}

impl Sshd {
    /// Starts it (`AllowTcpForwarding no`) and waits (10 s at most) until its port accepts.
    pub fn start() -> Sshd {
        Sshd::start_with(false)
    }

    /// Starts it, with TCP forwarding allowed or not (a forwarding test needs a target that would
    /// forward, to show that psm is the one refusing).
    pub fn start_with(allow_tcp_forwarding: bool) -> Sshd {
        Sshd::start_opts(allow_tcp_forwarding, "ERROR")
    }

    /// Starts it with sshd's `LogLevel` (`INFO` logs each login: `Accepted password for …`).
    pub fn start_opts(allow_tcp_forwarding: bool, log_level: &str) -> Sshd {
        ensure_target_user();
        let _ = fs::create_dir_all("/run/sshd");
        let sshd = sshd_path();
        let dir = short_tempdir("sshd");
        let d = dir.path().to_path_buf();
        // sshd reads authorized_keys as the target user
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod sshd dir");
        let host_key = d.join("host_ed25519");
        let host_key_line = gen_key(&host_key);
        let target_key = d.join("target_ed25519");
        gen_key(&target_key);
        let ak = d.join("authorized_keys");
        fs::copy(pub_path(&target_key), &ak).expect("authorized_keys");
        fs::set_permissions(&ak, fs::Permissions::from_mode(0o644)).expect("chmod authorized_keys");
        let scratch = d.join("scratch");
        fs::create_dir_all(&scratch).expect("scratch dir");
        let out = run_cmd(
            Command::new("chown")
                .arg(format!("{TARGET_USER}:"))
                .arg(&scratch),
            None,
            Duration::from_secs(10),
        );
        assert!(out.success(), "chown scratch: {}", out.describe());
        fs::set_permissions(&scratch, fs::Permissions::from_mode(0o777)).expect("chmod scratch");

        let (major, minor) = openssh_version();
        let log = d.join("sshd.log");
        let cfg = d.join("sshd_config");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut text = format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {hk}\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PasswordAuthentication yes\n\
                 KbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\n\
                 AuthorizedKeysFile {ak}\n\
                 Subsystem sftp internal-sftp\n\
                 PidFile none\n\
                 LogLevel {log_level}\n\
                 AllowTcpForwarding {fwd}\n\
                 X11Forwarding no\n\
                 PermitRootLogin no\n\
                 AllowUsers {TARGET_USER}\n\
                 MaxStartups 100:30:200\n\
                 MaxSessions 64\n\
                 AcceptEnv LANG LC_* TZ LD_PRELOAD BASH_ENV\n",
                hk = host_key.display(),
                ak = ak.display(),
                fwd = if allow_tcp_forwarding { "yes" } else { "no" },
            );
            if (major, minor) >= (9, 8) {
                text.push_str("PerSourcePenalties no\n");
            }
            fs::write(&cfg, text).expect("write sshd_config");
            let (o, e) = log_file(&log);
            let mut child = Command::new(&sshd)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(o)
                .stderr(e)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", sshd.display()));
            let up = wait_for(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(None)) && port_open(port)
            });
            if up {
                return Sshd {
                    dir,
                    port,
                    host_key_line,
                    target_key,
                    child,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_err = file_tail(&log, 4000);
        }
        panic!("sshd did not start listening within 10 s; log:\n{last_err}");
    }

    /// Port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// The host public key, `ssh-ed25519 AAAA…` (no comment).
    pub fn host_key(&self) -> &str {
        &self.host_key_line
    }
    /// The host public key file (`ssh-ed25519 AAAA… comment`).
    pub fn host_key_pub_path(&self) -> PathBuf {
        self.dir.path().join("host_ed25519.pub")
    }
    /// Private key authorized for [`TARGET_USER`] (public half at `…pub`).
    pub fn target_key(&self) -> &Path {
        &self.target_key
    }
    /// A directory [`TARGET_USER`] may write and everyone may read.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }
    /// sshd's stderr log.
    pub fn log(&self) -> String {
        file_tail(&self.log, 8000)
    }
    /// sshd's whole log.
    pub fn full_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// The per-connection sshd processes of this sshd (not the listener itself).
    pub fn session_pids(&self) -> Vec<u32> {
        descendants(self.child.id())
    }
    /// `ssh` straight to this sshd as [`TARGET_USER`] with [`Sshd::target_key`] (no psm).
    pub fn direct_ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(common_ssh_opts())
            .arg("-o")
            .arg("BatchMode=yes")
            .arg("-i")
            .arg(&self.target_key)
            .arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{TARGET_USER}@127.0.0.1"));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- sshd log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
        stop_group(&mut self.child, Duration::from_secs(2));
        // per-connection children re-exec with the config path in their command line
        signal_matching(&self.dir.path().display().to_string(), Signal::SIGKILL);
    }
}

/// Options every test ssh/scp/sftp gets (no user config, no known_hosts, no agent, bounded).
pub fn common_ssh_opts() -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

// ---------------------------------------------------------------------------------------------
// psm
// ---------------------------------------------------------------------------------------------

/// How a [`Psm`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsmMode {
    /// `psm up` (the launcher supervises the three daemons).
    Up,
    /// psm-control, psm-recorder and psm-relay started separately by the test.
    Separate,
}

struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running psm with a temporary data directory.
pub struct Psm {
    dir: TempDir,
    data: PathBuf,
    port: u16,
    mode: PsmMode,
    up: Option<Daemon>,
    daemons: Vec<Daemon>,
    relay_args: Vec<String>,
}

/// How a test psm is configured beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct PsmOpts {
    /// `psm.toml` written into the data directory before the start ([`PsmMode::Up`]).
    pub config: Option<String>,
    /// Extra psm-relay flags ([`PsmMode::Separate`]).
    pub relay_args: Vec<String>,
}

/// Relay worker runtimes every test psm gets.
pub const WORKERS: &str = "2";

impl Psm {
    /// `psm up --data-dir D --listen 127.0.0.1:P --workers 2`.
    pub fn up() -> Psm {
        Psm::start(PsmMode::Up)
    }

    /// The three daemons started separately (so that psm-recorder can be stopped alone).
    pub fn separate() -> Psm {
        Psm::start(PsmMode::Separate)
    }

    /// Starts psm in `mode`; waits (30 s at most) until the relay port accepts and
    /// `psmctl user list` succeeds.
    pub fn start(mode: PsmMode) -> Psm {
        Psm::start_opts(mode, PsmOpts::default())
    }

    /// Like [`Psm::start`], configured by `opts`.
    pub fn start_opts(mode: PsmMode, opts: PsmOpts) -> Psm {
        require_psm_binaries();
        let dir = short_tempdir("psm");
        let data = dir.path().join("d");
        fs::create_dir_all(&data).expect("data dir");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("chmod data dir");
        if let Some(cfg) = &opts.config {
            fs::write(data.join("psm.toml"), cfg).expect("psm.toml");
        }
        let port = free_port();
        let mut psm = Psm {
            dir,
            data,
            port,
            mode,
            up: None,
            daemons: Vec::new(),
            relay_args: opts.relay_args,
        };
        match mode {
            PsmMode::Up => {
                let log = psm.dir.path().join("psm-up.log");
                let (o, e) = log_file(&log);
                let child = Command::new(bin("psm"))
                    .arg("up")
                    .arg("--data-dir")
                    .arg(&psm.data)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--workers")
                    .arg(WORKERS)
                    .env(
                        "RUST_LOG",
                        std::env::var("PSM_TEST_LOG").unwrap_or_else(|_| "info".into()),
                    )
                    .stdin(Stdio::null())
                    .stdout(o)
                    .stderr(e)
                    .process_group(0)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start psm up: {e}"));
                psm.up = Some(Daemon {
                    name: "psm",
                    child,
                    log,
                });
            }
            PsmMode::Separate => {
                psm.spawn_daemon("psm-control");
                let sock = psm.data.join("control.sock");
                let ok = wait_for(Duration::from_secs(15), || sock.exists());
                psm.assert_alive(ok, "psm-control did not create control.sock within 15 s");
                psm.start_recorder();
                psm.spawn_daemon("psm-relay");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut port_ok = false;
        let mut ctl_ok = false;
        let mut last = String::new();
        while Instant::now() < deadline {
            psm.assert_alive(true, "");
            if !port_ok {
                port_ok = port_open(port);
            }
            if port_ok && !ctl_ok {
                let out = psm.psmctl_timeout(&["user", "list"], None, Duration::from_secs(10));
                ctl_ok = out.success();
                if !ctl_ok {
                    last = out.describe();
                }
            }
            if port_ok && ctl_ok {
                return psm;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "psm ({mode:?}) not ready within 30 s: relay port {port} open: {port_ok}, psmctl user list ok: {ctl_ok}\n{last}\n{}",
            psm.logs()
        );
    }

    fn spawn_daemon(&mut self, name: &'static str) {
        let log = self.dir.path().join(format!("{name}.log"));
        let (o, e) = log_file(&log);
        let mut c = Command::new(bin(name));
        c.arg("--data-dir").arg(&self.data);
        if name == "psm-relay" {
            c.arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .arg("--workers")
                .arg(WORKERS)
                .args(&self.relay_args);
        }
        let child = c
            .env(
                "RUST_LOG",
                std::env::var("PSM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.push(Daemon { name, child, log });
    }

    fn assert_alive(&mut self, cond: bool, what: &str) {
        let mut dead = Vec::new();
        for d in self.up.iter_mut().chain(self.daemons.iter_mut()) {
            if let Ok(Some(st)) = d.child.try_wait() {
                dead.push(format!("{} exited early with {st}", d.name));
            }
        }
        if !dead.is_empty() || !cond {
            panic!("{what} {}\n{}", dead.join("; "), self.logs());
        }
    }

    /// Starts psm-recorder (separate mode only) and waits (10 s at most) for recorder.sock.
    pub fn start_recorder(&mut self) {
        self.start_daemon("psm-recorder", "recorder.sock");
    }

    /// Kills psm-recorder with SIGKILL (separate mode only) and waits for it to be gone.
    pub fn kill_recorder(&mut self) {
        self.kill_daemon("psm-recorder");
    }

    /// Starts psm-control (separate mode only) and waits (10 s at most) for control.sock.
    pub fn start_control(&mut self) {
        self.start_daemon("psm-control", "control.sock");
    }

    /// Kills psm-control with SIGKILL (separate mode only) and waits for it to be gone.
    pub fn kill_control(&mut self) {
        self.kill_daemon("psm-control");
    }

    fn start_daemon(&mut self, name: &'static str, socket: &str) {
        assert_eq!(
            self.mode,
            PsmMode::Separate,
            "starting {name} alone needs PsmMode::Separate"
        );
        self.daemons.retain(|d| d.name != name);
        self.spawn_daemon(name);
        let sock = self.data.join(socket);
        let ok = wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        self.assert_alive(
            ok,
            &format!("{name} does not accept on {socket} within 10 s"),
        );
    }

    fn kill_daemon(&mut self, name: &'static str) {
        assert_eq!(
            self.mode,
            PsmMode::Separate,
            "killing {name} alone needs PsmMode::Separate"
        );
        for d in self.daemons.iter_mut().filter(|d| d.name == name) {
            let _ = killpg(Pid::from_raw(d.child.id() as i32), Signal::SIGKILL);
            let _ = d.child.kill();
            assert!(
                wait_child(&mut d.child, Duration::from_secs(10)).is_some(),
                "{name} did not die"
            );
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
    /// A scratch directory for the test (keys, downloads), inside the temp dir.
    pub fn work_dir(&self) -> PathBuf {
        let w = self.dir.path().join("w");
        fs::create_dir_all(&w).expect("work dir");
        w
    }
    /// Relay port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// How it runs.
    pub fn mode(&self) -> PsmMode {
        self.mode
    }

    /// Runs `psmctl --data-dir D ARGS` with `stdin` (30 s at most).
    pub fn psmctl(&self, args: &[&str], stdin: Option<&str>) -> CmdOut {
        self.psmctl_timeout(args, stdin, Duration::from_secs(30))
    }

    /// Like [`Psm::psmctl`] with a chosen bound.
    pub fn psmctl_timeout(&self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> CmdOut {
        run_cmd(
            Command::new(bin("psmctl"))
                .arg("--data-dir")
                .arg(&self.data)
                .args(args)
                .env_remove("PSM_DATA_DIR"),
            stdin.map(str::as_bytes),
            timeout,
        )
    }

    /// Runs psmctl and panics (with the logs) unless it exits 0; returns its stdout.
    pub fn psmctl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.psmctl(args, stdin);
        assert!(out.success(), "psmctl {args:?} failed:\n{}", out.describe());
        out.stdout_str()
    }

    /// The audit log.
    pub fn audit(&self) -> Vec<Value> {
        audit_events(&self.data)
    }

    /// Number of audit events so far: pass it to [`Psm::wait_audit_after`] to look only at what
    /// happens next.
    pub fn audit_mark(&self) -> usize {
        self.audit().len()
    }

    /// Waits (up to `timeout`) for an audit event matching `pred`; panics with the log if none.
    pub fn wait_audit(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_audit_after(0, what, timeout, pred)
    }

    /// Like [`Psm::wait_audit`], among the events after the first `mark` ones.
    pub fn wait_audit_after(
        &self,
        mark: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut found = None;
        wait_for(timeout, || {
            found = self.audit().into_iter().skip(mark).find(|e| pred(e));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no audit event {what} within {timeout:?} (after the first {mark}); audit.jsonl:\n{}",
                self.audit()
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    /// All audit events of kind `event` (e.g. `session_end`).
    pub fn audit_of(&self, event: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|e| jstr(e, "event") == event)
            .collect()
    }

    /// Pids of the psm-relay processes of this instance.
    pub fn relay_pids(&self) -> Vec<u32> {
        if self.mode == PsmMode::Separate {
            return self
                .daemons
                .iter()
                .filter(|d| d.name == "psm-relay")
                .map(|d| d.child.id())
                .collect();
        }
        pids_matching(&self.data.display().to_string(), Some("psm-relay"))
    }

    /// The tails of all logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for d in self.up.iter().chain(self.daemons.iter()) {
            s.push_str(&format!(
                "---- {} log ({}) ----\n{}\n",
                d.name,
                d.log.display(),
                file_tail(&d.log, 6000)
            ));
        }
        s
    }
}

impl Drop for Psm {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if let Some(mut up) = self.up.take() {
            stop_group(&mut up.child, Duration::from_secs(5));
        }
        // relay first, so sessions end before the recorder and control go
        for name in ["psm-relay", "psm-recorder", "psm-control"] {
            for d in self.daemons.iter_mut().filter(|d| d.name == name) {
                stop_group(&mut d.child, Duration::from_secs(5));
            }
        }
        // anything that left the process group but still names our data dir
        let needle = self.data.display().to_string();
        signal_matching(&needle, Signal::SIGTERM);
        if !wait_for(Duration::from_secs(3), || {
            pids_matching(&needle, None).is_empty()
        }) {
            signal_matching(&needle, Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the standard world: sshd + psm + alice
// ---------------------------------------------------------------------------------------------

/// An sshd, a psm and the standard policy: user `alice` (key [`World::alice_key`] and password
/// [`ALICE_PASSWORD`]), target `web01` pinned to the sshd's host key, account
/// `psmtarget@web01` with the password credential, and alice's grant on it.
pub struct World {
    /// The psm under test (dropped first).
    pub psm: Psm,
    /// The target.
    pub sshd: Sshd,
    /// alice's private key (public half at `….pub`).
    pub alice_key: PathBuf,
    askpass: PathBuf,
}

/// alice's standard login string.
pub fn alice_login() -> String {
    format!("alice@{TARGET_USER}@web01")
}

impl World {
    /// `psm up` with the standard policy; waits until alice can run a command (10 s at most).
    pub fn new() -> World {
        World::with_mode(PsmMode::Up)
    }

    /// Like [`World::new`], with a chosen [`PsmMode`].
    pub fn with_mode(mode: PsmMode) -> World {
        World::build(mode, Sshd::start())
    }

    /// The standard world around a given sshd.
    pub fn build(mode: PsmMode, sshd: Sshd) -> World {
        World::build_opts(mode, sshd, PsmOpts::default())
    }

    /// The standard world around a given sshd, with a configured psm.
    pub fn build_opts(mode: PsmMode, sshd: Sshd, opts: PsmOpts) -> World {
        let psm = Psm::start_opts(mode, opts);
        let w = psm.work_dir();
        let alice_key = w.join("alice_ed25519");
        gen_key(&alice_key);
        let askpass = w.join("askpass.sh");
        let world = World {
            psm,
            sshd,
            alice_key,
            askpass,
        };
        world.psm.psmctl_ok(
            &[
                "user",
                "add",
                "alice",
                "--password-stdin",
                "--ssh-key",
                &pub_path(&world.alice_key).display().to_string(),
            ],
            Some(&format!("{ALICE_PASSWORD}\n")),
        );
        world.psm.psmctl_ok(
            &[
                "target",
                "add",
                "web01",
                "--address",
                &world.sshd.address(),
                "--host-key",
                world.sshd.host_key(),
            ],
            None,
        );
        world.psm.psmctl_ok(
            &[
                "account",
                "add",
                &format!("{TARGET_USER}@web01"),
                "--password-stdin",
            ],
            Some(&format!("{TARGET_PASSWORD}\n")),
        );
        world.psm.psmctl_ok(
            &["grant", "add", "alice", &format!("{TARGET_USER}@web01")],
            None,
        );
        world.wait_session_works(&alice_login(), Duration::from_secs(10));
        world
    }

    /// Waits until `ssh LOGIN true` with alice's key succeeds; panics with the last try otherwise.
    pub fn wait_session_works(&self, login: &str, timeout: Duration) {
        let mut last = None;
        let ok = wait_for(timeout, || {
            let out = run_cmd(
                self.ssh_as(login, &self.alice_key).arg("echo psm-ready"),
                None,
                CMD_TIMEOUT,
            );
            let ok = out.success() && out.stdout_str().contains("psm-ready");
            last = Some(out);
            ok
        });
        if !ok {
            panic!(
                "a session as {login} did not work within {timeout:?}; last try:\n{}",
                last.map(|o| o.describe()).unwrap_or_default()
            );
        }
    }

    /// Live sessions as `psmctl sessions list --json` shows them.
    pub fn sessions(&self) -> Vec<Value> {
        let out = self.psm.psmctl_ok(&["sessions", "list", "--json"], None);
        serde_json::from_str::<Vec<Value>>(&out).expect("sessions json")
    }

    /// Waits (20 s at most) until no session is listed and every `session_start` in the audit
    /// log has its `session_end`; panics otherwise.
    pub fn assert_all_sessions_ended(&self) {
        let t = Duration::from_secs(20);
        assert!(
            wait_for(t, || self.sessions().is_empty()),
            "sessions still listed: {:?}",
            self.sessions()
        );
        let mut missing = Vec::new();
        let ok = wait_for(t, || {
            let ends = self.psm.audit_of("session_end");
            missing = self
                .psm
                .audit_of("session_start")
                .iter()
                .map(|e| jstr(e, "session_id").to_string())
                .filter(|s| !ends.iter().any(|e| jstr(e, "session_id") == s))
                .collect();
            missing.is_empty()
        });
        assert!(ok, "session_start without session_end: {missing:?}");
    }

    /// `ssh` as alice (publickey) with the standard login; append the remote command.
    pub fn ssh(&self) -> Command {
        self.ssh_as(&alice_login(), &self.alice_key)
    }

    /// `ssh -p PORT … -i KEY LOGIN@127.0.0.1` (publickey, batch mode).
    pub fn ssh_as(&self, login: &str, key: &Path) -> Command {
        self.ssh_with(&[], login, key)
    }

    /// Like [`World::ssh_as`] with `first` placed before the common options, so that its `-o`
    /// settings win (ssh keeps the first value it sees), e.g. `["-o", "LogLevel=INFO"]`.
    pub fn ssh_with(&self, first: &[&str], login: &str, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args(first)
            .args(common_ssh_opts())
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "PreferredAuthentications=publickey",
            ])
            .arg("-i")
            .arg(key)
            .arg("-p")
            .arg(self.psm.port().to_string())
            .arg(format!("{login}@127.0.0.1"));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `ssh` with password authentication only, the password given through `SSH_ASKPASS`
    /// (`SSH_ASKPASS_REQUIRE=force`); run it with stdin not a terminal.
    pub fn ssh_password(&self, login: &str, password: &str) -> Command {
        password_ssh(self.psm.port(), login, password, &self.askpass)
    }

    /// `scp -P PORT …` as alice (login set with `-o User=`); append the file arguments, using
    /// `127.0.0.1:PATH` for remote ones.
    pub fn scp(&self) -> Command {
        let mut c = Command::new("scp");
        c.args(common_ssh_opts())
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "PreferredAuthentications=publickey",
            ])
            .arg("-o")
            .arg(format!("User={}", alice_login()))
            .arg("-i")
            .arg(&self.alice_key)
            .arg("-P")
            .arg(self.psm.port().to_string());
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `sftp -b BATCH -P PORT … alice@…@127.0.0.1`.
    pub fn sftp(&self, batch: &Path) -> Command {
        let mut c = Command::new("sftp");
        c.args(common_ssh_opts())
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "PreferredAuthentications=publickey",
            ])
            .arg("-i")
            .arg(&self.alice_key)
            .arg("-P")
            .arg(self.psm.port().to_string())
            .arg("-b")
            .arg(batch)
            .arg(format!("{}@127.0.0.1", alice_login()));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// Adds psm user `name` with a fresh key (no grant); returns the private key path.
    pub fn add_user_with_key(&self, name: &str) -> PathBuf {
        let key = self.psm.work_dir().join(format!("{name}_ed25519"));
        gen_key(&key);
        self.psm.psmctl_ok(
            &[
                "user",
                "add",
                name,
                "--ssh-key",
                &pub_path(&key).display().to_string(),
            ],
            None,
        );
        key
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// `ssh -p PORT LOGIN@127.0.0.1` with password authentication only; the password comes from an
/// `SSH_ASKPASS` script written at `askpass` (`SSH_ASKPASS_REQUIRE=force`, no terminal needed).
pub fn password_ssh(port: u16, login: &str, password: &str, askpass: &Path) -> Command {
    fs::write(askpass, format!("#!/bin/sh\nprintf '%s\\n' '{password}'\n")).expect("askpass");
    fs::set_permissions(askpass, fs::Permissions::from_mode(0o755)).expect("chmod askpass");
    let mut c = Command::new("ssh");
    c.args(common_ssh_opts())
        .args([
            "-o",
            "BatchMode=no",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "NumberOfPasswordPrompts=1",
        ])
        .arg("-p")
        .arg(port.to_string())
        .arg(format!("{login}@127.0.0.1"))
        .env("SSH_ASKPASS", askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .env_remove("SSH_AUTH_SOCK");
    c
}

/// Runs `ssh` and returns its output (bounded by [`CMD_TIMEOUT`]).
pub fn run_ssh(cmd: &mut Command) -> CmdOut {
    run_cmd(cmd, None, CMD_TIMEOUT)
}

/// Asserts a refused ssh session: exit 255 and a stderr line starting with `prefix`.
pub fn assert_refused(out: &CmdOut, prefix: &str) -> String {
    let err = out.stderr_str();
    assert_eq!(
        out.code(),
        Some(255),
        "expected ssh exit 255 for a refused session\n{}",
        out.describe()
    );
    let line = err
        .lines()
        .map(|l| l.trim_start_matches('\r').trim_end())
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "expected a stderr line starting {prefix:?}\n{}",
                out.describe()
            )
        });
    line.to_string()
}

// ---------------------------------------------------------------------------------------------
// a real pseudo-terminal
// ---------------------------------------------------------------------------------------------

const PTY_DRIVER: &str = r#"
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

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
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
