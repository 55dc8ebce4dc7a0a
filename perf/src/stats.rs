//! `psm-perf stats`: the running relay's counters per worker, refreshed like `top`, read from
//! its Prometheus endpoint (`[relay] metrics_listen`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use psm_metrics::Sample;

/// One worker's figures at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Worker {
    /// Sessions running now.
    pub live: f64,
    /// Connections accepted so far.
    pub connections: f64,
    /// Session bytes toward targets so far.
    pub up: f64,
    /// Session bytes toward users so far.
    pub down: f64,
    /// Failed authentications so far.
    pub auth_failures: f64,
    /// Pre-authentication failures, refused startups, and sessions ended or refused on a fault
    /// of the target, psm-recorder, psm-control or psm itself, so far.
    pub errors: f64,
    /// Recording frames queued toward the recorder link now.
    pub rec_queue: f64,
    /// Sessions stopped on a full durable window or a full recording queue now.
    pub paused: f64,
    /// Such pauses so far.
    pub pauses: f64,
    /// Recordings failed on a stalled psm-recorder so far.
    pub stalls: f64,
    /// Age of the oldest of its sessions' relayed bytes not yet confirmed durable, seconds.
    pub lag: f64,
}

/// A scrape: per worker, and the relay-wide levels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// By worker index.
    pub workers: BTreeMap<u32, Worker>,
    /// Connections not yet authenticated.
    pub unauthenticated: f64,
    /// psm-recorder connected.
    pub recorder_connected: bool,
    /// Age of the oldest relayed byte not yet confirmed durable, seconds.
    pub recording_lag: f64,
}

impl Scrape {
    /// Reads the relay's samples.
    pub fn from_samples(samples: &[Sample]) -> Scrape {
        let mut s = Scrape::default();
        for x in samples {
            match x.name.as_str() {
                "psm_relay_unauthenticated" => s.unauthenticated = x.value,
                "psm_relay_recorder_connected" => s.recorder_connected = x.value > 0.0,
                "psm_relay_recording_lag_seconds" => s.recording_lag = x.value,
                _ => {}
            }
            let Some(w) = x.label("worker").and_then(|w| w.parse::<u32>().ok()) else {
                continue;
            };
            let e = s.workers.entry(w).or_default();
            match x.name.as_str() {
                "psm_relay_sessions_live" => e.live = x.value,
                "psm_relay_connections_total" => e.connections = x.value,
                "psm_relay_bytes_up_total" => e.up = x.value,
                "psm_relay_bytes_down_total" => e.down = x.value,
                "psm_relay_auth_failures_total" => e.auth_failures = x.value,
                "psm_relay_preauth_failures_total"
                | "psm_relay_startups_refused_total"
                | "psm_relay_errors_total" => e.errors += x.value,
                "psm_relay_recording_queue_depth" => e.rec_queue = x.value,
                "psm_relay_recording_paused" => e.paused = x.value,
                "psm_relay_recording_pauses_total" => e.pauses = x.value,
                "psm_relay_recording_stalls_total" => e.stalls = x.value,
                "psm_relay_recording_worker_lag_seconds" => e.lag = x.value,
                _ => {}
            }
        }
        s
    }
}

/// The table for two scrapes `secs` apart (rates are their difference over `secs`).
pub fn table(before: &Scrape, now: &Scrape, secs: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:>9} {:>10} {:>11} {:>11} {:>10} {:>8} {:>9} {:>7} {:>7} {:>7} {:>8}",
        "worker",
        "sessions",
        "accepts/s",
        "up MB/s",
        "down MB/s",
        "auth-fail",
        "errors",
        "rec-queue",
        "paused",
        "pauses",
        "stalls",
        "rec-lag"
    );
    let rate = |a: f64, b: f64| {
        if secs > 0.0 {
            (b - a).max(0.0) / secs
        } else {
            0.0
        }
    };
    let mut total = [0.0f64; COLUMNS];
    for (i, w) in &now.workers {
        let b = before.workers.get(i).cloned().unwrap_or_default();
        let row = [
            w.live,
            rate(b.connections, w.connections),
            rate(b.up, w.up) / 1e6,
            rate(b.down, w.down) / 1e6,
            w.auth_failures,
            w.errors,
            w.rec_queue,
            w.paused,
            w.pauses,
            w.stalls,
            w.lag,
        ];
        let _ = writeln!(out, "{}", line(&i.to_string(), &row));
        for (t, r) in total.iter_mut().zip(row).take(COLUMNS - 1) {
            *t += r;
        }
        // the relay's lag is its oldest worker's, not their sum
        total[COLUMNS - 1] = total[COLUMNS - 1].max(w.lag);
    }
    let _ = writeln!(out, "{}", line("all", &total));
    let _ = writeln!(
        out,
        "unauthenticated {}, recorder {}, recording lag {:.2} s",
        now.unauthenticated,
        if now.recorder_connected {
            "connected"
        } else {
            "NOT CONNECTED"
        },
        now.recording_lag
    );
    out
}

