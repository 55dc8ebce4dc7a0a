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
    let opts = PsmOpts {
        config: Some(format!("[relay]\nmetrics_listen = \"{addr}\"\n")),
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
