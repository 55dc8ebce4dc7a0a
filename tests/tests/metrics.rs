//! The relay's counters: served per worker in the Prometheus text format where `[relay]
//! metrics_listen` asks for it, and shown by `psm-perf stats`.

use std::process::Command;
use std::time::Duration;

use psm_tests::*;

fn value(samples: &[psm_metrics::Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

#[test]
fn relay_counters_are_served_per_worker_and_psm_perf_stats_shows_them() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let control = format!("127.0.0.1:{}", free_port());
    let recorder = format!("127.0.0.1:{}", free_port());
    let opts = PsmOpts {
        config: Some(format!(
            "[relay]\nmetrics_listen = \"{addr}\"\n[control]\nmetrics_listen = \"{control}\"\n\
             [recorder]\nmetrics_listen = \"{recorder}\"\n"
        )),
        ..PsmOpts::default()
    };
    let w = World::build_opts(PsmMode::Up, Sshd::start(), opts);
    let sock = addr.parse().expect("addr");
    let before = psm_metrics::parse(
        &psm_metrics::fetch(sock, Duration::from_secs(5)).expect("the relay serves counters"),
    );
    // one sample per worker (psm up --workers 2 in tests)
    let live: Vec<_> = before
        .iter()
        .filter(|s| s.name == "psm_relay_sessions_live")
        .collect();
    assert_eq!(
        live.len(),
        WORKERS.parse::<usize>().expect("workers"),
        "{before:?}"
    );
    // a session moves 1 MiB up and a known reply down
    let payload = vec![b'x'; 1 << 20];
    let out = run_cmd(
        w.ssh().arg("wc -c"),
        Some(&payload),
        Duration::from_secs(60),
    );
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout_str().contains("1048576"), "{}", out.describe());
    // counters follow the session (its end is counted when its records are written)
    let mut after = Vec::new();
    let counted = wait_for(Duration::from_secs(10), || {
        after = psm_metrics::parse(
            &psm_metrics::fetch(sock, Duration::from_secs(5)).unwrap_or_default(),
        );
        value(&after, "psm_relay_sessions_ended_total")
            > value(&before, "psm_relay_sessions_ended_total")
    });
    assert!(counted, "{after:?}");
    let up = value(&after, "psm_relay_bytes_up_total") - value(&before, "psm_relay_bytes_up_total");
    assert!(up >= (1 << 20) as f64, "bytes up {up}");
    assert!(
        value(&after, "psm_relay_sessions_started_total")
            > value(&before, "psm_relay_sessions_started_total")
    );
    assert_eq!(value(&after, "psm_relay_recorder_connected"), 1.0);
    // a session that ended as its user asked is no error; a target nobody answers for is one,
    // on the target's side
    let errors = |s: &[psm_metrics::Sample], side: &str| -> f64 {
        s.iter()
            .filter(|x| x.name == "psm_relay_errors_total" && x.label("side") == Some(side))
            .map(|x| x.value)
            .sum()
    };
    // (deltas: the harness's first logins may have met a recorder not yet linked)
    let errors_before = value(&before, "psm_relay_errors_total");
    assert_eq!(
        value(&after, "psm_relay_errors_total"),
        errors_before,
        "{after:?}"
    );
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "down01",
            "--address",
            &format!("127.0.0.1:{}", free_port()),
            "--host-key",
            w.sshd.host_key(),
        ],
        None,
    );
    let acct = format!("{TARGET_USER}@down01");
    w.psm.psmctl_ok(
        &["account", "add", &acct, "--password-stdin"],
        Some(&format!("{TARGET_PASSWORD}\n")),
    );
    w.psm.psmctl_ok(&["grant", "add", "alice", &acct], None);
    w.psm.wait_policy_applied();
    let out = run_ssh(
        w.ssh_as(&format!("alice@{acct}"), &w.alice_key)
            .arg("echo ran"),
    );
    assert!(!out.success(), "{}", out.describe());
    let mut now = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            now = psm_metrics::parse(
                &psm_metrics::fetch(sock, Duration::from_secs(5)).unwrap_or_default(),
            );
            errors(&now, "target") - errors(&before, "target") == 1.0
        }),
        "{now:?}"
    );
    assert_eq!(
        value(&now, "psm_relay_errors_total") - errors_before,
        1.0,
        "only the target's: {now:?}"
    );
    // psm-recorder and psm-control serve theirs the same way
    let scrape = |a: &str| {
        psm_metrics::parse(
            &psm_metrics::fetch(a.parse().expect("addr"), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{a}: {e}")),
        )
    };
    let rec = scrape(&recorder);
    assert!(value(&rec, "psm_recorder_links") >= 1.0, "{rec:?}");
    assert!(
        value(&rec, "psm_recorder_bytes_total") >= (1 << 20) as f64,
        "{rec:?}"
    );
    assert!(value(&rec, "psm_recorder_recordings_opened_total") >= 1.0);
    let ctl = scrape(&control);
    assert_eq!(value(&ctl, "psm_control_relays"), 1.0, "{ctl:?}");
    assert!(value(&ctl, "psm_control_policy_version") >= 1.0);
    assert!(value(&ctl, "psm_control_audit_events_total") >= 2.0);
    // psm-perf stats: one table, a row per worker and the total
    let out = run_cmd(
        Command::new(bin("psm-perf")).args([
            "stats",
            "--addr",
            &addr,
            "--once",
            "--interval",
            "0.2",
        ]),
        None,
        Duration::from_secs(30),
    );
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_str();
    assert!(
        text.contains("accepts/s") && text.contains("up MB/s"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("0 ")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("1 ")),
        "{text}"
    );
    assert!(text.contains("recorder connected"), "{text}");
    // where nothing serves counters, psm-perf says which setting turns them on
    let out = run_cmd(
        Command::new(bin("psm-perf")).args([
            "stats",
            "--addr",
            &format!("127.0.0.1:{}", free_port()),
            "--once",
        ]),
        None,
        Duration::from_secs(30),
    );
    assert!(!out.success());
    assert!(
        out.stderr_str().contains("metrics_listen"),
        "{}",
        out.describe()
    );
}

