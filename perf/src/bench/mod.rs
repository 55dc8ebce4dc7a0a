//! `psm-perf bench`: the same workloads, in one invocation on one machine, directly to a target,
//! through psm (`psm up`, recording on) and through an OpenSSH jump host (ProxyJump), as one
//! table of figures and ratios (`--json` for the raw figures). The target is psm-perf's own light
//! SSH server (`bench-target`): a stock sshd's fork and shell per connection would be the
//! bottleneck of session setup. The client is russh (in this process). `--quick` runs every
//! path with small sizes and checks only that each works.

mod client;
mod openssh;
mod procs;
pub mod target;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;
use serde_json::{json, Value};

use client::Dest;
use procs::{cpu_seconds, Proc};

/// What `psm-perf bench` runs.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Small sizes; checks that every path works (CI).
    pub quick: bool,
    /// Where psm, psmctl and the daemons are (default: beside psm-perf).
    pub bin: Option<PathBuf>,
    /// MiB per bulk transfer.
    pub mib: u64,
    /// Idle sessions held through psm at once.
    pub idle: usize,
    /// Keep the work directory (logs, psm's data) at the end.
    pub keep: bool,
    /// Relay workers (`psm up --workers`; default: one per CPU).
    pub workers: Option<usize>,
    /// Only these workloads (`bulk`, `sessions`, `echo`, `idle`, `tcp`); empty: all.
    pub only: Vec<String>,
    /// Bulk transfers: rounds of every route, each figure the median of its rounds.
    pub repeat: usize,
}

impl Opts {
    fn runs(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }
}

/// One line of the table: a workload's figure on each route, or why it failed there.
struct Row {
    workload: String,
    unit: &'static str,
    /// Higher is better (throughput) or lower (latency, CPU).
    higher_better: bool,
    values: BTreeMap<&'static str, Result<f64, String>>,
}

impl Row {
    fn new(workload: impl Into<String>, unit: &'static str, higher_better: bool) -> Row {
        Row {
            workload: workload.into(),
            unit,
            higher_better,
            values: BTreeMap::new(),
        }
    }
    /// Sets the figure of `route`, and says it on stderr at once: a run stopped at its time
    /// limit has still told what it measured.
    fn set(&mut self, route: &'static str, v: anyhow::Result<f64>) {
        let v = v.map_err(|e| format!("{e:#}"));
        match &v {
            Ok(x) => eprintln!(
                "bench:   {} via {route}: {x:.3} {}",
                self.workload, self.unit
            ),
            Err(e) => eprintln!("bench:   {} via {route}: FAILED {e}", self.workload),
        }
        self.values.insert(route, v);
    }
    fn get(&self, route: &str) -> Option<f64> {
        self.values
            .get(route)
            .and_then(|v| v.as_ref().ok().copied())
    }
}

/// Sets a transfer's two figures on `route`: MB/s in `tput` and CPU-seconds per GiB in `cpu`,
/// from the seconds it took moving `bytes` and the CPU-seconds spent (or why it failed, in both).
fn set_transfer(
    tput: &mut Row,
    cpu: &mut Row,
    route: &'static str,
    bytes: u64,
    r: anyhow::Result<(f64, f64)>,
) {
    set_medians(tput, cpu, route, vec![transfer_figures(bytes, r)]);
}

/// A transfer's MB/s and CPU-seconds per GiB, from the seconds it took moving `bytes` and the
/// CPU-seconds spent.
fn transfer_figures(bytes: u64, r: anyhow::Result<(f64, f64)>) -> anyhow::Result<(f64, f64)> {
    r.map(|(secs, spent)| {
        (
            mbps(bytes, secs),
            spent / (bytes as f64 / (1u64 << 30) as f64),
        )
    })
}

