//! `psm-perf`: operator checks for a psm gateway host (see the library docs).

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// mimalloc, as in every psm process (ARCHITECTURE.md): the bench's light target and clients
/// allocate per packet like the relay does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod record_bench;
mod search_bench;
mod stats;

/// Operator performance tool for psm.
#[derive(Parser, Debug)]
#[command(name = "psm-perf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the host's tuning for a gateway (OK/WARN per item, with fixes).
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Concurrent sessions the gateway must hold (sizes the open-files check).
        #[arg(long, default_value_t = psm_perf::DEFAULT_SESSIONS)]
        sessions: u64,
        /// The psm-relay to look at, where several run (default: the one with the lowest pid).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// The running relay's counters per worker (sessions, accepts/s, bytes/s each way, failures,
    /// recording queue depth, pauses, stalls and lag), refreshed like top; read from its
    /// Prometheus endpoint (`[relay] metrics_listen`).
    Stats {
        /// The relay's metrics address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        addr: std::net::SocketAddr,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one table (rates over one interval) and exit.
        #[arg(long)]
        once: bool,
    },
    /// What recording costs per GiB (random, terminal-like and zero bytes), the recorder's
    /// adaptive zstd level beside a fixed one, and the seals of format versions 1, 3 and 5
    /// (perf/BENCHMARKS.md).
    RecordBench {
        /// MiB written per line of the table.
        #[arg(long, default_value_t = 1024)]
        mib: usize,
    },
    /// Measure psm beside a direct SSH session, an OpenSSH jump host and socat, on this machine
    /// in one run: bulk throughput and CPU per GiB (two ciphers), sessions per second, echo
    /// latency, idle sessions, TCP pass-through. One table of figures and ratios.
    Bench {
        /// Small sizes; checks only that every path works (CI).
        #[arg(long)]
        quick: bool,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
        /// Folder of psm, psmctl and the daemons (default: psm-perf's own).
        #[arg(long, value_name = "DIR")]
        bin: Option<std::path::PathBuf>,
        /// MiB per bulk transfer (pass-through moves 4 times as much).
        #[arg(long, default_value_t = 512)]
        mib: u64,
        /// Idle sessions held through psm at once.
        #[arg(long, default_value_t = 1000)]
        idle: usize,
        /// Keep the work folder (logs, psm's data directory).
        #[arg(long)]
        keep: bool,
        /// Relay workers of the psm under test (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Instead of the table: the scaling run, psm with each of these worker counts
        /// (`1,2,4,8`), 2 uploads per worker at once, MiB each per --mib.
        #[arg(long, value_delimiter = ',', value_name = "N,N,…")]
        scaling: Vec<usize>,
        /// Client runtime threads for the scaling run.
        #[arg(long, default_value_t = 4)]
        client_threads: usize,
        /// Bulk transfers: every route this many times, in rounds (each route once, then
        /// again); each figure is the median of its rounds.
        #[arg(long, default_value_t = 1, value_name = "N")]
        repeat: usize,
        /// Only these workloads (default: all): bulk, sessions, echo, idle, tcp.
        #[arg(long, value_delimiter = ',', value_name = "W,W,…",
              value_parser = ["bulk", "sessions", "echo", "idle", "tcp"])]
        only: Vec<String>,
    },
    /// The light SSH target `bench` runs (one process; built-in sink, source, echo, true).
    #[command(hide = true)]
    BenchTarget {
        /// SSH address.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Plain TCP sink address.
        #[arg(long)]
        tcp_sink: std::net::SocketAddr,
        /// Host key (OpenSSH private key file).
        #[arg(long)]
        host_key: std::path::PathBuf,
        /// The one user key accepted (OpenSSH public key file).
        #[arg(long)]
        user_key: std::path::PathBuf,
    },
    /// Write N synthetic shell recordings into DIR (which must not exist), index them as
    /// psm-recorder does, and time searches over them (perf/BENCHMARKS.md).
    SearchBench {
        /// Folder to create for the recordings and their index.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// How many recordings.
        #[arg(long, default_value_t = 1000)]
        recordings: usize,
        /// Commands per recording.
        #[arg(long, default_value_t = 100)]
        commands: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            quick,
            json,
            bin,
            mib,
            idle,
            keep,
            workers,
            scaling,
            client_threads,
            repeat,
            only,
        } => {
            anyhow::ensure!(
                (1..=65536).contains(&mib),
                "--mib must be between 1 and 65536"
            );
            anyhow::ensure!(
                (1..=100_000).contains(&idle),
                "--idle must be between 1 and 100000"
            );
            anyhow::ensure!(
                scaling.iter().all(|n| (1..=256).contains(n)),
                "--scaling: worker counts between 1 and 256"
            );
            anyhow::ensure!(
                (1..=15).contains(&repeat),
                "--repeat must be between 1 and 15"
            );
            anyhow::ensure!(
                repeat == 1 || (!quick && scaling.is_empty()),
                "--repeat is for the table's bulk transfers, not with --quick or --scaling"
            );
            anyhow::ensure!(
                (1..=256).contains(&client_threads),
                "--client-threads must be between 1 and 256"
            );
            let opts = bench::Opts {
                quick,
                bin,
                mib: if quick { 8 } else { mib },
                idle,
                keep,
                workers,
                only,
                repeat,
            };
            if scaling.is_empty() {
                bench::run(&opts, json)?
            } else {
                bench::scaling(&opts, &scaling, client_threads)?
            }
        }
        Command::BenchTarget {
            listen,
            tcp_sink,
            host_key,
            user_key,
        } => {
            let host = russh::keys::PrivateKey::from_openssh(
                std::fs::read_to_string(&host_key).context("reading the host key")?,
            )
            .context("host key")?;
            let user = russh::keys::PublicKey::from_openssh(
                std::fs::read_to_string(&user_key)
                    .context("reading the user key")?
                    .trim(),
            )
            .context("user key")?;
            bench::target::run(listen, tcp_sink, host, user)?
        }
        Command::SearchBench {
            dir,
            recordings,
            commands,
        } => search_bench::run(&dir, recordings, commands)?,
        Command::Stats {
            addr,
            interval,
            once,
        } => {
            anyhow::ensure!(
                interval.is_finite() && (0.1..=3600.0).contains(&interval),
                "--interval must be between 0.1 and 3600 seconds"
            );
            stats::run(addr, std::time::Duration::from_secs_f64(interval), once)?
        }
        Command::RecordBench { mib } => {
            anyhow::ensure!(
                (16..=65536).contains(&mib),
                "--mib must be between 16 and 65536"
            );
            record_bench::run(mib)
        }
        Command::Check {
            json,
            sessions,
            pid,
        } => {
            if let Some(p) = pid {
                anyhow::ensure!(
                    psm_perf::find_relay_pid(&psm_perf::RealHost, Some(p)).is_some(),
                    "no psm-relay with pid {p} (or its /proc entries cannot be read)"
                );
            }
            let opts = psm_perf::Options {
                sessions,
                relay_pid: pid,
            };
            let checks = psm_perf::run_checks(&psm_perf::RealHost, &opts);
            let out = if json {
                let mut s = serde_json::to_string_pretty(&psm_perf::render_json(&checks))
                    .context("encoding the report")?;
                s.push('\n');
                s
            } else {
                psm_perf::render_text(&checks)
            };
            std::io::stdout()
                .lock()
                .write_all(out.as_bytes())
                .context("writing the report")?;
        }
    }
    Ok(())
}
