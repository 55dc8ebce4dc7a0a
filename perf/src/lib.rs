//! psm-perf: the operator's performance tool for a psm gateway.
//!
//! This library is `psm-perf check`: it reads the host's tuning (io_uring availability, the
//! open-files limit against the sessions the box must hold, the listen backlog cap, the ephemeral
//! port range, the relay's workers against the CPUs and their pinning, transparent hugepages,
//! socket buffer caps, TCP memory, the CPU frequency governor) and prints one OK or WARN line per
//! item, with the fix for each warning, as text or JSON ([`run_checks`], [`render_text`],
//! [`render_json`]). Where a `psm-relay` runs, the open-files limit and the workers are that
//! process's own. It never changes a setting: it only reads and advises. The binary's other
//! commands (`bench`, `stats`, `record-bench`) live beside `main.rs`.
#![warn(missing_docs)]

use std::fmt::Write as _;
use std::io;

use serde::Serialize;
use serde_json::{json, Value};

/// Below this soft `RLIMIT_NOFILE` a busy gateway runs out of descriptors: on epoll (and on
/// io_uring before Linux 6.13) each session holds a client socket and a target socket; on
/// io_uring from 6.13 they live in each worker's ring, whose table the kernel caps at the same
/// limit. A box that must hold more sessions needs [`nofile_needed`].
pub const MIN_NOFILE: u64 = 65_536;
/// Sessions `psm-perf check` sizes the open-files limit for unless told (`--sessions`).
pub const DEFAULT_SESSIONS: u64 = 10_000;
/// Descriptors a relay holds besides its sessions' sockets (listeners, rings, the control and
/// recorder links, logs), with room to spare.
pub const NOFILE_SPARE: u64 = 1_024;

/// The soft open-files limit a relay holding `sessions` sessions needs: two sockets each (client
/// and target) and [`NOFILE_SPARE`], and never under [`MIN_NOFILE`].
pub fn nofile_needed(sessions: u64) -> u64 {
    sessions
        .saturating_mul(2)
        .saturating_add(NOFILE_SPARE)
        .max(MIN_NOFILE)
}

/// What the checks are asked to size for, and which relay they look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Concurrent sessions the gateway must hold.
    pub sessions: u64,
    /// The psm-relay to look at (`--pid`); by default the first one running.
    pub relay_pid: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sessions: DEFAULT_SESSIONS,
            relay_pid: None,
        }
    }
}
/// Below this `net.core.somaxconn` the relay's listen backlog is cut short during connection bursts.
pub const MIN_SOMAXCONN: u64 = 4_096;
/// Below this many ephemeral ports, connections from the relay to one target run out early.
pub const MIN_PORT_RANGE: u64 = 16_384;
/// Below this `net.core.rmem_max` / `wmem_max` (4 MiB) socket buffers the relay asks for are capped.
pub const MIN_SOCKET_BUFFER_MAX: u64 = 4 * 1024 * 1024;

/// Below this `net.ipv4.tcp_mem` high mark (pages of 4 KiB: 1 GiB) the kernel squeezes socket
/// buffers of thousands of sessions under memory pressure.
pub const MIN_TCP_MEM_HIGH_PAGES: u64 = 262_144;

/// Proc and sys files the checks read.
pub mod paths {
    /// Resource limits of the running process.
    pub const LIMITS: &str = "/proc/self/limits";
    /// Where the running processes are listed.
    pub const PROC: &str = "/proc";
    /// Listen backlog cap.
    pub const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";
    /// Ephemeral port range.
    pub const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    /// Transparent hugepages mode.
    pub const THP: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
    /// Receive buffer cap.
    pub const RMEM_MAX: &str = "/proc/sys/net/core/rmem_max";
    /// Send buffer cap.
    pub const WMEM_MAX: &str = "/proc/sys/net/core/wmem_max";
    /// TCP memory thresholds (pages): low, pressure, high.
    pub const TCP_MEM: &str = "/proc/sys/net/ipv4/tcp_mem";
    /// CPU frequency governor of the first CPU (absent on most virtual machines).
    pub const GOVERNOR: &str = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor";
    /// Whether io_uring is disabled system-wide (Linux 6.6 and later).
    pub const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine for a gateway.
    Ok,
    /// Worth fixing before production load.
    Warn,
}

impl Status {
    /// `OK` or `WARN`, as the text output prints it.
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
        }
    }
}

/// One line of `psm-perf check`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// Short stable name (`nofile`, `somaxconn`, …).
    pub name: &'static str,
    /// OK or WARN.
    pub status: Status,
    /// What was read, as JSON (`null` when it could not be read).
    pub value: Value,
    /// One human sentence about the value.
    pub message: String,
    /// How to fix a warning, when there is a fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, value: Value, message: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Ok,
            value,
            message: message.into(),
            fix: None,
        }
    }

    fn warn(
        name: &'static str,
        value: Value,
        message: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Check {
            name,
            status: Status::Warn,
            value,
            message: message.into(),
            fix,
        }
    }
}

/// What the checks look at; [`RealHost`] is the running machine, tests use a fake.
pub trait Host {
    /// Reads a proc or sys file.
    fn read(&self, path: &str) -> io::Result<String>;
    /// Tries to set up a small io_uring; the error text when that fails.
    fn probe_io_uring(&self) -> Result<(), String>;
    /// CPUs this process may run on.
    fn cpus(&self) -> Option<usize>;
    /// The names in a directory (`/proc`, `/proc/PID/task`).
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Where a symbolic link points (`/proc/PID/fd/N`).
    fn link(&self, path: &str) -> io::Result<String>;
}

