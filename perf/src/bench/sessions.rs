//! The `sessions` workload: sessions opened per second on each route, one after another and
//! many at once.

use std::time::{Duration, Instant};

use super::report::Row;
use super::world::World;
use super::{client, Opts};

pub(super) async fn sessions(w: &World, o: &Opts, rows: &mut Vec<Row>) {
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
