//! `psm-recorder --data-dir DIR [--encryption-key-file FILE]`: writes session recordings sent by relays (see the library).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The psm session recorder: receives frames from relays on `recorder.sock` and writes
/// `recordings/<id>.psmrec`.
#[derive(Parser)]
#[command(name = "psm-recorder", version)]
struct Args {
    /// Data directory [env: PSM_DATA_DIR] [default: ./psm-data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Encrypt new recordings at rest with the recording key in FILE (64 hex digits, mode
    /// 0600; `psmctl recordings keygen FILE` makes one).
    #[arg(long, value_name = "FILE")]
    encryption_key_file: Option<PathBuf>,
    /// Index the text of encrypted recordings for search anyway (the index is not encrypted).
    #[arg(long, requires = "encryption_key_file")]
    index_encrypted: bool,
    /// Serve the recorder's counters in the Prometheus text format on this address; off by
    /// default.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let data_dir = args
        .data_dir
        .or_else(|| {
            std::env::var_os("PSM_DATA_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("./psm-data"));
    let key = args
        .encryption_key_file
        .as_deref()
        .map(psm_recorder_format::crypt::RecordingKey::read)
        .transpose()?;
    let encryption = psm_recorder::Encryption {
        key,
        index_encrypted: args.index_encrypted,
        metrics_listen: args.metrics_listen,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime
        .block_on(psm_recorder::run_with(data_dir.clone(), encryption))
        .with_context(|| format!("recorder on {}", data_dir.display()))?;
    Ok(())
}