/// The machine psm-perf runs on.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealHost;

impl Host for RealHost {
    fn read(&self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn probe_io_uring(&self) -> Result<(), String> {
        io_uring::IoUring::new(8)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn cpus(&self) -> Option<usize> {
        std::thread::available_parallelism().ok().map(|n| n.get())
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    }

    fn link(&self, path: &str) -> io::Result<String> {
        std::fs::read_link(path).map(|p| p.to_string_lossy().into_owned())
    }
}

/// A running `psm-relay` as `/proc` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    /// Its process id.
    pub pid: u32,
    /// Other `psm-relay` processes found beside it.
    pub others: usize,
    /// Its workers (`psm-worker-N` threads) in the order of N: the CPUs each may run on.
    pub workers: Vec<Vec<usize>>,
    /// The CPUs the process may run on (its `Cpus_allowed_list`), when readable.
    pub cpus: Option<usize>,
}

/// The first `psm-relay` process on the host (lowest pid), with its workers' CPU sets; `None`
/// when none runs (or `/proc` cannot be listed).
pub fn find_relay(host: &dyn Host) -> Option<Relay> {
    find_relay_pid(host, None)
}

/// Like [`find_relay`], or the `psm-relay` with pid `only` when given (`None` when that process
/// is not a psm-relay).
pub fn find_relay_pid(host: &dyn Host, only: Option<u32>) -> Option<Relay> {
    let is_relay = |pid: &u32| {
        host.read(&format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end() == "psm-relay")
    };
    let mut pids: Vec<u32> = host
        .list(paths::PROC)
        .ok()?
        .iter()
        .filter_map(|n| n.parse().ok())
        .filter(is_relay)
        .collect();
    pids.sort_unstable();
    let pid = match only {
        Some(p) if is_relay(&p) => p,
        Some(_) => return None,
        None => *pids.first()?,
    };
    let mut workers: Vec<(usize, Vec<usize>)> = host
        .list(&format!("/proc/{pid}/task"))
        .unwrap_or_default()
        .iter()
        .filter_map(|tid| {
            let comm = host.read(&format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let n: usize = comm.trim_end().strip_prefix("psm-worker-")?.parse().ok()?;
            let status = host.read(&format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(parse_cpu_list)?;
            Some((n, cpus))
        })
        .collect();
    workers.sort_unstable_by_key(|w| w.0);
    let cpus = host
        .read(&format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(parse_cpu_list)
        })
        .map(|c| c.len());
    Some(Relay {
        pid,
        others: pids.len().saturating_sub(1),
        workers: workers.into_iter().map(|w| w.1).collect(),
        cpus,
    })
}

/// A kernel CPU list (`0-3,8,10-11`) as the CPUs it names, in order.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        let (lo, hi): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let n = part.parse().ok()?;
                (n, n)
            }
        };
        if lo > hi || hi - lo > 65_536 {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    Some(cpus)
}

/// A resource limit value from `/proc/self/limits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// A finite limit.
    Value(u64),
    /// `unlimited`.
    Unlimited,
}

impl Limit {
    fn parse(s: &str) -> Option<Self> {
        if s == "unlimited" {
            Some(Limit::Unlimited)
        } else {
            s.parse().ok().map(Limit::Value)
        }
    }

    fn at_least(self, min: u64) -> bool {
        match self {
            Limit::Value(v) => v >= min,
            Limit::Unlimited => true,
        }
    }

