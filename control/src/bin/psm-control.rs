//! `psm-control`: the psm policy daemon. All logic lives in `psm_control::daemon`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The psm policy daemon: serves relays on policy.sock and psmctl on control.sock.
#[derive(Debug, Parser)]
#[command(name = "psm-control", version)]
struct Args {
    /// The psm data directory.
    #[arg(
        long,
        env = "PSM_DATA_DIR",
        default_value = "./psm-data",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(psm_control::daemon::run(args.data_dir))
        .map_err(|e| anyhow::anyhow!("{e}"))
}
