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
    // nothing listens without the setting; psm-perf says where it looked
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
