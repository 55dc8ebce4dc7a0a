//! `psm-perf bench --scaling`: aggregate throughput through psm for each count of relay
//! workers, psm started afresh for each.

use std::time::Instant;

use anyhow::Context as _;

use super::procs::cpu_seconds;
use super::report::mbps;
use super::world::{setup, World};
use super::{client, Opts};

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
