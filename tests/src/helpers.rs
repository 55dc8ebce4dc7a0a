//! Small helpers: binaries, ports, waiting on a condition, files, keys, processes, JSON.

#[allow(unused_imports)]
use super::*;
use std::collections::BTreeSet;

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

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process has not been
/// given before: the kernel may hand the same ephemeral port to two binds in a row once the
/// first is released, and two listeners of one test on one port make a flaky failure.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no loopback port this test process has not used already");
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

/// The relay's counter `name`, summed over its workers, read from its metrics port on
/// 127.0.0.1 (`--metrics-listen`); 0 when it cannot be read.
pub fn relay_counter(port: u16, name: &str) -> f64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    psm_metrics::parse(&psm_metrics::fetch(addr, Duration::from_secs(5)).unwrap_or_default())
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
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

/// Reads the audit log: its closed segments (`DATA/audit/audit-*.jsonl`, in order), then
/// `DATA/audit.jsonl` (lines that do not parse, e.g. a half-written last line, are skipped).
pub fn audit_events(data_dir: &Path) -> Vec<Value> {
    let mut files = audit_segments(data_dir);
    files.push(data_dir.join("audit.jsonl"));
    files
        .iter()
        .flat_map(|f| {
            let text = fs::read_to_string(f).unwrap_or_default();
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The closed audit segments, `DATA/audit/audit-*.jsonl`, oldest first.
pub fn audit_segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(data_dir.join("audit"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A string field of a JSON object, or "".
pub fn jstr<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or("")
}

/// An echo server on loopback (the destination of forwards); serves `n` connections.
pub fn echo_server(n: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = l.accept() else { return };
            thread::spawn(move || {
                let mut r = s.try_clone().expect("clone");
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    port
}

/// The socket inodes among the descriptors of process `pid`.
pub fn socket_inodes(pid: &str) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Sockets of process `pid` that are connected to 127.0.0.1:`port` (from /proc/net/tcp): those
/// among its descriptors, and those no process has a descriptor of but that are still open (not
/// orphaned, inode 0, as a closed socket is): psm-relay's legs live in its io_uring tables with
/// no descriptor. (Only psm-relay dials the ports the tests ask about.)
pub fn connections_to(pid: u32, port: u16) -> usize {
    let (own, others) = (socket_inodes(&pid.to_string()), sockets_of_others(pid));
    tcp_to(port, |inode| {
        own.contains(inode) || (inode != "0" && !others.contains(inode))
    })
}

/// Sockets connected to 127.0.0.1:`port` that process `pid` holds by a descriptor.
pub fn descriptor_connections_to(pid: u32, port: u16) -> usize {
    let inodes = socket_inodes(&pid.to_string());
    tcp_to(port, |inode| inodes.contains(inode))
}

/// Sockets of process `pid` connected to 127.0.0.1:`port` that one of its epoll instances
/// watches (each epoll descriptor's `tfd:` lines in /proc/PID/fdinfo): a worker on io_uring
/// registers none of its connections with its runtime's epoll.
pub fn epoll_watched_connections_to(pid: u32, port: u16) -> usize {
    let dir = format!("/proc/{pid}/fd");
    let link = |fd: &str| {
        std::fs::read_link(format!("{dir}/{fd}"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut watched = std::collections::HashSet::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let fd = e.file_name().to_string_lossy().into_owned();
        if link(&fd) != "anon_inode:[eventpoll]" {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        for l in info.lines() {
            let Some(target) = l
                .strip_prefix("tfd:")
                .and_then(|r| r.split_whitespace().next())
            else {
                continue;
            };
            if let Some(inode) = link(target)
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
            {
                watched.insert(inode.to_owned());
            }
        }
    }
    tcp_to(port, |inode| watched.contains(inode))
}

/// The socket inodes among the descriptors of every process but `pid`.
fn sockets_of_others(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && *n != pid.to_string())
                .flat_map(|n| socket_inodes(&n))
                .collect()
        })
        .unwrap_or_default()
}

/// Sockets in /proc/net/tcp connected to 127.0.0.1:`port` whose inode `held` accepts.
fn tcp_to(port: u16, held: impl Fn(&str) -> bool) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[2].ends_with(&want) && held(f[9])
        })
        .count()
}