/// Sets `route`'s MB/s in `tput` and CPU-seconds per GiB in `cpu`: each the median of the
/// rounds' figures (`rounds`: one per round), or the first round's failure when one failed.
fn set_medians(
    tput: &mut Row,
    cpu: &mut Row,
    route: &'static str,
    rounds: Vec<anyhow::Result<(f64, f64)>>,
) {
    match rounds.into_iter().collect::<anyhow::Result<Vec<_>>>() {
        Ok(figures) => {
            tput.set(route, Ok(median(figures.iter().map(|f| f.0).collect())));
            cpu.set(route, Ok(median(figures.iter().map(|f| f.1).collect())));
        }
        Err(e) => {
            cpu.set(route, Err(anyhow::anyhow!("{e:#}")));
            tput.set(route, Err(e));
        }
    }
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn write_key(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    use std::io::Write as _;
    let pem = key.to_openssh(LineEnding::LF)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(pem.as_bytes())?;
    std::fs::write(
        path.with_extension("pub"),
        format!("{}\n", key.public_key().to_openssh()?),
    )?;
    Ok(())
}

fn new_key() -> anyhow::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| anyhow::anyhow!("system random source failed"))?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

/// `f`, or an error once it has taken [`client::STEP`].
async fn bounded<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(client::STEP, f)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {:?}", client::STEP)))
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// The bench's processes and addresses.
struct World {
    dir: PathBuf,
    key: Arc<PrivateKey>,
    direct: Dest,
    psm: Dest,
    /// The same psm, under an `--unrecorded` grant.
    psm_norec: Dest,
    jump: Option<Dest>,
    psm_pids: Vec<(u32, String)>,
    target_pid: u32,
    jump_pid: Option<u32>,
    /// The OpenSSH client straight to the jump host's sshd (bulk only).
    openssh: Option<openssh::OpenSsh>,
    tcp_sink: SocketAddr,
    psm_tcp: SocketAddr,
    _procs: Vec<Proc>,
    notes: Vec<String>,
}

