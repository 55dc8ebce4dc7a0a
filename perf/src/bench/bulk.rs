//! The `bulk` workload: uploads, downloads and both at once with each cipher on every route
//! (and the OpenSSH client straight to sshd), as MB/s and CPU-seconds per GiB, each figure the
//! median of its rounds.

use std::collections::BTreeMap;
use std::time::Duration;

use super::report::{set_medians, transfer_figures, Row};
use super::world::World;
use super::{client, openssh, Opts};

pub(super) async fn bulk(w: &World, o: &Opts, rows: &mut Vec<Row>) {
    let n = o.mib << 20;
    for (cipher, cname, ossh_cipher) in [
        (
            russh::cipher::AES_128_GCM,
            "aes128-gcm",
            "aes128-gcm@openssh.com",
        ),
        (
            russh::cipher::CHACHA20_POLY1305,
            "chacha20-poly1305",
            "chacha20-poly1305@openssh.com",
        ),
    ] {
        let cfg = client::config(cipher);
        for what in ["up", "down", "both"] {
            let mut tput = Row::new(format!("{what} {cname}"), "MB/s", true);
            let mut cpu = Row::new(format!("{what} {cname} CPU"), "CPU-s/GiB", false);
            // every route once a round, so that each route's rounds spread over the same span
            // of the machine's load
            let mut rounds: BTreeMap<&'static str, Vec<anyhow::Result<(f64, f64)>>> =
                BTreeMap::new();
            for round in 1..=o.repeat {
                let of = if o.repeat > 1 {
                    format!(" (round {round} of {})", o.repeat)
                } else {
                    String::new()
                };
                for (route, d) in w.with_norec() {
                    eprintln!("bench: {what} {cname} via {route}{of}");
                    let before = w.cpu(route);
                    let r = async {
                        if what == "both" {
                            return client::both(d, &w.key, &cfg, n).await;
                        }
                        let h = client::connect(d, &w.key, &cfg).await?;
                        let secs = match what {
                            "up" => client::upload(&h, n).await?,
                            _ => client::download(&h, n).await?,
                        };
                        let _ = h
                            .disconnect(russh::Disconnect::ByApplication, "", "en")
                            .await;
                        anyhow::Ok(secs)
                    };
                    let r = tokio::time::timeout(client::STEP, r)
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
                    // let the jump host reap its connection's process before its CPU is read
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let moved = if what == "both" { 2 * n } else { n };
                    let spent = w.cpu(route) - before;
                    let figures = transfer_figures(moved, r.map(|s| (s, spent)));
                    if let (Ok((mbs, cpu)), true) = (&figures, o.repeat > 1) {
                        eprintln!("bench:   {what} {cname} via {route}{of}: {mbs:.0} MB/s, {cpu:.3} CPU-s/GiB");
                    }
                    rounds.entry(route).or_default().push(figures);
                }
                if let (Some(s), true) = (&w.openssh, what != "both") {
                    eprintln!("bench: {what} {cname} via openssh{of}");
                    let (s, up) = (s.clone(), what == "up");
                    let r = tokio::task::spawn_blocking(move || {
                        openssh::transfer(&s, ossh_cipher, up, n, client::STEP)
                    })
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
                    rounds
                        .entry("openssh")
                        .or_default()
                        .push(transfer_figures(n, r));
                }
            }
            for (route, figures) in rounds {
                set_medians(&mut tput, &mut cpu, route, figures);
            }
            rows.push(tput);
            rows.push(cpu);
        }
    }
}
