//! The processes `psm-perf bench` starts and measures: the light target, `psm up`, an OpenSSH
//! jump host, socat; their CPU time and memory from /proc.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// A child process stopped (SIGTERM, so `psm up` stops its daemons; SIGKILL after 10 s) and
/// reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let _ = wait_until("a bench process to stop", Duration::from_secs(10), || {
                matches!(self.0.try_wait(), Ok(Some(_)))
            });
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU-seconds of `pid` (user + system, its own and its waited-for children's); 0 for a
/// process that is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    // fields 14-17 of stat: utime, stime, cutime, cstime
    stat_seconds(&format!("/proc/{pid}/stat"), 14, 4)
}

/// CPU-seconds of this process's children that were waited for (`cutime` + `cstime`).
pub fn reaped_children_cpu_seconds() -> f64 {
    stat_seconds("/proc/self/stat", 16, 2)
}

/// The sum of `count` tick fields of a `stat` file from field `first` (numbered from 1), in
/// seconds; 0 when it cannot be read.
fn stat_seconds(path: &str, first: usize, count: usize) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    // `rest` starts at field 3 (the name, field 2, may hold spaces)
    rest.split_whitespace()
        .skip(first - 3)
        .take(count)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum::<f64>()
        / TICKS
}

/// The living descendants of `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            out.push(c);
            frontier.push(c);
        }
    }
    out
}

/// CPU-seconds of `pid` and all its living descendants (a forking server's connections, counted
/// while they run; once reaped they are in the parent's own figure).
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    // a child's own time only: its reaped children are in its cutime already
    cpu_seconds(pid) + descendants(pid).into_iter().map(cpu_seconds).sum::<f64>()
}

/// How many processes `pid`'s tree holds (itself included).
pub fn tree_size(pid: u32) -> usize {
    1 + descendants(pid).len()
}

/// Resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Descriptors `pid` may still open: its soft `RLIMIT_NOFILE` less those open now (`None` when
/// /proc does not say, or the limit is `unlimited`).
pub fn descriptors_left(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let psm_perf::Limit::Value(soft) = psm_perf::parse_nofile(&limits)?.0 else {
        return None;
    };
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(soft.saturating_sub(open))
}

/// Pids whose command line mentions `needle` (like `pgrep -f`), with their executable's name.
pub fn pids_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.contains(needle)) {
            let name = args
                .first()
                .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
                .unwrap_or_default();
            out.push((pid, name));
        }
    }
    out
}

/// A free loopback port (bound, then released) that this process has not handed out before:
/// two binds in a row may get the same ephemeral port once the first is released.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    bail!("no loopback port this process has not used already")
}

/// Waits until `cond` holds, at most `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn port_open(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// The light target (`psm-perf bench-target`), with the addresses it serves.
pub fn start_target(
    dir: &Path,
    host_key: &Path,
    user_pub: &Path,
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let exe = std::env::current_exe().context("psm-perf's own path")?;
    let mut child = Command::new(exe)
        .args([
            "bench-target",
            "--listen",
            "127.0.0.1:0",
            "--tcp-sink",
            "127.0.0.1:0",
        ])
        .arg("--host-key")
        .arg(host_key)
        .arg("--user-key")
        .arg(user_pub)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("target.log"))?)
        .spawn()
        .context("starting the light target")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let p = Proc(child);
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["ssh", ssh, "tcp", tcp] => Ok((p, ssh.parse()?, tcp.parse()?)),
        _ => bail!("the light target did not start: {line:?}"),
    }
}