fn setup(o: &Opts, dir: &Path) -> anyhow::Result<World> {
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("psm-perf's folder")?
            .to_path_buf(),
    };
    for b in ["psm", "psmctl", "psm-relay", "psm-control", "psm-recorder"] {
        if !bin.join(b).exists() {
            bail!(
                "{} missing (build the workspace's binaries, or give --bin DIR)",
                bin.join(b).display()
            );
        }
    }
    let user_key = new_key()?;
    let key_path = dir.join("bench_key");
    write_key(&key_path, &user_key)?;
    let host_path = dir.join("target_host_key");
    let host_key = new_key()?;
    write_key(&host_path, &host_key)?;
    let pub_path = key_path.with_extension("pub");
    let (target, ssh_addr, tcp_sink) = procs::start_target(dir, &host_path, &pub_path)?;
    let mut procs_held = vec![target];
    let target_pid = procs_held[0].0.id();

    let data = dir.join("psm-data");
    let psm_addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    procs_held.push(procs::start_psm(&bin, &data, psm_addr, o.workers)?);
    let ctl = |args: &[&str]| procs::psmctl(&bin, &data, args);
    ctl(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        &pub_path.display().to_string(),
    ])?;
    let host_pub = host_key.public_key().to_openssh()?;
    ctl(&[
        "target",
        "add",
        "bench",
        "--address",
        &ssh_addr.to_string(),
        "--host-key",
        &host_pub,
    ])?;
    ctl(&[
        "account",
        "add",
        "bench@bench",
        "--private-key",
        &key_path.display().to_string(),
    ])?;
    ctl(&["grant", "add", "alice", "bench@bench"])?;
    // the same psm with recording off: a second user under a grant that says so
    ctl(&[
        "user",
        "add",
        "bob",
        "--ssh-key",
        &pub_path.display().to_string(),
    ])?;
    ctl(&["grant", "add", "bob", "bench@bench", "--unrecorded"])?;
    let psm_tcp: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    ctl(&[
        "target",
        "add",
        "sink",
        "--protocol",
        "tcp",
        "--address",
        &tcp_sink.to_string(),
        "--listen",
        &psm_tcp.to_string(),
    ])?;
    ctl(&["grant", "add", "alice", "tcp@sink", "--unrecorded-tcp"])?;
    procs::wait_until("psm's tcp port", Duration::from_secs(20), || {
        std::net::TcpStream::connect_timeout(&psm_tcp, Duration::from_millis(300)).is_ok()
    })?;
    // psm up hands its daemons the canonical path of the data directory
    let data_path = std::fs::canonicalize(&data).unwrap_or(data.clone());
    let psm_pids: Vec<(u32, String)> = procs::pids_mentioning(&data_path.display().to_string())
        .into_iter()
        .filter(|(_, n)| n.starts_with("psm"))
        .collect();
    for d in ["psm-relay", "psm-control", "psm-recorder"] {
        if !psm_pids.iter().any(|(_, n)| n == d) {
            bail!("{d} of the psm under test not found among its processes: {psm_pids:?}");
        }
    }

    let mut notes = vec![
        "target: psm-perf's light SSH server (one process, no fork or shell per connection)".into(),
        "client: russh in psm-perf; psm: recording on (as every grant is by default); psm-norec: the same psm under a grant with --unrecorded (bulk and echo)".into(),
    ];
    let user = procs::user_name()?;
    let (jump, jump_pid, openssh) = match procs::sshd() {
        Some(sshd) => {
            let jump_key = dir.join("jump_host_key");
            write_key(&jump_key, &new_key()?)?;
            let port = procs::free_port()?;
            match procs::start_jump(&sshd, dir, port, &jump_key, &pub_path) {
                Ok(p) => {
                    let pid = p.0.id();
                    procs_held.push(p);
                    notes.push("openssh: the OpenSSH client and the jump host's sshd straight to each other, bulk up and down (`cat > /dev/null`, `head -c`; their CPU includes that command's)".into());
                    (
                        Some(Dest {
                            addr: ssh_addr,
                            user: "bench".into(),
                            jump: Some((format!("127.0.0.1:{port}").parse()?, user.clone())),
                        }),
                        Some(pid),
                        Some(openssh::OpenSsh {
                            port,
                            user,
                            key: key_path.clone(),
                            sshd_pid: pid,
                        }),
                    )
                }
                Err(e) => {
                    notes.push(format!(
                        "jump: the jump host did not start ({e:#}); the ProxyJump and OpenSSH routes are skipped"
                    ));
                    (None, None, None)
                }
            }
        }
        None => {
            notes.push(
                "jump: no sshd on this machine; the ProxyJump and OpenSSH routes are skipped"
                    .into(),
            );
            (None, None, None)
        }
    };
    Ok(World {
        dir: dir.to_path_buf(),
        key: Arc::new(user_key),
        direct: Dest {
            addr: ssh_addr,
            user: "bench".into(),
            jump: None,
        },
        psm: Dest {
            addr: psm_addr,
            user: "alice@bench@bench".into(),
            jump: None,
        },
        psm_norec: Dest {
            addr: psm_addr,
            user: "bob@bench@bench".into(),
            jump: None,
        },
        jump,
        psm_pids,
        target_pid,
        jump_pid,
        openssh,
        tcp_sink,
        psm_tcp,
        _procs: procs_held,
        notes,
    })
}

impl World {
    fn routes(&self) -> Vec<(&'static str, &Dest)> {
        let mut r = vec![("direct", &self.direct), ("psm", &self.psm)];
        if let Some(j) = &self.jump {
            r.push(("jump", j));
        }
        r
    }

    /// [`routes`](Self::routes) and psm with recording off (bulk and echo).
    fn with_norec(&self) -> Vec<(&'static str, &Dest)> {
        let mut r = self.routes();
        r.insert(2, ("psm-norec", &self.psm_norec));
        r
    }

    /// The CPU-seconds so far of the processes that do a route's work: the client and the
    /// target for direct, psm's daemons, the jump host's sshd (with its reaped children).
    fn cpu(&self, route: &str) -> f64 {
        match route {
            "direct" => cpu_seconds(std::process::id()) + cpu_seconds(self.target_pid),
            "psm" | "psm-norec" => self.psm_pids.iter().map(|(p, _)| cpu_seconds(*p)).sum(),
            "jump" => self.jump_pid.map(procs::tree_cpu_seconds).unwrap_or(0.0),
            _ => 0.0,
        }
    }

