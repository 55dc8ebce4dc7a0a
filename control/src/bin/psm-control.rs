//! `psm-control`: the psm policy daemon. All logic lives in `psm_control::daemon`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use psm_control::daemon::{Options, DEFAULT_MIN_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH_RANGE};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Shortest password (in characters) a psm user may be given (8 to 1024).
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_MIN_PASSWORD_LENGTH,
        value_parser = parse_min_password_length
    )]
    min_password_length: usize,
    /// Failed logins (first or second factor) that lock a user (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    lockout_failures: u32,
    /// The window failed logins are counted in, and how long a lock lasts (`15m`).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = psm_control_api::conditions::parse_duration)]
    lockout_window: u64,
    /// Require a second factor for every session, whatever the grant says.
    #[arg(long)]
    mfa_required: bool,
    /// Events between two signed audit checkpoints (one is also written at shutdown).
    #[arg(long, value_name = "N", default_value_t = psm_control::audit::DEFAULT_CHECKPOINT_EVERY, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    audit_checkpoint_every: u64,
    /// Serve psm-control's counters in the Prometheus text format on this address; off by
    /// default.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// psm.toml: psm-control reads its `[[siem.sink]]` tables (the audit stream's receivers).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Recordings last written longer ago than this are deleted (`90d`; default: kept).
    #[arg(long, value_name = "DURATION", value_parser = psm_control_api::conditions::parse_duration)]
    retention_max_age: Option<u64>,
    /// When the recordings take more bytes than this, the oldest are deleted (default: no budget).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    retention_max_bytes: Option<u64>,
    /// How often retention looks.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = psm_control_api::conditions::parse_duration)]
    retention_interval: u64,
    /// The live audit segment (audit.jsonl) is rotated once it holds this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = psm_control::audit::DEFAULT_ROTATE_BYTES, value_parser = clap::value_parser!(u64).range(1024..))]
    audit_rotate_bytes: u64,
    /// The live audit segment is rotated once its first event is this old.
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = psm_control_api::conditions::parse_duration)]
    audit_rotate_interval: u64,
    /// Closed audit segments older than this are deleted (default: kept).
    #[arg(long, value_name = "DURATION", value_parser = psm_control_api::conditions::parse_duration)]
    audit_retention_max_age: Option<u64>,
    /// When the closed audit segments take more bytes than this, the oldest are deleted.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    audit_retention_max_bytes: Option<u64>,
}

fn parse_min_password_length(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("'{}' is not a number", s.escape_debug()))?;
    if MIN_PASSWORD_LENGTH_RANGE.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is not in {}..={}",
            MIN_PASSWORD_LENGTH_RANGE.start(),
            MIN_PASSWORD_LENGTH_RANGE.end()
        ))
    }
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
    let siem = match &args.config {
        Some(path) => psm_control::siem::config::load(path).map_err(|e| anyhow::anyhow!(e))?,
        None => Vec::new(),
    };
    let options = Options {
        min_password_length: args.min_password_length,
        lockout: psm_control::daemon::Lockout {
            max_failures: args.lockout_failures,
            window_ms: args.lockout_window,
        },
        mfa_required: args.mfa_required,
        audit_checkpoint_every: args.audit_checkpoint_every,
        metrics_listen: args.metrics_listen,
        relay_lost_grace: psm_control::daemon::RELAY_LOST_GRACE,
        siem,
        retention: psm_control::retention::Retention {
            max_age_ms: args.retention_max_age,
            max_bytes: args.retention_max_bytes,
        },
        retention_interval: std::time::Duration::from_millis(args.retention_interval),
        audit_rotation: psm_control::audit::Rotation {
            max_bytes: Some(args.audit_rotate_bytes),
            max_age_ms: Some(args.audit_rotate_interval),
        },
        audit_retention: psm_control::retention::Retention {
            max_age_ms: args.audit_retention_max_age,
            max_bytes: args.audit_retention_max_bytes,
        },
    };
    rt.block_on(psm_control::daemon::run(args.data_dir, options))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("psm-control").chain(args.iter().copied()))
    }

    #[test]
    fn min_password_length_flag() {
        let a = parse(&["--data-dir", "/tmp/x"]).expect("defaults");
        assert_eq!(a.min_password_length, 12);
        let a = parse(&["--min-password-length", "20"]).expect("20");
        assert_eq!(a.min_password_length, 20);
        assert!(parse(&["--min-password-length", "8"]).is_ok());
        assert!(parse(&["--min-password-length", "1024"]).is_ok());
        for bad in ["7", "1025", "0", "-3", "twelve"] {
            assert!(
                parse(&["--min-password-length", bad]).is_err(),
                "{bad} should be refused"
            );
        }
    }
}
