//! psm-relay daemon: thin wrapper over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// psm's data plane: terminates SSH, brokers and records sessions.
#[derive(Parser)]
#[command(name = "psm-relay", version)]
struct Args {
    /// Data directory shared with psm-control and psm-recorder.
    #[arg(long, env = "PSM_DATA_DIR", default_value = "./psm-data")]
    data_dir: PathBuf,
    /// Address users connect to.
    #[arg(long, default_value = "0.0.0.0:2222")]
    listen: SocketAddr,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Relay id used in audit events (default: the host name and pid).
    #[arg(long)]
    relay_id: Option<String>,
    /// Worker runtime back end.
    #[arg(long, value_enum, default_value = "auto")]
    io: psm_relay::IoBackend,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    anyhow::ensure!(
        (1..=1024).contains(&workers),
        "--workers must be between 1 and 1024"
    );
    let data_dir = std::fs::canonicalize(&args.data_dir)
        .with_context(|| format!("data directory {}", args.data_dir.display()))?;
    let cfg = psm_relay::RelayConfig {
        data_dir,
        listen: args.listen,
        workers,
        relay_id: args
            .relay_id
            .unwrap_or_else(|| format!("{}", std::process::id())),
        io: args.io,
    };
    let relay = psm_relay::start(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!(
            connections = relay.live_connections(),
            "relay stopping: closing sessions"
        );
        relay.shutdown(Duration::from_secs(4)).await;
        Ok::<(), std::io::Error>(())
    })?;
    Ok(())
}