    fn relay_pid(&self) -> Option<u32> {
        self.psm_pids
            .iter()
            .find(|(_, n)| n == "psm-relay")
            .map(|(p, _)| *p)
    }
}

async fn bulk(w: &World, o: &Opts, rows: &mut Vec<Row>) {
    let n = o.mib << 20;
    for (cipher, cname, ossh_cipher) in [
        (
            russh::cipher::AES_128_GCM,
            "aes128-gcm",
            "aes128-gcm@openssh.com",
        ),
        (
            russh::cipher::CHACHA20_POLY1305,
            "chacha20-poly1305",
            "chacha20-poly1305@openssh.com",
        ),
    ] {
        let cfg = client::config(cipher);
        for what in ["up", "down", "both"] {
            let mut tput = Row::new(format!("{what} {cname}"), "MB/s", true);
            let mut cpu = Row::new(format!("{what} {cname} CPU"), "CPU-s/GiB", false);
            // every route once a round, so that each route's rounds spread over the same span
            // of the machine's load
            let mut rounds: BTreeMap<&'static str, Vec<anyhow::Result<(f64, f64)>>> =
                BTreeMap::new();
            for round in 1..=o.repeat {
                let of = if o.repeat > 1 {
                    format!(" (round {round} of {})", o.repeat)
                } else {
                    String::new()
                };
                for (route, d) in w.with_norec() {
                    eprintln!("bench: {what} {cname} via {route}{of}");
                    let before = w.cpu(route);
                    let r = async {
                        if what == "both" {
                            return client::both(d, &w.key, &cfg, n).await;
                        }
                        let h = client::connect(d, &w.key, &cfg).await?;
                        let secs = match what {
                            "up" => client::upload(&h, n).await?,
                            _ => client::download(&h, n).await?,
                        };
                        let _ = h
                            .disconnect(russh::Disconnect::ByApplication, "", "en")
                            .await;
                        anyhow::Ok(secs)
                    };
                    let r = tokio::time::timeout(client::STEP, r)
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
                    // let the jump host reap its connection's process before its CPU is read
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let moved = if what == "both" { 2 * n } else { n };
                    let spent = w.cpu(route) - before;
                    let figures = transfer_figures(moved, r.map(|s| (s, spent)));
                    if let (Ok((mbs, cpu)), true) = (&figures, o.repeat > 1) {
                        eprintln!("bench:   {what} {cname} via {route}{of}: {mbs:.0} MB/s, {cpu:.3} CPU-s/GiB");
                    }
                    rounds.entry(route).or_default().push(figures);
                }
                if let (Some(s), true) = (&w.openssh, what != "both") {
                    eprintln!("bench: {what} {cname} via openssh{of}");
                    let (s, up) = (s.clone(), what == "up");
                    let r = tokio::task::spawn_blocking(move || {
                        openssh::transfer(&s, ossh_cipher, up, n, client::STEP)
                    })
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
                    rounds
                        .entry("openssh")
                        .or_default()
                        .push(transfer_figures(n, r));
                }
            }
            for (route, figures) in rounds {
                set_medians(&mut tput, &mut cpu, route, figures);
            }
            rows.push(tput);
            rows.push(cpu);
        }
    }
}

