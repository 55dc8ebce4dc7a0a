//! The `echo` workload: the round trip of a small write on an open session, as percentiles, on
//! each route.

use std::time::Duration;

use super::client::Dest;
use super::report::Row;
use super::world::World;
use super::{client, procs, Opts};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// The sorted round trips of `probes` echoes (after ten to warm up) on one session to `d`.
async fn probe(w: &World, d: &Dest, probes: usize) -> anyhow::Result<Vec<Duration>> {
    let cfg = client::config(russh::cipher::AES_128_GCM);
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
    tokio::time::timeout(client::STEP, r)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
}

pub(super) async fn echo(w: &World, o: &Opts, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let probes = if o.quick { 50 } else { 2000 };
    let mut p = [
        Row::new("echo p50", "µs", false),
        Row::new("echo p99", "µs", false),
        Row::new("echo p999", "µs", false),
    ];
    let mut set = |route: &'static str, r: anyhow::Result<Vec<Duration>>| match r {
        Ok(t) => {
            for (row, q) in p.iter_mut().zip([0.5, 0.99, 0.999]) {
                row.set(route, Ok(percentile(&t, q)));
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            for row in p.iter_mut() {
                row.set(route, Err(anyhow::anyhow!("{msg}")));
            }
        }
    };
    for (route, d) in w.with_norec() {
        eprintln!("bench: echo via {route}");
        set(route, probe(w, d, probes).await);
    }
    // the direct session through a TCP forwarder: what one more process on the path costs
    // each way on this machine (two more wakes per echo, no crypto, nothing else to do), the
    // floor under what any relay adds
    eprintln!("bench: echo via socat");
    match procs::free_port().and_then(|port| Ok((port, procs::start_socat(port, w.direct.addr)?))) {
        Ok((port, Some(_socat))) => {
            let d = Dest {
                addr: ([127, 0, 0, 1], port).into(),
                user: w.direct.user.clone(),
                jump: None,
            };
            set("socat", probe(w, &d, probes).await);
        }
        Ok((_, None)) => {
            notes.push("echo: socat is not installed; no forwarder's hop to compare with".into())
        }
        Err(e) => set("socat", Err(e)),
    }
    if let Some(direct) = p[0].get("direct") {
        let added: Vec<String> = ["psm", "psm-norec", "jump", "socat"]
            .iter()
            .filter_map(|r| p[0].get(r).map(|v| format!("{r} {:+.0}", v - direct)))
            .collect();
        notes.push(format!(
            "echo: p50 added over direct, µs: {} (socat: a TCP forwarder in front of the target, one more process each way and no crypto)",
            added.join(", ")
        ));
    }
    rows.extend(p);
}