/// Columns of a worker's row after its label.
const COLUMNS: usize = 11;

fn line(label: &str, r: &[f64; COLUMNS]) -> String {
    format!(
        "{label:>6} {:>9} {:>10.1} {:>11.2} {:>11.2} {:>10} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7.2}s",
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10]
    )
}

fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let text = psm_metrics::fetch(addr, Duration::from_secs(5)).with_context(|| {
        format!(
            "no counters at {addr}: is the relay running with [relay] metrics_listen = \"{addr}\"?"
        )
    })?;
    let s = Scrape::from_samples(&psm_metrics::parse(&text));
    anyhow::ensure!(!s.workers.is_empty(), "{addr} serves no psm relay counters");
    Ok(s)
}

/// Prints the table every `interval` (once, after one interval, with `once`).
pub fn run(addr: SocketAddr, interval: Duration, once: bool) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut before = scrape(addr)?;
    let mut at = Instant::now();
    loop {
        std::thread::sleep(interval);
        let now = scrape(addr)?;
        let secs = at.elapsed().as_secs_f64();
        let mut text = table(&before, &now, secs);
        if tty && !once {
            text = format!("\x1b[H\x1b[2Jpsm relay at {addr}, every {interval:?}\n{text}");
        }
        std::io::stdout().lock().write_all(text.as_bytes())?;
        if once {
            return Ok(());
        }
        (before, at) = (now, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_two_scrapes() {
        let a = psm_metrics::parse(
            "psm_relay_connections_total{worker=\"0\"} 10\npsm_relay_bytes_up_total{worker=\"0\"} 0\n\
             psm_relay_sessions_live{worker=\"1\"} 2\npsm_relay_recorder_connected 1\n",
        );
        let b = psm_metrics::parse(
            "psm_relay_connections_total{worker=\"0\"} 30\npsm_relay_bytes_up_total{worker=\"0\"} 4000000\n\
             psm_relay_sessions_live{worker=\"1\"} 3\npsm_relay_preauth_failures_total{worker=\"1\"} 1\n\
             psm_relay_startups_refused_total{worker=\"1\"} 2\npsm_relay_recorder_connected 1\n\
             psm_relay_recording_pauses_total{worker=\"1\"} 4\npsm_relay_recording_paused{worker=\"1\"} 1\n\
             psm_relay_recording_stalls_total{worker=\"1\"} 1\n\
             psm_relay_errors_total{worker=\"1\",side=\"target\"} 2\n\
             psm_relay_errors_total{worker=\"1\",side=\"recorder\"} 1\n\
             psm_relay_recording_worker_lag_seconds{worker=\"0\"} 0.5\n\
             psm_relay_recording_worker_lag_seconds{worker=\"1\"} 2.25\n",
        );
        let (a, b) = (Scrape::from_samples(&a), Scrape::from_samples(&b));
        // pre-authentication failures, refused startups and faults of every side
        assert_eq!(b.workers[&1].errors, 6.0);
        let t = table(&a, &b, 2.0);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[1]
                .split_whitespace()
                .eq(["0", "0", "10.0", "2.00", "0.00", "0", "0", "0", "0", "0", "0", "0.50s"]),
            "{t}"
        );
        assert!(
            lines[2]
                .split_whitespace()
                .skip(8)
                .eq(["1", "4", "1", "2.25s"]),
            "paused, pauses, stalls, lag: {t}"
        );
        assert!(lines[3].split_whitespace().take(2).eq(["all", "3"]), "{t}");
        assert!(
            lines[3].ends_with("2.25s"),
            "the relay's lag is its oldest worker's: {t}"
        );
        assert!(t.contains("recorder connected"), "{t}");
    }
}