async fn sessions(w: &World, o: &Opts, rows: &mut Vec<Row>) {
    let cfg = client::config(russh::cipher::AES_128_GCM);
    let (seq_n, conc, span) = if o.quick {
        (5usize, 4usize, Duration::from_millis(500))
    } else {
        // enough at once to keep both cores busy: with 10 a fifth of the CPU stayed idle,
        // each session waiting on the next hop's reply rather than on a core
        (200, 32, Duration::from_secs(5))
    };
    let mut seq = Row::new("sessions sequential", "/s", true);
    let mut par = Row::new(format!("sessions {conc} at once"), "/s", true);
    for (route, d) in w.routes() {
        eprintln!("bench: sessions via {route}");
        let r = async {
            let start = Instant::now();
            for _ in 0..seq_n {
                client::session(d, &w.key, &cfg).await?;
            }
            anyhow::Ok(seq_n as f64 / start.elapsed().as_secs_f64())
        };
        seq.set(
            route,
            tokio::time::timeout(client::STEP, r)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out"))),
        );
        let start = Instant::now();
        let tasks: Vec<_> = (0..conc)
            .map(|_| {
                let (d, key, cfg) = (d.clone(), w.key.clone(), cfg.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    // at least one each; then as many as fit in the span
                    loop {
                        client::session(&d, &key, &cfg).await?;
                        n += 1;
                        if start.elapsed() >= span {
                            return anyhow::Ok(n);
                        }
                    }
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + client::STEP;
        let mut total = Ok(0u64);
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        for t in tasks {
            let r = tokio::time::timeout_at(deadline, t).await;
            total = match (total, r) {
                (Ok(s), Ok(Ok(Ok(n)))) => Ok(s + n),
                (Err(e), _) => Err(e),
                (_, Ok(Ok(Err(e)))) => Err(e),
                (_, Ok(Err(e))) => Err(anyhow::anyhow!("task: {e}")),
                (_, Err(_)) => Err(anyhow::anyhow!("timed out")),
            };
        }
        // none keeps opening sessions past the step
        aborts.iter().for_each(|a| a.abort());
        par.set(
            route,
            total.map(|n| n as f64 / start.elapsed().as_secs_f64()),
        );
    }
    rows.push(seq);
    rows.push(par);
}

async fn echo(w: &World, o: &Opts, rows: &mut Vec<Row>) {
    let cfg = client::config(russh::cipher::AES_128_GCM);
    let probes = if o.quick { 50 } else { 2000 };
    let mut p = [
        Row::new("echo p50", "µs", false),
        Row::new("echo p99", "µs", false),
        Row::new("echo p999", "µs", false),
    ];
    for (route, d) in w.with_norec() {
        eprintln!("bench: echo via {route}");
        let r = async {
            let h = client::connect(d, &w.key, &cfg).await?;
            let mut e = client::Echo::open(&h).await?;
            for _ in 0..10 {
                e.probe().await?;
            }
            let mut t = Vec::with_capacity(probes);
            for _ in 0..probes {
                t.push(e.probe().await?);
            }
            t.sort();
            anyhow::Ok(t)
        };
        match tokio::time::timeout(client::STEP, r)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
        {
            Ok(t) => {
                for (row, q) in p.iter_mut().zip([0.5, 0.99, 0.999]) {
                    row.set(route, Ok(percentile(&t, q)));
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for row in &mut p {
                    row.set(route, Err(anyhow::anyhow!("{msg}")));
                }
            }
        }
    }
    rows.extend(p);
}

async fn idle(w: &World, o: &Opts, rows: &mut Vec<Row>) {
    let cfg = client::config(russh::cipher::AES_128_GCM);
    let n = if o.quick { 20 } else { o.idle };
    let mut mem = Row::new(format!("idle {n}: relay memory per session"), "KiB", false);
    let mut worst = Row::new(format!("idle {n}: slowest echo"), "µs", false);
    let relay = w.relay_pid();
    if relay.is_none() {
        let e = "psm-relay not found";
        mem.set("psm", Err(anyhow::anyhow!(e)));
        worst.set("psm", Err(anyhow::anyhow!(e)));
        rows.push(mem);
        rows.push(worst);
        return;
    }
    // each session holds two descriptors in the relay (its user's connection and its
    // target's): past its limit, accept fails and the sessions would only time out
    let need = 2 * n as u64;
    if let Some(left) = relay
        .and_then(procs::descriptors_left)
        .filter(|l| *l < need)
    {
        let e = format!(
            "{n} idle sessions need {need} descriptors in psm-relay and it may open {left} more \
             (its `ulimit -n`; `psm-perf check` says how to raise it)"
        );
        mem.set("psm", Err(anyhow::anyhow!("{e}")));
        worst.set("psm", Err(anyhow::anyhow!(e)));
        rows.push(mem);
        rows.push(worst);
        return;
    }
    eprintln!("bench: {n} idle sessions via psm");
    let r = async {
        let before = relay.map(procs::rss_kib).unwrap_or(0);
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let h = client::connect(&w.psm, &w.key, &cfg).await?;
            let e = client::Echo::open(&h).await?;
            held.push((h, e));
        }
        let after = relay.map(procs::rss_kib).unwrap_or(0);
        let mut slowest = Duration::ZERO;
        for (_, e) in &mut held {
            slowest = slowest.max(e.probe().await?);
        }
        anyhow::Ok((
            after.saturating_sub(before) as f64 / n as f64,
            slowest.as_secs_f64() * 1e6,
        ))
    };
    match tokio::time::timeout(client::STEP * 2, r)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
    {
        Ok((kib, us)) => {
            mem.set("psm", Ok(kib));
            worst.set("psm", Ok(us));
        }
        Err(e) => {
            let msg = format!("{e:#}");
            mem.set("psm", Err(anyhow::anyhow!("{msg}")));
            worst.set("psm", Err(e));
        }
    }
    rows.push(mem);
    rows.push(worst);
}

async fn tcp(w: &World, o: &Opts, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let cfg = client::config(russh::cipher::AES_128_GCM);
    let n = if o.quick {
        16u64 << 20
    } else {
        (o.mib * 4) << 20
    };
    let mut tput = Row::new("tcp pass-through", "MB/s", true);
    let mut cpu = Row::new("tcp pass-through forwarder CPU", "CPU-s/GiB", false);
    eprintln!("bench: tcp pass-through");
    tput.set(
        "direct",
        bounded(client::tcp_upload(w.tcp_sink, n))
            .await
            .map(|s| mbps(n, s)),
    );
    let lease_dest = Dest {
        user: "alice@tcp@sink".into(),
        ..w.psm.clone()
    };
    let lease = tokio::time::timeout(
        Duration::from_secs(30),
        client::lease(&lease_dest, &w.key, &cfg),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no lease within 30 s")));
    match lease {
        Ok(_held) => {
            let before = w.cpu("psm");
            let r = bounded(client::tcp_upload(w.psm_tcp, n)).await;
            let spent = w.cpu("psm") - before;
            set_transfer(&mut tput, &mut cpu, "psm", n, r.map(|s| (s, spent)));
        }
        Err(e) => set_transfer(&mut tput, &mut cpu, "psm", n, Err(e)),
    }
    let port = match procs::free_port() {
        Ok(p) => p,
        Err(e) => {
            tput.set("socat", Err(e));
            rows.extend([tput, cpu]);
            return;
        }
    };
    match procs::start_socat(port, w.tcp_sink) {
        Ok(Some(p)) => {
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let r = bounded(client::tcp_upload(addr, n)).await;
            // socat exits after its one connection: its CPU is read before it is reaped
            let _ = procs::wait_until("socat to finish", Duration::from_secs(10), || {
                std::fs::read_to_string(format!("/proc/{}/stat", p.0.id()))
                    .map(|s| {
                        s.rsplit_once(')')
                            .map(|(_, r)| r.trim_start().starts_with('Z'))
                            .unwrap_or(true)
                    })
                    .unwrap_or(true)
            });
            let spent = cpu_seconds(p.0.id());
            set_transfer(&mut tput, &mut cpu, "socat", n, r.map(|s| (s, spent)));
        }
        Ok(None) => {
            notes.push("tcp: socat is not installed; pass-through is not compared with it".into())
        }
        Err(e) => tput.set("socat", Err(e)),
    }
    rows.extend([tput, cpu]);
}

fn fmt(v: Option<&Result<f64, String>>) -> String {
    match v {
        None => "-".into(),
        Some(Err(_)) => "FAILED".into(),
        Some(Ok(x)) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(Ok(x)) => format!("{x:.3}"),
    }
}

fn ratio(row: &Row, a: &str, b: &str) -> String {
    match (row.get(a), row.get(b)) {
        (Some(x), Some(y)) if y != 0.0 => format!("{:.2}x", x / y),
        _ => "-".into(),
    }
}

fn render(rows: &[Row], notes: &[String]) -> String {
    let mut out = format!(
        "{:<44} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}\n",
        "workload",
        "direct",
        "psm",
        "psm-norec",
        "jump",
        "openssh",
        "socat",
        "psm/direct",
        "psm/other",
        "psm/openssh",
        "psm/norec"
    );
    for r in rows {
        let other = if r.values.contains_key("socat") {
            "socat"
        } else {
            "jump"
        };
        out.push_str(&format!(
            "{:<44} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}\n",
            format!("{} ({})", r.workload, r.unit),
            fmt(r.values.get("direct")),
            fmt(r.values.get("psm")),
            fmt(r.values.get("psm-norec")),
            fmt(r.values.get("jump")),
            fmt(r.values.get("openssh")),
            fmt(r.values.get("socat")),
            ratio(r, "psm", "direct"),
            ratio(r, "psm", other),
            ratio(r, "psm", "openssh"),
            ratio(r, "psm", "psm-norec"),
        ));
    }
    for r in rows {
        for (route, v) in &r.values {
            if let Err(e) = v {
                out.push_str(&format!("FAILED {} on {route}: {e}\n", r.workload));
            }
        }
    }
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

fn to_json(rows: &[Row], notes: &[String], o: &Opts) -> Value {
    json!({
        "quick": o.quick,
        "mib": o.mib,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rows": rows.iter().map(|r| {
            let mut m = serde_json::Map::new();
            m.insert("workload".into(), json!(r.workload));
            m.insert("unit".into(), json!(r.unit));
            m.insert("higher_better".into(), json!(r.higher_better));
            for (route, v) in &r.values {
                m.insert((*route).into(), match v {
                    Ok(x) => json!(x),
                    Err(e) => json!({ "error": e }),
                });
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "notes": notes,
    })
}

/// Aggregate throughput through psm with `workers` relay workers: `2 × workers` uploads of
/// `o.mib` MiB at once, each on its own connection; MB/s.
async fn scaled(w: &World, o: &Opts, streams: usize) -> anyhow::Result<f64> {
    let cfg = client::config(russh::cipher::AES_128_GCM);
    let n = o.mib << 20;
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        conns.push(client::connect(&w.psm, &w.key, &cfg).await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(async move { client::upload(&c, n).await }))
        .collect();
    for t in tasks {
        tokio::time::timeout(client::STEP * 2, t)
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))???;
    }
    Ok(mbps(n * streams as u64, start.elapsed().as_secs_f64()))
}

/// The scaling run: for each worker count, psm started afresh with that many relay workers and
/// `2 × N` uploads at once; prints MB/s, per worker, and the efficiency: MB/s per worker against
/// the first count's (give `1` first for the efficiency against one worker).
pub fn scaling(o: &Opts, counts: &[usize], client_threads: usize) -> anyhow::Result<()> {
    let mut one = None;
    println!(
        "{:>8} {:>8} {:>10} {:>12} {:>11} {:>14} {:>14}",
        "workers",
        "streams",
        "MB/s",
        "MB/s/worker",
        "efficiency",
        "relay CPU-s/GiB",
        "recorder CPU-s/GiB"
    );
    for &n in counts {
        let dir = std::env::temp_dir().join(format!("psm-perf-bench.{}.{n}", std::process::id()));
        std::fs::create_dir(&dir)?;
        let opts = Opts {
            workers: Some(n),
            ..o.clone()
        };
        let world = setup(&opts, &dir)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(client_threads)
            .enable_all()
            .build()?;
        let streams = 2 * n;
        let of = |name: &str| -> f64 {
            world
                .psm_pids
                .iter()
                .filter(|(_, p)| p == name)
                .map(|(pid, _)| cpu_seconds(*pid))
                .sum()
        };
        let before = (of("psm-relay"), of("psm-recorder"));
        let r = rt.block_on(scaled(&world, &opts, streams));
        let gib = (opts.mib * streams as u64) as f64 / 1024.0;
        let cpu = (
            (of("psm-relay") - before.0) / gib,
            (of("psm-recorder") - before.1) / gib,
        );
        drop(rt);
        drop(world);
        if !o.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let mb = r.with_context(|| format!("{n} workers"))?;
        let base = *one.get_or_insert(mb / n as f64);
        println!(
            "{n:>8} {streams:>8} {mb:>10.0} {:>12.0} {:>10.2}x {:>14.2} {:>14.2}",
            mb / n as f64,
            mb / (base * n as f64),
            cpu.0,
            cpu.1
        );
    }
    Ok(())
}

/// Runs the bench; prints the table (or JSON) on stdout. Fails when any path failed.
pub fn run(o: &Opts, json_out: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("psm-perf-bench.{}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| {
        let world = setup(o, &dir)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut rows = Vec::new();
        let mut notes = world.notes.clone();
        if o.repeat > 1 && o.runs("bulk") {
            notes.push(format!(
                "bulk: each figure is the median of {} rounds (every route once a round)",
                o.repeat
            ));
        }
        rt.block_on(async {
            if o.runs("bulk") {
                bulk(&world, o, &mut rows).await;
            }
            if o.runs("sessions") {
                sessions(&world, o, &mut rows).await;
            }
            if o.runs("echo") {
                echo(&world, o, &mut rows).await;
            }
            if o.runs("idle") {
                idle(&world, o, &mut rows).await;
            }
            if o.runs("tcp") {
                tcp(&world, o, &mut rows, &mut notes).await;
            }
        });
        drop(rt);
        let retries = client::JUMP_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
        if retries > 0 {
            notes.push(format!("jump: {retries} stalled handshakes through the jump host were tried again (10 s each, not in the figures' sessions but in their time)"));
        }
        let failed = rows
            .iter()
            .flat_map(|r| r.values.values())
            .filter(|v| v.is_err())
            .count();
        let text = if json_out {
            serde_json::to_string_pretty(&to_json(&rows, &notes, o))? + "\n"
        } else {
            render(&rows, &notes)
        };
        print!("{text}");
        if failed > 0 {
            bail!("{failed} paths failed (logs in {})", world.dir.display());
        }
        anyhow::Ok(())
    })();
    if !(o.keep || result.is_err()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![900.0, 500.0, 700.0]), 700.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![605.0]), 605.0);
        assert!(median(Vec::new()).is_nan());
    }

    /// The rounds of one route: the median of each figure, taken apart (the fastest round need
    /// not be the cheapest), or the failure when a round failed.
    #[test]
    fn a_route_gets_each_figures_median_or_its_failure() {
        let mut tput = Row::new("up aes128-gcm", "MB/s", true);
        let mut cpu = Row::new("up aes128-gcm CPU", "CPU-s/GiB", false);
        set_medians(
            &mut tput,
            &mut cpu,
            "psm",
            vec![Ok((1000.0, 0.9)), Ok((1200.0, 0.8)), Ok((1100.0, 1.0))],
        );
        assert_eq!(tput.values["psm"].as_ref().ok(), Some(&1100.0));
        assert_eq!(cpu.values["psm"].as_ref().ok(), Some(&0.9));
        set_medians(
            &mut tput,
            &mut cpu,
            "jump",
            vec![Ok((600.0, 0.5)), Err(anyhow::anyhow!("timed out"))],
        );
        assert!(tput.values["jump"]
            .as_ref()
            .is_err_and(|e| e.contains("timed out")));
        assert!(cpu.values["jump"].is_err());
        // one transfer: the figures of that transfer
        set_transfer(&mut tput, &mut cpu, "direct", 1 << 30, Ok((1.0, 0.5)));
        assert_eq!(
            tput.values["direct"].as_ref().ok(),
            Some(&mbps(1 << 30, 1.0))
        );
        assert_eq!(cpu.values["direct"].as_ref().ok(), Some(&0.5));
    }
}
