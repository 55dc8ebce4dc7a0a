//! `psm-perf bench`: the same workloads, in one invocation on one machine, directly to a target,
//! through psm (`psm up`, recording on) and through an OpenSSH jump host (ProxyJump), as one
//! table of figures and ratios (`--json` for the raw figures). The target is psm-perf's own light
//! SSH server (`bench-target`): a stock sshd's fork and shell per connection would be the
//! bottleneck of session setup. The client is russh (in this process). `--quick` runs every
//! path with small sizes and checks only that each works.

mod bulk;
mod client;
mod echo;
mod idle;
mod openssh;
mod procs;
mod report;
mod scaling;
mod sessions;
pub mod target;
mod tcp;
mod world;

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use bulk::bulk;
use echo::echo;
use idle::idle;
use report::{render, to_json};
use sessions::sessions;
use tcp::tcp;
use world::setup;

pub use scaling::scaling;

/// What `psm-perf bench` runs.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Small sizes; checks that every path works (CI).
    pub quick: bool,
    /// Where psm, psmctl and the daemons are (default: beside psm-perf).
    pub bin: Option<PathBuf>,
    /// MiB per bulk transfer.
    pub mib: u64,
    /// Idle sessions held through psm at once.
    pub idle: usize,
    /// Keep the work directory (logs, psm's data) at the end.
    pub keep: bool,
    /// Relay workers (`psm up --workers`; default: one per CPU).
    pub workers: Option<usize>,
    /// Only these workloads (`bulk`, `sessions`, `echo`, `idle`, `tcp`); empty: all.
    pub only: Vec<String>,
    /// Bulk transfers: rounds of every route, each figure the median of its rounds.
    pub repeat: usize,
}

impl Opts {
    fn runs(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }
}

/// Runs the bench; prints the table (or JSON) on stdout. Fails when any path failed.
pub fn run(o: &Opts, json_out: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("psm-perf-bench.{}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| {
        let world = setup(o, &dir)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut rows = Vec::new();
        let mut notes = world.notes.clone();
        if o.repeat > 1 && o.runs("bulk") {
            notes.push(format!(
                "bulk: each figure is the median of {} rounds (every route once a round)",
                o.repeat
            ));
        }
        rt.block_on(async {
            if o.runs("bulk") {
                bulk(&world, o, &mut rows).await;
            }
            if o.runs("sessions") {
                sessions(&world, o, &mut rows).await;
            }
            if o.runs("echo") {
                echo(&world, o, &mut rows, &mut notes).await;
            }
            if o.runs("idle") {
                idle(&world, o, &mut rows).await;
            }
            if o.runs("tcp") {
                tcp(&world, o, &mut rows, &mut notes).await;
            }
        });
        drop(rt);
        let retries = client::JUMP_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
        if retries > 0 {
            notes.push(format!("jump: {retries} stalled handshakes through the jump host were tried again (10 s each, not in the figures' sessions but in their time)"));
        }
        let failed = rows
            .iter()
            .flat_map(|r| r.values.values())
            .filter(|v| v.is_err())
            .count();
        let text = if json_out {
            serde_json::to_string_pretty(&to_json(&rows, &notes, o))? + "\n"
        } else {
            render(&rows, &notes)
        };
        print!("{text}");
        if failed > 0 {
            bail!("{failed} paths failed (logs in {})", world.dir.display());
        }
        anyhow::Ok(())
    })();
    if !(o.keep || result.is_err()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
