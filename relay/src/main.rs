//! psm-relay daemon: thin wrapper over the library.

use std::io::IsTerminal as _;
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
    /// Address RDP users connect to, or `off`.
    #[arg(long, default_value = "0.0.0.0:3389", value_parser = parse_rdp_listen)]
    rdp_listen: RdpListen,
    /// psm's RDP TLS certificate (PEM; default DATA/rdp-cert.pem, generated on first start).
    #[arg(long, requires = "rdp_key")]
    rdp_cert: Option<PathBuf>,
    /// The private key of --rdp-cert (PEM).
    #[arg(long, requires = "rdp_cert")]
    rdp_key: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Relay id used in audit events (default: `HOSTNAME:PID`).
    #[arg(long)]
    relay_id: Option<String>,
    /// Worker socket back end: `auto` (the default: io_uring where the kernel allows it, else
    /// epoll, said in the log), `uring` (fail without it) or `epoll`.
    #[arg(long, value_enum, default_value = "auto", env = "PSM_RELAY_IO")]
    io: psm_relay::IoBackend,
    /// Pin each worker thread to one CPU (round robin over the CPUs the process may use).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pin_workers: bool,
    /// Serve the relay's counters in the Prometheus text format on this address (e.g.
    /// 127.0.0.1:9464); off by default.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds a client has to authenticate, handshake included.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    login_grace_secs: u64,
    /// Unauthenticated connections the relay holds: N, or start:rate:full as OpenSSH's
    /// MaxStartups (refused with rate% probability above start, rising to 100% at full).
    #[arg(long, default_value = "10:30:100")]
    max_startups: psm_relay::MaxStartups,
    /// Unauthenticated connections one source address may hold.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    per_source_max_startups: u32,
    /// Seconds of silence from a target after which a keepalive is sent.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    target_keepalive_secs: u64,
    /// Unanswered keepalives after which a target is given up.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    target_keepalive_max: u64,
    /// Authenticated connections one psm user may hold.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_user: u32,
    /// Authenticated connections the relay holds in all.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Relayed bytes a session may have that psm-recorder has not confirmed durable; the
    /// session stops reading at this many.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(4096..=(1u64 << 30)))]
    durable_window_bytes: u64,
    /// Milliseconds the oldest unconfirmed byte may wait before the session stops reading.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    durable_window_ms: u64,
    /// Seconds a session may stay stopped on a full durable window (psm-recorder confirming
    /// nothing) before its recording counts as failed and the session ends.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    recorder_stall_secs: u64,
}

/// `--rdp-listen`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
struct RdpListen(Option<SocketAddr>);

fn parse_rdp_listen(s: &str) -> Result<RdpListen, String> {
    if s == "off" {
        return Ok(RdpListen(None));
    }
    s.parse::<SocketAddr>()
        .map(|a| RdpListen(Some(a)))
        .map_err(|e| format!("'{s}': {e} (an address such as 0.0.0.0:3389, or off)"))
}

/// `HOSTNAME:PID`, the default relay id.
fn default_relay_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

fn main() -> anyhow::Result<()> {
    // No transparent huge pages for the relay's heap: a 2 MiB page per arena region held about
    // 25 KiB more per idle session (perf/BENCHMARKS.md). mimalloc is built without its own
    // MADV_HUGEPAGE (`no_thp`); this also covers a system whose THP setting is `always`.
    let _ = nix::sys::prctl::set_thp_disable(true);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
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
        rdp_listen: args.rdp_listen.0,
        rdp_cert: args.rdp_cert.zip(args.rdp_key),
        workers,
        relay_id: args.relay_id.unwrap_or_else(default_relay_id),
        io: args.io,
        pin_workers: args.pin_workers,
        metrics_listen: args.metrics_listen,
        limits: psm_relay::Limits {
            login_grace: Duration::from_secs(args.login_grace_secs),
            max_startups: args.max_startups,
            per_source_max_startups: args.per_source_max_startups,
            target_keepalive: psm_relay::TargetKeepalive {
                interval: Duration::from_secs(args.target_keepalive_secs),
                max: args.target_keepalive_max as usize,
            },
            max_connections_per_user: args.max_connections_per_user,
            max_connections: args.max_connections,
            durable_window: psm_relay::recording::Window {
                bytes: args.durable_window_bytes,
                time: Duration::from_millis(args.durable_window_ms),
                stall: Duration::from_secs(args.recorder_stall_secs),
            },
        },
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