/// `psm up` on `listen` with its data in `data`; waits until psmctl and the relay answer.
pub fn start_psm(
    bin: &Path,
    data: &Path,
    listen: SocketAddr,
    workers: Option<usize>,
) -> anyhow::Result<Proc> {
    let log = std::fs::File::create(data.with_extension("log"))?;
    // one bench user holds every idle session: lift the per-user and relay-wide caps; the
    // sessions workload logs in 32 at once from one address: lift the pre-login caps over it
    // psm refuses a data directory that group or others may access
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data)?;
    // PSM_BENCH_RELAY_TOML: more `[relay]` settings for the run (`durable_window_bytes = 8388608`)
    let extra = std::env::var("PSM_BENCH_RELAY_TOML").unwrap_or_default();
    std::fs::write(
        data.join("psm.toml"),
        format!(
            "[relay]\nmax_connections_per_user = 100000\nmax_connections = 1000000\n\
             max_startups = \"256\"\nper_source_max_startups = 256\n{extra}\n"
        ),
    )?;
    // PSM_BENCH_PSM_CPUS (`0-7`): psm runs on those CPUs (taskset), apart from the client and
    // the target, which stay on psm-perf's own (run psm-perf itself under taskset)
    let mut cmd = match std::env::var("PSM_BENCH_PSM_CPUS") {
        Ok(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpus]).arg(bin.join("psm"));
            c
        }
        Err(_) => Command::new(bin.join("psm")),
    };
    cmd.arg("up");
    if let Some(n) = workers {
        cmd.args(["--workers", &n.to_string()]);
    }
    let child = cmd
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &listen.to_string(), "--rdp-listen", "off"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.join("psm").display()))?;
    let mut p = Proc(child);
    let mut exited = None;
    let up = wait_until("psm to start", Duration::from_secs(60), || {
        if let Ok(Some(status)) = p.0.try_wait() {
            exited = Some(status);
            return true;
        }
        psmctl(bin, data, &["user", "list"]).is_ok() && port_open(listen)
    });
    if let Some(status) = exited {
        let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "psm up exited ({status}): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    up?;
    Ok(p)
}

/// Runs psmctl; its stdout, or its stderr as the error.
pub fn psmctl(bin: &Path, data: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin.join("psmctl"));
    cmd.arg("--data-dir").arg(data).args(args);
    let out = output_within(&mut cmd, Duration::from_secs(30)).context("running psmctl")?;
    if !out.status.success() {
        bail!(
            "psmctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` to its end, killing it after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> anyhow::Result<std::process::Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            bail!("no answer within {limit:?}")
        }
    }
}

/// The name of the user this runs as (the jump host's login).
pub fn user_name() -> anyhow::Result<String> {
    let out = output_within(Command::new("id").arg("-un"), Duration::from_secs(10))?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || name.is_empty() {
        bail!("cannot tell this user's name (id -un)");
    }
    Ok(name)
}

/// The OpenSSH server, if this machine has one.
pub fn sshd() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// An OpenSSH jump host on `port` accepting `user_pub` for the current user.
pub fn start_jump(
    sshd: &Path,
    dir: &Path,
    port: u16,
    host_key: &Path,
    user_pub: &Path,
) -> anyhow::Result<Proc> {
    let keys = dir.join("jump_authorized_keys");
    std::fs::copy(user_pub, &keys)?;
    // sshd refuses to start without its privilege separation directory, which only the
    // system service creates (not there in a container or before the service ever ran)
    let _ = std::fs::create_dir_all("/run/sshd");
    let cfg = dir.join("jump_sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nPidFile {}\nMaxStartups 1000\nMaxSessions 1000\nLogLevel ERROR\n",
            host_key.display(),
            keys.display(),
            dir.join("jump.pid").display()
        ),
    )?;
    let child = Command::new(sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("jump.log"))?)
        .spawn()
        .context("starting the jump host's sshd")?;
    let mut p = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut exited = None;
    wait_until("the jump host", Duration::from_secs(10), || {
        exited = p.0.try_wait().ok().flatten();
        exited.is_some() || port_open(addr)
    })?;
    if let Some(status) = exited {
        let log = std::fs::read_to_string(dir.join("jump.log")).unwrap_or_default();
        let why = log
            .lines()
            .next()
            .unwrap_or("no message")
            .trim()
            .to_string();
        bail!("its sshd exited ({status}): {why}");
    }
    Ok(p)
}

/// `socat` forwarding one connection on `port` to `to`, if socat is installed.
pub fn start_socat(port: u16, to: SocketAddr) -> anyhow::Result<Option<Proc>> {
    let child = match Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"))
        .arg(format!("TCP:{to}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let p = Proc(child);
    // listening once /proc/net/tcp shows the port in LISTEN (state 0A), without connecting
    let hex = format!(":{port:04X} ");
    wait_until("socat to listen", Duration::from_secs(10), || {
        std::fs::read_to_string("/proc/net/tcp")
            .map(|t| {
                t.lines()
                    .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
            })
            .unwrap_or(false)
    })?;
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn descriptors_left_goes_down_as_descriptors_open() {
        let pid = std::process::id();
        let before = super::descriptors_left(pid).expect("a finite limit in /proc/self/limits");
        let held: Vec<_> = (0..3)
            .map(|_| std::fs::File::open("/proc/self/limits").expect("open"))
            .collect();
        let after = super::descriptors_left(pid).expect("the limit");
        assert_eq!(before - after, held.len() as u64);
    }
}
