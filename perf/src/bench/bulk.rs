//! The `bulk` workload: uploads, downloads and both at once with each cipher on every route
//! (and the OpenSSH client straight to sshd), as MB/s and CPU-seconds per GiB, each figure the
//! median of its rounds.

use std::collections::{BTreeMap, BTreeSet};
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
            let mut rounds = Rounds::new(o.repeat);
            for round in 1..=o.repeat {
                let of = if o.repeat > 1 {
                    format!(" (round {round} of {})", o.repeat)
                } else {
                    String::new()
                };
                for (route, d) in w.with_norec() {
                    if rounds.failed(route) {
                        continue;
                    }
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
                    rounds.add(&mut tput, &mut cpu, route, &of, figures);
                }
                if let (Some(s), true) = (&w.openssh, what != "both") {
                    if rounds.failed("openssh") {
                        continue;
                    }
                    eprintln!("bench: {what} {cname} via openssh{of}");
                    let (s, up) = (s.clone(), what == "up");
                    let r = tokio::task::spawn_blocking(move || {
                        openssh::transfer(&s, ossh_cipher, up, n, client::STEP)
                    })
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
                    rounds.add(&mut tput, &mut cpu, "openssh", &of, transfer_figures(n, r));
                }
            }
            rows.push(tput);
            rows.push(cpu);
        }
    }
}

/// One row's rounds: each route's figures so far. A route's figures go into the rows as soon as
/// its last round is in (a run stopped at its time limit has still told what it measured), or
/// its failure as soon as it fails: a failed route is not tried again in later rounds.
struct Rounds {
    repeat: usize,
    /// Each route's figures of the rounds so far.
    of: BTreeMap<&'static str, Vec<(f64, f64)>>,
    /// The routes that failed (their failure is in the rows).
    failed: BTreeSet<&'static str>,
}

impl Rounds {
    fn new(repeat: usize) -> Rounds {
        Rounds {
            repeat,
            of: BTreeMap::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Whether `route` failed in an earlier round.
    fn failed(&self, route: &str) -> bool {
        self.failed.contains(route)
    }

    /// Adds one round of `route` (`of`: which round, for the log).
    fn add(
        &mut self,
        tput: &mut Row,
        cpu: &mut Row,
        route: &'static str,
        of: &str,
        figures: anyhow::Result<(f64, f64)>,
    ) {
        if self.repeat > 1 {
            match &figures {
                Ok((mbs, c)) => {
                    eprintln!(
                        "bench:   {} via {route}{of}: {mbs:.0} MB/s, {c:.3} CPU-s/GiB",
                        tput.workload
                    )
                }
                Err(e) => eprintln!("bench:   {} via {route}{of}: FAILED {e:#}", tput.workload),
            }
        }
        match figures {
            Err(e) => {
                self.failed.insert(route);
                set_medians(tput, cpu, route, vec![Err(e)]);
            }
            Ok(f) => {
                let all = self.of.entry(route).or_default();
                all.push(f);
                if all.len() == self.repeat {
                    set_medians(tput, cpu, route, all.drain(..).map(Ok).collect());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route's median goes into the row with its last round; a failure at once, and the
    /// route is not tried again.
    #[test]
    fn rounds_set_each_route_at_its_last_round_or_its_failure() {
        let mut tput = Row::new("up aes128-gcm", "MB/s", true);
        let mut cpu = Row::new("up aes128-gcm CPU", "CPU-s/GiB", false);
        let mut rounds = Rounds::new(3);
        rounds.add(&mut tput, &mut cpu, "psm", "", Ok((1000.0, 0.9)));
        rounds.add(
            &mut tput,
            &mut cpu,
            "jump",
            "",
            Err(anyhow::anyhow!("timed out")),
        );
        assert!(
            !tput.values.contains_key("psm"),
            "not before its last round"
        );
        assert!(tput.values["jump"]
            .as_ref()
            .is_err_and(|e| e.contains("timed out")));
        assert!(rounds.failed("jump") && !rounds.failed("psm"));
        rounds.add(&mut tput, &mut cpu, "psm", "", Ok((1200.0, 0.8)));
        rounds.add(&mut tput, &mut cpu, "psm", "", Ok((1100.0, 1.0)));
        assert_eq!(tput.values["psm"].as_ref().ok(), Some(&1100.0));
        assert_eq!(cpu.values["psm"].as_ref().ok(), Some(&0.9));
        // one round: set with it
        let mut once = Rounds::new(1);
        once.add(&mut tput, &mut cpu, "direct", "", Ok((2000.0, 0.7)));
        assert_eq!(tput.values["direct"].as_ref().ok(), Some(&2000.0));
    }
}