    fn to_json(self) -> Value {
        match self {
            Limit::Value(v) => json!(v),
            Limit::Unlimited => json!("unlimited"),
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Value(v) => write!(f, "{v}"),
            Limit::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// Soft and hard "Max open files" from the text of `/proc/<pid>/limits`.
pub fn parse_nofile(limits: &str) -> Option<(Limit, Limit)> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut fields = rest.split_whitespace();
    let soft = Limit::parse(fields.next()?)?;
    let hard = Limit::parse(fields.next()?)?;
    Some((soft, hard))
}

/// A single unsigned number, as most `/proc/sys` files hold.
pub fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `net.ipv4.ip_local_port_range`: the low and high port, high not below low.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace();
    let lo: u16 = it.next()?.parse().ok()?;
    let hi: u16 = it.next()?.parse().ok()?;
    if it.next().is_some() || hi < lo {
        return None;
    }
    Some((lo, hi))
}

/// Number of ports in an inclusive range.
pub fn port_range_width((lo, hi): (u16, u16)) -> u64 {
    u64::from(hi) - u64::from(lo) + 1
}

/// The selected mode in a sysfs choice file such as `always [madvise] never`.
pub fn parse_bracketed_choice(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

fn unreadable(name: &'static str, path: &str, e: &io::Error) -> Check {
    Check::warn(
        name,
        Value::Null,
        format!("cannot read {path}: {e}"),
        Some(format!(
            "run psm-perf check on the gateway host itself, as root or the relay's user (a \
             container or a restricted /proc may hide {path}), or read it there by hand"
        )),
    )
}

fn unparsable(name: &'static str, path: &str, text: &str) -> Check {
    Check::warn(
        name,
        Value::Null,
        format!("cannot make sense of {path}: {:?}", text.trim()),
        Some(format!(
            "read {path} by hand and compare it with this check's bound (perf/src/lib.rs)"
        )),
    )
}

/// io_uring: the relay's workers do their socket I/O through it (`--io auto`, the default, falls
/// back to epoll without it).
pub fn check_io_uring(host: &dyn Host, relay: Option<&Relay>) -> Check {
    const NAME: &str = "io_uring";
    let probe = host.probe_io_uring();
    let rings = relay.map(|r| (r, relay_rings(host, r.pid)));
    let value = json!({
        "available": probe.is_ok(),
        "relay_rings": rings.and_then(|(_, n)| n),
    });
    match (probe, rings) {
        // a worker on io_uring holds one ring, one descriptor: fewer rings than workers is a
        // worker that fell back to epoll (its ring refused: a limit, memory, a filter)
        (_, Some((r, Some(n)))) if n > 0 && n < r.workers.len() => Check::warn(
            NAME,
            value,
            format!(
                "psm-relay (pid {}) holds {n} io_uring instances for {} workers: {} of its \
                 workers fell back to epoll",
                r.pid,
                r.workers.len(),
                r.workers.len() - n
            ),
            Some(
                "read the relay's log (\"io_uring unavailable; worker falls back to epoll\", \
                 with its worker and the error); start it with --io uring to make that an error"
                    .into(),
            ),
        ),
        // what the relay holds says more than this process's own probe
        (probe, Some((r, Some(n)))) if n > 0 => {
            let here = match probe {
                Ok(()) => String::new(),
                Err(e) => format!(" (this shell cannot set one up: {e})"),
            };
            Check::ok(
                NAME,
                value,
                format!(
                    "psm-relay (pid {}) holds {n} io_uring instances: its workers use \
                     io_uring{here}, one ring each",
                    r.pid
                ),
            )
        }
        (Ok(()), Some((r, Some(_)))) => Check::warn(
            NAME,
            value,
            format!(
                "available here, but psm-relay (pid {}) holds no io_uring: its workers run on \
                 epoll (--io epoll, or io_uring refused to the relay's user)",
                r.pid
            ),
            Some(
                "read the relay's log (\"io_uring unavailable; worker falls back to epoll\"); \
                 start it with --io uring to make that an error; with kernel.io_uring_disabled \
                 = 1, add the relay's user to the group in kernel.io_uring_group"
                    .into(),
            ),
        ),
        (Ok(()), Some((r, None))) => Check::warn(
            NAME,
            value,
            format!(
                "available here; cannot list /proc/{}/fd to see whether psm-relay uses it",
                r.pid
            ),
            Some("run psm-perf check as root or as the relay's user".into()),
        ),
        (Ok(()), None) => Check::ok(
            NAME,
            value,
            "available (io_uring_setup with 8 entries succeeded)",
        ),
        (Err(e), _) => {
            let disabled = host
                .read(paths::IO_URING_DISABLED)
                .ok()
                .and_then(|t| parse_u64(&t));
            let why = match disabled {
                Some(v) if v != 0 => format!(" (kernel.io_uring_disabled = {v})"),
                _ => String::new(),
            };
            Check::warn(
                NAME,
                value,
                format!(
                    "io_uring_setup failed: {e}{why}; psm-relay's --io auto (the default) falls \
                     back to epoll and --io uring does not start"
                ),
                Some(
                    "use Linux 5.11 or later, set sysctl kernel.io_uring_disabled=0, and allow \
                     io_uring in the container's seccomp profile"
                        .into(),
                ),
            )
        }
    }
}

/// The io_uring descriptors process `pid` holds (those that name `[io_uring]`); `None` when its
/// descriptors cannot be listed (another user's process, without root).
fn relay_rings(host: &dyn Host, pid: u32) -> Option<usize> {
    let dir = format!("/proc/{pid}/fd");
    let fds = host.list(&dir).ok()?;
    Some(
        fds.iter()
            .filter(|fd| {
                host.link(&format!("{dir}/{fd}"))
                    .is_ok_and(|l| l == "anon_inode:[io_uring]")
            })
            .count(),
    )
}

/// `RLIMIT_NOFILE` against the sessions the gateway must hold: the running relay's own where one
/// runs, else this process's, as the shell that runs `psm up` would pass it on.
pub fn check_nofile(host: &dyn Host, relay: Option<&Relay>, sessions: u64) -> Check {
    const NAME: &str = "nofile";
    let (path, whose) = match relay {
        Some(r) => (
            format!("/proc/{}/limits", r.pid),
            format!("psm-relay (pid {})", r.pid),
        ),
        None => (
            paths::LIMITS.to_string(),
            "this shell (no psm-relay runs; psm up passes it on)".to_string(),
        ),
    };
    let text = match host.read(&path) {
        Ok(t) => t,
        Err(e) => return unreadable(NAME, &path, &e),
    };
    let Some((soft, hard)) = parse_nofile(&text) else {
        return unparsable(NAME, &path, "no \"Max open files\" line");
    };
    let need = nofile_needed(sessions);
    let value = json!({
        "soft": soft.to_json(),
        "hard": hard.to_json(),
        "needed": need,
        "sessions": sessions,
        "relay_pid": relay.map(|r| r.pid),
    });
    if soft.at_least(need) {
        Check::ok(
            NAME,
            value,
            format!(
                "open files of {whose}: soft {soft}, hard {hard}; {sessions} sessions need {need}"
            ),
        )
    } else {
        let fix = if hard.at_least(need) {
            format!(
                "run `ulimit -n {need}` before psm up (or LimitNOFILE={need} in its systemd unit)"
            )
        } else {
            format!(
                "raise the hard limit too: `nofile {need}` in /etc/security/limits.conf or \
                 LimitNOFILE={need} in the systemd unit"
            )
        };
        Check::warn(
            NAME,
            value,
            format!(
                "open files of {whose}: soft {soft}, hard {hard}; {sessions} sessions need {need} \
                 (two sockets each, on epoll and on io_uring before Linux 6.13, or as many slots \
                 in a worker's io_uring table, which this limit caps), or sessions are refused"
            ),
            Some(fix),
        )
    }
}

/// `net.core.somaxconn`: caps the relay's listen backlog.
pub fn check_somaxconn(host: &dyn Host) -> Check {
    const NAME: &str = "somaxconn";
    let text = match host.read(paths::SOMAXCONN) {
        Ok(t) => t,
        Err(e) => return unreadable(NAME, paths::SOMAXCONN, &e),
    };
    let Some(v) = parse_u64(&text) else {
        return unparsable(NAME, paths::SOMAXCONN, &text);
    };
    if v >= MIN_SOMAXCONN {
        Check::ok(NAME, json!(v), format!("net.core.somaxconn = {v}"))
    } else {
        Check::warn(
            NAME,
            json!(v),
            format!(
                "net.core.somaxconn = {v}; below {MIN_SOMAXCONN}, bursts of new connections are \
                 dropped"
            ),
            Some(format!("sysctl -w net.core.somaxconn={MIN_SOMAXCONN}")),
        )
    }
}

/// `net.ipv4.ip_local_port_range`: ports for the relay's connections to targets.
pub fn check_port_range(host: &dyn Host) -> Check {
    const NAME: &str = "ip_local_port_range";
    let text = match host.read(paths::PORT_RANGE) {
        Ok(t) => t,
        Err(e) => return unreadable(NAME, paths::PORT_RANGE, &e),
    };
    let Some(range) = parse_port_range(&text) else {
        return unparsable(NAME, paths::PORT_RANGE, &text);
    };
    let width = port_range_width(range);
    let value = json!({ "low": range.0, "high": range.1, "width": width });
    let msg = format!(
        "net.ipv4.ip_local_port_range = {} {} ({width} ports)",
        range.0, range.1
    );
    if width >= MIN_PORT_RANGE {
        Check::ok(NAME, value, msg)
    } else {
        Check::warn(
            NAME,
            value,
            format!("{msg}; below {MIN_PORT_RANGE}, sessions to one target run out of ports"),
            Some("sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\"".into()),
        )
    }
}

/// The relay's workers against the CPUs, and their pinning: those of the running relay where one
/// runs, else the defaults `psm up` would use on this host.
pub fn check_workers(host: &dyn Host, relay: Option<&Relay>) -> Check {
    const NAME: &str = "workers";
    let cpus = host.cpus();
    let Some(r) = relay else {
        return match cpus {
            Some(n) => Check::ok(
                NAME,
                json!({ "cpus": n, "workers": Value::Null, "pinned": Value::Null }),
                format!(
                    "{n} CPUs; no psm-relay runs: psm up starts one worker per CPU, each pinned to \
                     its own (psm up --workers {n} and `[relay] pin_workers = true`, the defaults); \
                     where other busy processes share these CPUs, `pin_workers = false` lets the \
                     kernel move a worker off a CPU another process holds (perf/BENCHMARKS.md); run this check beside \
                     a running relay to see its own"
                ),
            ),
            None => Check::warn(
                NAME,
                Value::Null,
                "cannot tell how many CPUs this process may use",
                Some("pass psm up --workers N, N the CPUs the relay may use".into()),
            ),
        };
    };
    // the relay's own CPUs (its affinity, as its own systemd unit or taskset set it), not this
    // shell's
    let cpus = r.cpus.or(cpus);
    let w = r.workers.len();
    let pinned: Vec<Option<usize>> = r
        .workers
        .iter()
        .map(|c| (c.len() == 1).then(|| c[0]))
        .collect();
    let all_pinned = w > 0 && pinned.iter().all(Option::is_some);
    let none_pinned = pinned.iter().all(Option::is_none);
    let mut shared: Vec<usize> = pinned.iter().flatten().copied().collect();
    shared.sort_unstable();
    let distinct = {
        let mut d = shared.clone();
        d.dedup();
        d.len()
    };
    let value = json!({
        "cpus": cpus,
        "workers": w,
        "relay_pid": r.pid,
        "pinned": pinned,
    });
    let pins = if all_pinned {
        let list: Vec<String> = pinned
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i}→{}", c.unwrap_or_default()))
            .collect();
        format!("pinned (worker→CPU {})", list.join(" "))
    } else if none_pinned {
        "not pinned (`[relay] pin_workers = false`): the kernel places them".to_string()
    } else {
        "partly pinned: pinning failed for some workers (see the relay's log)".to_string()
    };
    let head = format!(
        "psm-relay (pid {}{}): {w} workers on {} CPUs, {pins}",
        r.pid,
        if r.others > 0 {
            format!(", and {} more relays", r.others)
        } else {
            String::new()
        },
        cpus.map_or("?".to_string(), |n| n.to_string())
    );
    let n = cpus.unwrap_or(w);
    if w == 0 {
        Check::warn(
            NAME,
            value,
            format!("{head}: no worker threads found"),
            Some("check the relay's log; restart it with psm up".into()),
        )
    } else if w > n {
        Check::warn(
            NAME,
            value,
            format!("{head}: more workers than CPUs, so workers take turns on a core"),
            Some(format!("psm up --workers {n}")),
        )
    } else if distinct < shared.len() {
        Check::warn(
            NAME,
            value,
            format!("{head}: two workers are pinned to one CPU"),
            Some("restart the relay with psm up (it pins worker i to the i-th allowed CPU)".into()),
        )
    } else if !all_pinned && !none_pinned {
        Check::warn(
            NAME,
            value,
            head,
            Some("give the relay's user CAP_SYS_NICE or an unrestricted CPU set, or set `[relay] pin_workers = false` in psm.toml".into()),
        )
    } else if w < n {
        Check::warn(
            NAME,
            value,
            format!("{head}: {} CPUs carry no worker", n - w),
            Some(format!(
                "psm up --workers {n}, unless those CPUs are kept for other work"
            )),
        )
    } else {
        Check::ok(NAME, value, head)
    }
}

/// Transparent hugepages: `always` brings compaction stalls to a latency-sensitive proxy.
pub fn check_thp(host: &dyn Host) -> Check {
    const NAME: &str = "transparent_hugepage";
    let text = match host.read(paths::THP) {
        Ok(t) => t,
        Err(e) => return unreadable(NAME, paths::THP, &e),
    };
    let Some(mode) = parse_bracketed_choice(&text) else {
        return unparsable(NAME, paths::THP, &text);
    };
    let msg = format!("transparent hugepages: {mode}");
    if mode == "always" {
        Check::warn(
            NAME,
            json!(mode),
            format!("{msg}; khugepaged compaction can stall the relay's workers"),
            Some(format!("echo madvise > {}", paths::THP)),
        )
    } else {
        Check::ok(NAME, json!(mode), msg)
    }
}

fn check_buffer_max(host: &dyn Host, name: &'static str, sysctl: &str, path: &str) -> Check {
    let text = match host.read(path) {
        Ok(t) => t,
        Err(e) => return unreadable(name, path, &e),
    };
    let Some(v) = parse_u64(&text) else {
        return unparsable(name, path, &text);
    };
    if v >= MIN_SOCKET_BUFFER_MAX {
        Check::ok(name, json!(v), format!("{sysctl} = {v}"))
    } else {
        Check::warn(
            name,
            json!(v),
            format!(
                "{sysctl} = {v}; below {MIN_SOCKET_BUFFER_MAX}, socket buffers set by the relay \
                 are capped (bulk scp/sftp throughput suffers)"
            ),
            Some(format!("sysctl -w {sysctl}={}", 4 * MIN_SOCKET_BUFFER_MAX)),
        )
    }
}

/// `net.core.rmem_max`.
pub fn check_rmem_max(host: &dyn Host) -> Check {
    check_buffer_max(host, "rmem_max", "net.core.rmem_max", paths::RMEM_MAX)
}

/// `net.core.wmem_max`.
pub fn check_wmem_max(host: &dyn Host) -> Check {
    check_buffer_max(host, "wmem_max", "net.core.wmem_max", paths::WMEM_MAX)
}

/// `net.ipv4.tcp_mem`: above its third figure TCP refuses socket memory, so every session slows.
pub fn check_tcp_mem(host: &dyn Host) -> Check {
    const NAME: &str = "tcp_mem";
    let text = match host.read(paths::TCP_MEM) {
        Ok(t) => t,
        Err(e) => return unreadable(NAME, paths::TCP_MEM, &e),
    };
    let v: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [low, pressure, high] = v[..] else {
        return unparsable(NAME, paths::TCP_MEM, &text);
    };
    let msg = format!(
        "net.ipv4.tcp_mem = {low} {pressure} {high} pages ({} MiB at most for all sockets)",
        high * 4 / 1024
    );
    if high >= MIN_TCP_MEM_HIGH_PAGES {
        Check::ok(NAME, json!([low, pressure, high]), msg)
    } else {
        Check::warn(
            NAME,
            json!([low, pressure, high]),
            format!("{msg}; thousands of sessions need more socket memory"),
            Some(format!(
                "sysctl -w net.ipv4.tcp_mem=\"{} {} {}\"",
                MIN_TCP_MEM_HIGH_PAGES / 2,
                MIN_TCP_MEM_HIGH_PAGES * 3 / 4,
                MIN_TCP_MEM_HIGH_PAGES
            )),
        )
    }
}

/// The CPU frequency governor: `powersave` clocks down between bursts and adds latency to
/// every keystroke; no cpufreq at all (a VM) is fine.
pub fn check_governor(host: &dyn Host) -> Check {
    const NAME: &str = "cpu_governor";
    let gov = match host.read(paths::GOVERNOR) {
        Ok(t) => t.trim().to_string(),
        Err(_) => {
            return Check::ok(
                NAME,
                Value::Null,
                "no CPU frequency scaling here (a virtual machine or a fixed clock)",
            )
        }
    };
    let msg = format!("CPU frequency governor: {gov}");
    if gov == "performance" || gov == "schedutil" {
        Check::ok(NAME, json!(gov), msg)
    } else {
        Check::warn(
            NAME,
            json!(gov),
            format!("{msg}; the clock drops between bursts and keystroke latency suffers"),
            Some("cpupower frequency-set -g performance".into()),
        )
    }
}

/// Every check, in the order `psm-perf check` prints them.
pub fn run_checks(host: &dyn Host, opts: &Options) -> Vec<Check> {
    let relay = find_relay_pid(host, opts.relay_pid);
    vec![
        check_io_uring(host, relay.as_ref()),
        check_nofile(host, relay.as_ref(), opts.sessions),
        check_somaxconn(host),
        check_port_range(host),
        check_workers(host, relay.as_ref()),
        check_thp(host),
        check_rmem_max(host),
        check_wmem_max(host),
        check_tcp_mem(host),
        check_governor(host),
    ]
}

/// Number of warnings among `checks`.
pub fn warnings(checks: &[Check]) -> usize {
    checks.iter().filter(|c| c.status == Status::Warn).count()
}

/// The text report: one `OK`/`WARN` line per check, the fix indented below a warning, and a
/// summary line.
pub fn render_text(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        let _ = writeln!(
            out,
            "{:<4}  {:<width$}  {}",
            c.status.label(),
            c.name,
            c.message
        );
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "{:<4}  {:<width$}  fix: {fix}", "", "");
        }
    }
    let warn = warnings(checks);
    let _ = writeln!(
        out,
        "psm-perf check: {} OK, {warn} WARN",
        checks.len() - warn
    );
    out
}

