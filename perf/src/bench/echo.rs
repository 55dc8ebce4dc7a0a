//! The `echo` workload: the round trip of a small write on an open session, as percentiles, on
//! each route.

use std::time::Duration;

use super::report::Row;
use super::world::World;
use super::{client, Opts};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

pub(super) async fn echo(w: &World, o: &Opts, rows: &mut Vec<Row>) {
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
