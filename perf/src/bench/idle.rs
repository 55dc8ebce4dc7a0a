//! The `idle` workload: many sessions held open through psm at once, the relay's memory per
//! session and the slowest echo among them; beside it, the slowest echo of sessions held
//! straight to the target and probed in between, in the same rounds: what this machine itself
//! (its scheduler, its other processes, the bench's client and target) adds to an echo.

use std::time::Duration;

use super::report::Row;
use super::world::World;
use super::{client, procs, Opts};

/// Sessions after which the workload measures what a session costs the relay in descriptors.
const PROBE: usize = 16;

/// Whether `n` sessions fit within psm-relay's descriptors, measured over the `held` held now
/// (`left`: the descriptors it could open before them). On epoll each session holds two (its
/// user's connection and its target's); on io_uring none, the sockets living in the rings'
/// tables. Past the limit, accept fails and the sessions would only time out.
fn fits(relay: Option<u32>, left: Option<u64>, held: usize, n: usize) -> anyhow::Result<()> {
    let (Some(before), Some(now)) = (left, relay.and_then(procs::descriptors_left)) else {
        return Ok(());
    };
    let per = before.saturating_sub(now) as f64 / held as f64;
    let need = (per * (n - held) as f64).ceil() as u64;
    if need > now {
        anyhow::bail!(
            "{n} idle sessions need about {need} more descriptors in psm-relay ({per:.1} per \
             session) and it may open {now} more (its `ulimit -n`; `psm-perf check` says how to \
             raise it)"
        );
    }
    Ok(())
}

/// How long every session is probed, round after round (one round with `--quick`): longer than
/// the write-stall watcher's round at psm's default limits (15 s) and the keepalives' interval.
const PROBE_FOR: Duration = Duration::from_secs(40);

/// Sessions held straight to the target beside psm's, at most; one is probed after each
/// psm session's probe, in turn, so that both meet the same moments of the machine.
const DIRECT_MAX: usize = 1000;

/// psm's processes using under this share of one CPU count as quiet.
const QUIET: f64 = 0.05;
/// The longest [`settle`] waits.
const SETTLE_MAX: Duration = Duration::from_secs(20);

/// Waits until psm's processes use less than [`QUIET`] of a CPU over a quarter second (at most
/// [`SETTLE_MAX`]); returns how long it waited.
async fn settle(w: &World) -> Duration {
    let start = std::time::Instant::now();
    let step = Duration::from_millis(250);
    let mut last = w.cpu("psm");
    while start.elapsed() < SETTLE_MAX {
        tokio::time::sleep(step).await;
        let now = w.cpu("psm");
        if now - last < QUIET * step.as_secs_f64() {
            break;
        }
        last = now;
    }
    start.elapsed()
}

pub(super) async fn idle(w: &World, o: &Opts, rows: &mut Vec<Row>) {
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
    eprintln!("bench: {n} idle sessions via psm");
    let r = async {
        let before = relay.map(procs::rss_kib).unwrap_or(0);
        let mut held = Vec::with_capacity(n);
        let left = relay.and_then(procs::descriptors_left);
        for i in 0..n {
            if i == PROBE {
                fits(relay, left, i, n)?;
            }
            let h = client::connect(&w.psm, &w.key, &cfg).await?;
            let e = client::Echo::open(&h).await?;
            held.push((h, e));
        }
        let after = relay.map(procs::rss_kib).unwrap_or(0);
        // the baseline is the run's second concern: when it cannot be held, psm is probed alone
        let mut direct = Vec::new();
        let mut direct_failed = None;
        for _ in 0..(n / 10).clamp(1, DIRECT_MAX) {
            let opened = async {
                let h = client::connect(&w.direct, &w.key, &cfg).await?;
                let e = client::Echo::open(&h).await?;
                anyhow::Ok((h, e))
            };
            match opened.await {
                Ok(d) => direct.push(d),
                Err(e) => {
                    direct.clear();
                    direct_failed = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        // what opening them left to do (their audit records, recordings' starts) is done
        // before the probes: idle sessions are what is measured
        let waited = settle(w).await;
        if waited >= SETTLE_MAX {
            anyhow::bail!(
                "psm did not go quiet within {SETTLE_MAX:?} of opening {n} idle sessions"
            );
        }
        eprintln!("bench: psm went quiet {waited:?} after the last session opened");
        // every session, round after round, for longer than psm's periodic work takes to come
        // round (keepalives, the write-stall watcher's rounds): the slowest of them all
        let probing = std::time::Instant::now();
        let (mut slowest, mut slowest_direct) = (Duration::ZERO, Duration::ZERO);
        let mut rounds = 0;
        let mut next_direct = 0;
        while rounds == 0 || (!o.quick && probing.elapsed() < PROBE_FOR) {
            for (_, e) in &mut held {
                slowest = slowest.max(e.probe().await?);
                if !direct.is_empty() {
                    let d = next_direct % direct.len();
                    match direct[d].1.probe().await {
                        Ok(t) => slowest_direct = slowest_direct.max(t),
                        Err(e) => {
                            direct.clear();
                            direct_failed = Some(format!("{e:#}"));
                        }
                    }
                    next_direct += 1;
                }
            }
            rounds += 1;
        }
        eprintln!(
            "bench: {rounds} rounds of echoes through every session in {:?}",
            probing.elapsed()
        );
        anyhow::Ok((
            after.saturating_sub(before) as f64 / n as f64,
            slowest.as_secs_f64() * 1e6,
            match direct_failed {
                None => Ok((direct.len(), slowest_direct.as_secs_f64() * 1e6)),
                Some(e) => Err(e),
            },
        ))
    };
    match tokio::time::timeout(client::STEP * 2, r)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
    {
        Ok((kib, us, direct)) => {
            mem.set("psm", Ok(kib));
            worst.set("psm", Ok(us));
            match direct {
                Ok((held, us)) => {
                    worst.set("direct", Ok(us));
                    eprintln!(
                        "bench: direct's slowest echo: {held} sessions, one probed after each of psm's"
                    );
                }
                Err(e) => worst.set("direct", Err(anyhow::anyhow!("{e}"))),
            }
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