/// The JSON report: `{"checks": [...], "ok": N, "warn": N}`.
pub fn render_json(checks: &[Check]) -> Value {
    let warn = warnings(checks);
    json!({
        "checks": checks,
        "ok": checks.len() - warn,
        "warn": warn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 1048576              files
Max locked memory         8388608              8388608              bytes
";

    struct Fake {
        files: HashMap<&'static str, &'static str>,
        /// Files under /proc/PID (a running relay), by path.
        procs: HashMap<String, String>,
        uring: Result<(), String>,
        cpus: Option<usize>,
    }

    impl Fake {
        /// A psm-relay with pid 4242 and one worker thread per CPU list in `workers`, its open
        /// files `limits`, and `rings` io_uring descriptors.
        fn with_relay(mut self, workers: &[&str], limits: &str, rings: usize) -> Self {
            let p = |s: &str| s.to_string();
            self.procs.insert(p("/proc/1/comm"), p("init\n"));
            self.procs.insert(p("/proc/4242/comm"), p("psm-relay\n"));
            self.procs.insert(p("/proc/4242/limits"), p(limits));
            if let Some(n) = self.cpus {
                self.procs.insert(
                    p("/proc/4242/status"),
                    format!("Name:\tpsm-relay\nCpus_allowed_list:\t0-{}\n", n - 1),
                );
            }
            self.procs
                .insert(p("/proc/4242/task/4242/comm"), p("psm-relay\n"));
            for (i, cpus) in workers.iter().enumerate() {
                let tid = 5000 + i;
                self.procs.insert(
                    format!("/proc/4242/task/{tid}/comm"),
                    format!("psm-worker-{i}\n"),
                );
                self.procs.insert(
                    format!("/proc/4242/task/{tid}/status"),
                    format!("Name:\tpsm-worker-{i}\nCpus_allowed_list:\t{cpus}\n"),
                );
            }
            for fd in 0..3 + rings {
                let to = if fd < 3 {
                    "/dev/null"
                } else {
                    "anon_inode:[io_uring]"
                };
                self.procs.insert(format!("/proc/4242/fd/{fd}"), p(to));
            }
            self
        }
    }

    impl Host for Fake {
        fn read(&self, path: &str) -> io::Result<String> {
            self.files
                .get(path)
                .map(|s| s.to_string())
                .or_else(|| self.procs.get(path).cloned())
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn probe_io_uring(&self) -> Result<(), String> {
            self.uring.clone()
        }
        fn cpus(&self) -> Option<usize> {
            self.cpus
        }
        fn list(&self, dir: &str) -> io::Result<Vec<String>> {
            let prefix = format!("{dir}/");
            let mut names: Vec<String> = self
                .procs
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
                .collect();
            names.sort();
            names.dedup();
            if names.is_empty() {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            Ok(names)
        }
        fn link(&self, path: &str) -> io::Result<String> {
            self.procs
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn tuned() -> Fake {
        Fake {
            files: HashMap::from([
                (paths::LIMITS, "Max open files  1048576  1048576  files\n"),
                (paths::SOMAXCONN, "4096\n"),
                (paths::PORT_RANGE, "10240\t65535\n"),
                (paths::THP, "always [madvise] never\n"),
                (paths::RMEM_MAX, "16777216\n"),
                (paths::WMEM_MAX, "16777216\n"),
                (paths::TCP_MEM, "190000\t260000\t380000\n"),
                (paths::GOVERNOR, "performance\n"),
            ]),
            procs: HashMap::new(),
            uring: Ok(()),
            cpus: Some(8),
        }
    }

    #[test]
    fn tcp_memory_and_governor() {
        let mut host = tuned();
        assert_eq!(check_tcp_mem(&host).status, Status::Ok);
        assert_eq!(check_governor(&host).status, Status::Ok);
        host.files.insert(paths::TCP_MEM, "4000 5000 6000\n");
        host.files.insert(paths::GOVERNOR, "powersave\n");
        let c = check_tcp_mem(&host);
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.fix.as_deref().is_some_and(|f| f.contains("262144")),
            "{c:?}"
        );
        assert_eq!(check_governor(&host).status, Status::Warn);
        host.files.insert(paths::TCP_MEM, "1 2\n");
        assert_eq!(check_tcp_mem(&host).value, Value::Null);
        host.files.remove(paths::GOVERNOR);
        assert_eq!(
            check_governor(&host).status,
            Status::Ok,
            "no cpufreq is fine"
        );
    }

    #[test]
    fn nofile_parsed_from_proc_limits() {
        assert_eq!(
            parse_nofile(LIMITS),
            Some((Limit::Value(1024), Limit::Value(1_048_576)))
        );
        assert_eq!(
            parse_nofile("Max open files  unlimited unlimited files"),
            Some((Limit::Unlimited, Limit::Unlimited))
        );
        assert_eq!(parse_nofile("Max cpu time 1 2 s"), None);
        assert_eq!(parse_nofile("Max open files  lots"), None);
    }

    #[test]
    fn numbers_ranges_and_choices() {
        assert_eq!(parse_u64(" 4096\n"), Some(4096));
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(port_range_width((32768, 60999)), 28232);
        assert_eq!(port_range_width((1024, 1024)), 1);
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("70000 80000"), None);
        assert_eq!(
            parse_bracketed_choice("always [madvise] never\n"),
            Some("madvise")
        );
        assert_eq!(
            parse_bracketed_choice("[always] madvise never"),
            Some("always")
        );
        assert_eq!(parse_bracketed_choice("always madvise never"), None);
    }

    #[test]
    fn tuned_host_is_all_ok() {
        let checks = run_checks(&tuned(), &Options::default());
        assert_eq!(checks.len(), 10);
        assert_eq!(warnings(&checks), 0, "{checks:#?}");
        let text = render_text(&checks);
        assert!(
            text.lines()
                .all(|l| l.starts_with("OK") || l.starts_with("psm-perf")),
            "{text}"
        );
        assert!(text.ends_with("psm-perf check: 10 OK, 0 WARN\n"), "{text}");
    }

    #[test]
    fn default_host_warns_with_fixes() {
        let mut host = tuned();
        host.files.insert(paths::LIMITS, LIMITS);
        host.files.insert(paths::SOMAXCONN, "128\n");
        host.files.insert(paths::PORT_RANGE, "60000 61000\n");
        host.files.insert(paths::THP, "[always] madvise never\n");
        host.files.insert(paths::RMEM_MAX, "212992\n");
        host.files.insert(paths::IO_URING_DISABLED, "2\n");
        host.uring = Err("Operation not permitted (os error 1)".into());
        let checks = run_checks(&host, &Options::default());
        let by = |n: &str| checks.iter().find(|c| c.name == n).cloned().expect(n);
        for name in [
            "io_uring",
            "nofile",
            "somaxconn",
            "ip_local_port_range",
            "transparent_hugepage",
            "rmem_max",
        ] {
            let c = by(name);
            assert_eq!(c.status, Status::Warn, "{c:?}");
            assert!(c.fix.is_some(), "{c:?}");
        }
        assert_eq!(by("wmem_max").status, Status::Ok);
        assert!(by("io_uring")
            .message
            .contains("kernel.io_uring_disabled = 2"));
        assert!(by("nofile")
            .fix
            .unwrap_or_default()
            .contains("ulimit -n 65536"));
        assert_eq!(by("nofile").value["soft"], json!(1024));
        assert_eq!(by("nofile").value["needed"], json!(65536));
        assert_eq!(by("ip_local_port_range").value["width"], json!(1001));
        let text = render_text(&checks);
        assert!(text.contains("WARN  somaxconn"), "{text}");
        assert!(
            text.contains("fix: sysctl -w net.core.somaxconn=4096"),
            "{text}"
        );
        let j = render_json(&checks);
        assert_eq!(j["warn"], json!(6));
        assert_eq!(j["ok"], json!(4));
        assert_eq!(j["checks"][2]["status"], json!("warn"));
        assert_eq!(j["checks"][4]["fix"], Value::Null, "an OK line has no fix");
    }

    #[test]
    fn unreadable_files_warn_without_failing() {
        let host = Fake {
            files: HashMap::from([(paths::SOMAXCONN, "many\n")]),
            procs: HashMap::new(),
            uring: Ok(()),
            cpus: None,
        };
        let checks = run_checks(&host, &Options::default());
        assert_eq!(warnings(&checks), 8, "all but io_uring and the governor");
        let nofile = &checks[1];
        assert!(nofile.message.contains(paths::LIMITS), "{nofile:?}");
        assert!(
            checks
                .iter()
                .filter(|c| c.status == Status::Warn)
                .all(|c| c.fix.is_some()),
            "every warning has its fix: {checks:#?}"
        );
        assert!(
            checks[2].message.contains("cannot make sense"),
            "{:?}",
            checks[2]
        );
        assert_eq!(checks[2].value, Value::Null);
    }

    #[test]
    fn open_files_are_sized_for_the_sessions_asked() {
        assert_eq!(nofile_needed(0), MIN_NOFILE);
        assert_eq!(nofile_needed(10_000), MIN_NOFILE);
        assert_eq!(nofile_needed(50_000), 101_024);
        let host = tuned();
        let c = check_nofile(&host, None, 50_000);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        let c = check_nofile(&host, None, 600_000);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.message.contains("600000 sessions need 1201024"), "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("nofile 1201024")),
            "the hard limit is below too: {c:?}"
        );
    }

    #[test]
    fn a_running_relay_is_checked_itself() {
        // the shell is tuned, the relay was started with 1024 open files
        let host = tuned().with_relay(&["0", "1"], "Max open files  1024  524288  files\n", 2);
        let relay = find_relay(&host).expect("relay");
        assert_eq!(relay.pid, 4242);
        assert_eq!(find_relay_pid(&host, Some(4242)), Some(relay.clone()));
        assert_eq!(
            find_relay_pid(&host, Some(1)),
            None,
            "pid 1 is no psm-relay"
        );
        assert_eq!(relay.workers, vec![vec![0], vec![1]]);
        let c = check_nofile(&host, Some(&relay), 10_000);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.message.contains("psm-relay (pid 4242)"), "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("ulimit -n 65536")),
            "{c:?}"
        );
        let u = check_io_uring(&host, Some(&relay));
        assert_eq!(u.status, Status::Ok, "{u:?}");
        assert_eq!(u.value["relay_rings"], json!(2));
        // 8 CPUs, 2 workers: 6 idle
        let w = check_workers(&host, Some(&relay));
        assert_eq!(w.status, Status::Warn, "{w:?}");
        assert!(w.message.contains("worker→CPU 0→0 1→1"), "{w:?}");
        assert!(w.message.contains("6 CPUs carry no worker"), "{w:?}");
        assert_eq!(
            w.fix.as_deref(),
            Some("psm up --workers 8, unless those CPUs are kept for other work")
        );
    }

    #[test]
    fn workers_against_cpus_and_their_pinning() {
        let check = |workers: &[&str], cpus: usize, rings: usize| {
            let mut host = tuned();
            host.cpus = Some(cpus);
            let host = host.with_relay(workers, "Max open files 65536 65536 files\n", rings);
            let relay = find_relay(&host).expect("relay");
            (
                check_workers(&host, Some(&relay)),
                check_io_uring(&host, Some(&relay)),
            )
        };
        let (w, u) = check(&["0", "1"], 2, 2);
        assert_eq!(
            (w.status, u.status),
            (Status::Ok, Status::Ok),
            "{w:?} {u:?}"
        );
        let (w, _) = check(&["0-1", "0-1"], 2, 2);
        assert_eq!(w.status, Status::Ok, "unpinned is a choice: {w:?}");
        assert!(w.message.contains("not pinned"), "{w:?}");
        let (w, _) = check(&["0", "1", "0", "1"], 2, 4);
        assert_eq!(w.status, Status::Warn, "{w:?}");
        assert!(w.message.contains("more workers than CPUs"), "{w:?}");
        assert_eq!(w.fix.as_deref(), Some("psm up --workers 2"));
        let (w, _) = check(&["3", "3", "1", "2"], 4, 4);
        assert!(
            w.message.contains("two workers are pinned to one CPU"),
            "{w:?}"
        );
        let (w, _) = check(&["0", "0-3", "2", "3"], 4, 4);
        assert!(w.message.contains("partly pinned"), "{w:?}");
        assert_eq!(w.status, Status::Warn);
        // one worker of four fell back to epoll (three rings)
        let (_, u) = check(&["0", "1", "2", "3"], 4, 3);
        assert_eq!(u.status, Status::Warn, "{u:?}");
        assert!(
            u.message
                .contains("3 io_uring instances for 4 workers: 1 of its workers fell back"),
            "{u:?}"
        );
        let (_, u) = check(&["0", "1", "2", "3"], 4, 4);
        assert_eq!(u.status, Status::Ok, "{u:?}");
        let (_, u) = check(&["0", "1"], 2, 0);
        assert_eq!(u.status, Status::Warn, "{u:?}");
        assert!(u.message.contains("run on epoll"), "{u:?}");
        assert_eq!(u.value["relay_rings"], json!(0));
        // no relay: the defaults, OK
        let host = tuned();
        assert_eq!(find_relay(&host), None);
        let w = check_workers(&host, None);
        assert_eq!(w.status, Status::Ok);
        assert!(w.message.contains("no psm-relay runs"), "{w:?}");
    }

    #[test]
    fn the_relays_own_cpus_and_descriptors_decide() {
        // a relay confined to 2 CPUs (its unit's AllowedCPUs), checked from a shell that sees 8
        let mut host = tuned();
        host.cpus = Some(2);
        let mut host = host.with_relay(&["0", "1"], "Max open files 65536 65536 files\n", 4);
        host.cpus = Some(8);
        let relay = find_relay(&host).expect("relay");
        assert_eq!(relay.cpus, Some(2));
        let w = check_workers(&host, Some(&relay));
        assert_eq!(w.status, Status::Ok, "{w:?}");
        assert!(w.message.contains("2 workers on 2 CPUs"), "{w:?}");
        // this shell cannot set up a ring, the relay holds its own: OK, said
        host.uring = Err("Operation not permitted (os error 1)".into());
        let u = check_io_uring(&host, Some(&relay));
        assert_eq!(u.status, Status::Ok, "{u:?}");
        assert!(u.message.contains("this shell cannot set one up"), "{u:?}");
        assert_eq!(u.value["available"], json!(false));
        // its descriptors cannot be listed (another user's process): said, not guessed
        host.uring = Ok(());
        host.procs.retain(|k, _| !k.starts_with("/proc/4242/fd/"));
        let u = check_io_uring(&host, Some(&relay));
        assert_eq!(u.status, Status::Warn, "{u:?}");
        assert!(u.message.contains("cannot list /proc/4242/fd"), "{u:?}");
        assert_eq!(u.value["relay_rings"], Value::Null);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list(""), None);
    }

    #[test]
    fn real_host_checks_run() {
        let checks = run_checks(&RealHost, &Options::default());
        assert_eq!(checks.len(), 10);
        assert!(checks.iter().all(|c| !c.message.is_empty()));
    }
}