/// Connections are spread over the workers (`SO_REUSEPORT`): 200 connections in a row, each
/// worker takes a fair share, as its own counters show.
#[test]
fn accepts_are_spread_over_the_workers() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let opts = PsmOpts {
        relay_args: vec!["--metrics-listen".into(), addr.clone()],
        ..PsmOpts::default()
    };
    let w = World::build_opts(PsmMode::Separate, Sshd::start(), opts);
    let sock = addr.parse().expect("addr");
    let per_worker = || -> Vec<f64> {
        psm_metrics::parse(&psm_metrics::fetch(sock, Duration::from_secs(5)).unwrap_or_default())
            .iter()
            .filter(|s| s.name == "psm_relay_connections_total")
            .map(|s| s.value)
            .collect()
    };
    let before = per_worker();
    const N: usize = 200;
    for _ in 0..N {
        // a port scan's connection: accepted, then closed before the SSH banner
        let c = std::net::TcpStream::connect(("127.0.0.1", w.psm.port())).expect("connect");
        drop(c);
    }
    let mut after = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            after = per_worker();
            after.iter().sum::<f64>() - before.iter().sum::<f64>() >= N as f64
        }),
        "accepted {after:?} (before {before:?})"
    );
    let workers = WORKERS.parse::<usize>().expect("workers");
    assert_eq!(after.len(), workers);
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        let share = (a - b) / N as f64;
        // a fair hash gives 1/workers each; binomial noise at N = 200 stays well inside this
        assert!(
            share >= 0.5 / workers as f64,
            "worker {i} took {:.0}% of {N} connections: {after:?}",
            share * 100.0
        );
    }
}

