//! The `tcp` workload: TCP pass-through, direct, through psm's tcp target and through socat
//! beside it, as MB/s and the forwarder's CPU-seconds per GiB.

use std::net::SocketAddr;
use std::time::Duration;

use super::client::Dest;
use super::procs::cpu_seconds;
use super::report::{mbps, set_transfer, Row};
use super::world::World;
use super::{client, procs, Opts};

/// `f`, or an error once it has taken [`client::STEP`].
async fn bounded<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(client::STEP, f)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {:?}", client::STEP)))
}

pub(super) async fn tcp(w: &World, o: &Opts, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let cfg = client::config(russh::cipher::AES_128_GCM);
    let n = if o.quick {
        16u64 << 20
    } else {
        (o.mib * 4) << 20
    };
    let mut tput = Row::new("tcp pass-through", "MB/s", true);
    let mut cpu = Row::new("tcp pass-through forwarder CPU", "CPU-s/GiB", false);
    eprintln!("bench: tcp pass-through");
    tput.set(
        "direct",
        bounded(client::tcp_upload(w.tcp_sink, n))
            .await
            .map(|s| mbps(n, s)),
    );
    let lease_dest = Dest {
        user: "alice@tcp@sink".into(),
        ..w.psm.clone()
    };
    let lease = tokio::time::timeout(
        Duration::from_secs(30),
        client::lease(&lease_dest, &w.key, &cfg),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no lease within 30 s")));
    match lease {
        Ok(_held) => {
            let before = w.cpu("psm");
            let r = bounded(client::tcp_upload(w.psm_tcp, n)).await;
            let spent = w.cpu("psm") - before;
            set_transfer(&mut tput, &mut cpu, "psm", n, r.map(|s| (s, spent)));
        }
        Err(e) => set_transfer(&mut tput, &mut cpu, "psm", n, Err(e)),
    }
    let port = match procs::free_port() {
        Ok(p) => p,
        Err(e) => {
            tput.set("socat", Err(e));
            rows.extend([tput, cpu]);
            return;
        }
    };
    match procs::start_socat(port, w.tcp_sink) {
        Ok(Some(p)) => {
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let r = bounded(client::tcp_upload(addr, n)).await;
            // socat exits after its one connection: its CPU is read before it is reaped
            let _ = procs::wait_until("socat to finish", Duration::from_secs(10), || {
                std::fs::read_to_string(format!("/proc/{}/stat", p.0.id()))
                    .map(|s| {
                        s.rsplit_once(')')
                            .map(|(_, r)| r.trim_start().starts_with('Z'))
                            .unwrap_or(true)
                    })
                    .unwrap_or(true)
            });
            let spent = cpu_seconds(p.0.id());
            set_transfer(&mut tput, &mut cpu, "socat", n, r.map(|s| (s, spent)));
        }
        Ok(None) => {
            notes.push("tcp: socat is not installed; pass-through is not compared with it".into())
        }
        Err(e) => tput.set("socat", Err(e)),
    }
    rows.extend([tput, cpu]);
}
