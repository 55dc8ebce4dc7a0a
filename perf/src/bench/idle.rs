//! The `idle` workload: many sessions held open through psm at once, the relay's memory per
//! session and the slowest echo among them.

use std::time::Duration;

use super::report::Row;
use super::world::World;
use super::{client, procs, Opts};

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