/// The CPUs listed in a `Cpus_allowed_list` line of /proc/…/status ("0-3,6").
fn cpus_allowed(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_default()
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().expect("cpu"), b.parse().expect("cpu"));
        cpus.extend(a..=b);
    }
    cpus
}

/// The TCP ports process `pid` listens on (one entry per listening socket: each worker of a
/// relay has its own), from /proc/net/tcp and tcp6.
fn tcp_listening(pid: u32) -> Vec<u16> {
    let inodes = socket_inodes(&pid.to_string());
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap_or("0");
                ports.push(u16::from_str_radix(port, 16).expect("port"));
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// psm-relay's worker threads (named `psm-worker-N`) and the CPUs each may run on.
fn worker_cpus(pid: u32) -> Vec<(String, Vec<usize>)> {
    let mut workers = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the relay's threads")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm.starts_with("psm-worker-") {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            workers.push((comm.to_string(), cpus_allowed(&status)));
        }
    }
    workers.sort();
    workers
}

/// By default each worker thread of a real relay runs on one CPU of the process's mask, a
/// different one for each while there are CPUs enough, and no psm process serves counters;
/// `--pin-workers false` leaves each worker the whole mask.
#[test]
fn by_default_each_worker_runs_on_a_cpu_of_its_own_and_no_counters_are_served() {
    let allowed = cpus_allowed(&std::fs::read_to_string("/proc/self/status").expect("status"));
    assert!(!allowed.is_empty(), "this process's CPUs");
    let workers = WORKERS.parse::<usize>().expect("workers");
    let w = World::build_opts(PsmMode::Separate, Sshd::start(), PsmOpts::default());
    let relay = w.psm.relay_pids()[0];
    let mut seen = Vec::new();
    // (each worker pins itself as its thread starts)
    let pinned = wait_for(Duration::from_secs(10), || {
        seen = worker_cpus(relay);
        seen.len() == workers && seen.iter().all(|(_, cpus)| cpus.len() == 1)
    });
    assert!(pinned, "the relay's workers run on {seen:?}");
    for (name, cpus) in &seen {
        assert!(
            allowed.contains(&cpus[0]),
            "{name} runs on {cpus:?}, outside {allowed:?}"
        );
    }
    // and no counters are served unless asked for: psm's processes listen on TCP only where
    // users come in
    let data = w.psm.data_dir().display().to_string();
    for name in ["psm-relay", "psm-control", "psm-recorder"] {
        let pids = pids_matching(&data, Some(name));
        assert!(!pids.is_empty(), "{name} runs");
        let ports: Vec<u16> = pids.iter().flat_map(|p| tcp_listening(*p)).collect();
        // the relay: its SSH and RDP listeners, one of each per worker
        let mut expected = Vec::new();
        if name == "psm-relay" {
            expected.extend(std::iter::repeat_n(w.psm.port(), workers));
            expected.extend(std::iter::repeat_n(w.psm.rdp_port(), workers));
            expected.sort_unstable();
        }
        assert_eq!(ports, expected, "{name} listens on TCP ports {ports:?}");
    }
    if allowed.len() >= workers {
        let mut distinct: Vec<usize> = seen.iter().map(|(_, c)| c[0]).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), workers, "two workers share a CPU: {seen:?}");
    }
    drop(w);

    let opts = PsmOpts {
        relay_args: vec!["--pin-workers".into(), "false".into()],
        ..PsmOpts::default()
    };
    let w = World::build_opts(PsmMode::Separate, Sshd::start(), opts);
    let relay = w.psm.relay_pids()[0];
    assert!(
        wait_for(Duration::from_secs(10), || {
            seen = worker_cpus(relay);
            seen.len() == workers
        }),
        "the relay's workers: {seen:?}"
    );
    for (name, cpus) in &seen {
        assert_eq!(cpus, &allowed, "{name} unpinned");
    }
}
