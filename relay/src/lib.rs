//! psm-relay: the data plane of psm.
//!
//! What it does: terminates SSH toward users (russh server) and toward targets (russh client),
//! authenticates users against the policy snapshot pushed by psm-control, brokers each session
//! with the vaulted credential, relays every channel with bounded memory, and hands every byte to
//! psm-recorder through per-core lock-free queues. One worker thread per core, each with its own
//! runtime and its own `SO_REUSEPORT` listener.
//!
//! What it does not do: store anything on disk besides its host key (credentials live in memory
//! only, inside the current snapshot), or make policy: decisions come from
//! [`psm_control_api::PolicySnapshot`].
// `unsafe` only in `uring` (io_uring submissions), each block with its SAFETY comment
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod commands;
pub mod control_link;
pub mod cut;
pub mod end;
pub mod flow;
pub mod fuzz;
pub mod host_key;
pub mod metrics;
pub mod mfa;
pub mod notices;
pub mod passthrough;
mod pipe;
pub mod prestart;
pub mod rdp;
pub mod recording;
pub mod session;
pub mod startups;
pub mod transfer;
pub mod upstream;
pub mod uring;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use russh::{cipher, MethodKind, MethodSet, SshId};
use tracing::{error, info, warn};

pub use startups::MaxStartups;
pub use upstream::TargetKeepalive;
pub use worker::IoBackend;

/// Silence after which psm sends a user's client a keepalive.
const USER_KEEPALIVE: Duration = Duration::from_secs(30);
/// Unanswered keepalives after which a user's client is given up.
const USER_KEEPALIVE_MAX: usize = 3;
/// How long a write to a user's client may wait on a client that takes nothing before its
/// connection is cut (the keepalives' own time, and one interval more).
pub(crate) const USER_WRITE_STALL: Duration =
    Duration::from_secs(USER_KEEPALIVE.as_secs() * (USER_KEEPALIVE_MAX as u64 + 1));

/// Timeouts and caps of the relay, each with an OpenSSH-like default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a client has to authenticate (OpenSSH's `LoginGraceTime`; default 60 s). The
    /// one figure for the whole pre-authentication phase, handshake included.
    pub login_grace: Duration,
    /// Unauthenticated connections the relay holds (OpenSSH's `MaxStartups`; default 10:30:100).
    pub max_startups: MaxStartups,
    /// Unauthenticated connections one source address may hold (OpenSSH's
    /// `PerSourceMaxStartups`; default 10).
    pub per_source_max_startups: u32,
    /// Keepalives toward targets (default every 15 s of silence, given up after 3 misses).
    pub target_keepalive: TargetKeepalive,
    /// Authenticated connections one psm user may hold (default 32).
    pub max_connections_per_user: u32,
    /// Authenticated connections the relay holds in all (default 4096).
    pub max_connections: u32,
    /// How far a session may run ahead of what psm-recorder confirmed durable (default 1 MiB
    /// or 1 s, whichever first).
    pub durable_window: recording::Window,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            login_grace: Duration::from_secs(60),
            max_startups: MaxStartups::default(),
            per_source_max_startups: 10,
            target_keepalive: TargetKeepalive::default(),
            max_connections_per_user: 32,
            max_connections: 4096,
            durable_window: recording::Window::default(),
        }
    }
}

/// A short peer-chosen string made safe to log: escaped and cut to 256 bytes.
pub(crate) fn escape_short(s: &str) -> String {
    let (kept, cut) = psm_control_api::escape::truncate(s, 256);
    let mut out = psm_control_api::escape(kept);
    if cut {
        out.push('…');
    }
    out
}

/// Relay settings, validated.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Data directory (host key, sockets).
    pub data_dir: PathBuf,
    /// Where users connect.
    pub listen: SocketAddr,
    /// Where RDP users connect (None: no RDP listener).
    pub rdp_listen: Option<SocketAddr>,
    /// psm's RDP certificate and key (PEM); None: `DATA/rdp-cert.pem` and `DATA/rdp-key.pem`,
    /// generated on first start.
    pub rdp_cert: Option<(PathBuf, PathBuf)>,
    /// Worker threads (one per core by default).
    pub workers: usize,
    /// Relay id reported to control and in audit events.
    pub relay_id: String,
    /// Runtime back end of the workers.
    pub io: IoBackend,
    /// Pin each worker thread to one CPU of the process's affinity mask (round robin).
    pub pin_workers: bool,
    /// Where to serve the counters in the Prometheus text format (none: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Timeouts and caps.
    pub limits: Limits,
}

/// Errors that stop the relay from starting.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The host key could not be loaded or created.
    #[error(transparent)]
    HostKey(#[from] host_key::HostKeyError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The RDP certificate could not be loaded or created.
    #[error(transparent)]
    RdpCert(#[from] rdp::tls::CertError),
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
}

/// Ciphers psm offers on both legs, fastest first on CPUs with AES instructions.
pub const CIPHERS: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// A running relay.
pub struct Relay {
    shutdown: tokio::sync::watch::Sender<bool>,
    live: Arc<AtomicUsize>,
    audit: control_link::AuditSink,
}

impl Relay {
    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Closes every connection (each gets its end-of-session record and recording trailer),
    /// then waits for the audit events to reach psm-control; gives up after `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        let end = tokio::time::Instant::now() + deadline;
        let _ = self.shutdown.send(true);
        while self.live_connections() > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while self.audit.pending() > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The recorder link drains its queues within milliseconds; give it one tick.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the relay: control link, recorder link and workers. Returns once everything runs; the
/// workers live until the process exits or [`Relay::shutdown`].
pub fn start(cfg: &RelayConfig) -> Result<Relay, RelayError> {
    let (key, created) = host_key::load_or_create(&cfg.data_dir)?;
    info!(fingerprint = %host_key::fingerprint(&key), created, "gateway host key");

    let store = Arc::new(control_link::PolicyStore::default());
    let origin = format!("relay-{}", cfg.relay_id);
    let (audit, audit_rx) = control_link::AuditSink::new(&origin);
    let live_sessions = Arc::new(control_link::LiveSessions::default());
    let approvals = Arc::new(control_link::ApprovalRpc::default());
    let approvals_link = approvals.clone();
    let recorder = recording::RecorderLink::start(
        cfg.data_dir.join("recorder.sock"),
        cfg.limits.durable_window,
    );
    let counters = control_link::WorkerCounters::new(cfg.workers);
    let startups =
        startups::Startups::new(cfg.limits.max_startups, cfg.limits.per_source_max_startups);
    let levels = Arc::new(metrics::Levels {
        unauthenticated: Box::new({
            let s = startups.clone();
            move || u64::from(s.held())
        }),
        recorder_connected: Box::new({
            let link = recorder.clone();
            move || link.connected()
        }),
        recording_lag: Box::new({
            let link = recorder.clone();
            move || link.lag().as_secs_f64()
        }),
    });
    let worker_recorders: Vec<recording::WorkerRecorder> = (0..cfg.workers)
        .map(|_| recorder.worker())
        .collect::<Result<_, _>>()
        .map_err(RelayError::Thread)?;
    if let Some(addr) = cfg.metrics_listen {
        let (workers, levels) = (counters.clone(), levels.clone());
        let recorders = worker_recorders.clone();
        let bound = psm_metrics::serve(addr, move || {
            psm_metrics::render(&metrics::families(&workers, &recorders, &levels))
        })
        .map_err(|source| RelayError::Bind { addr, source })?;
        info!(listen = %bound, "relay counters served (Prometheus text)");
        if let Some(why) = psm_metrics::exposure(bound) {
            warn!(listen = %bound, "{why}");
        }
    }
    {
        let socket = cfg.data_dir.join(psm_control_api::POLICY_SOCKET);
        let store = store.clone();
        let live = live_sessions.clone();
        let relay_id = cfg.relay_id.clone();
        let reporter = control_link::Reporter {
            counters: counters.clone(),
            levels,
        };
        std::thread::Builder::new()
            .name("psm-control-link".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(control_link::run(
                        socket,
                        relay_id,
                        store,
                        live,
                        reporter,
                        audit_rx,
                        approvals_link,
                    )),
                    Err(e) => error!(error = %e, "cannot start the control link runtime"),
                }
            })
            .map_err(RelayError::Thread)?;
    }
    let server_config = Arc::new(russh::server::Config {
        server_id: SshId::Standard(format!("SSH-2.0-psm_{}", env!("CARGO_PKG_VERSION")).into()),
        methods: MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        // Idle shells stay as long as the client answers keepalives; a vanished client is
        // noticed within about a minute and a half.
        inactivity_timeout: None,
        keepalive_interval: Some(USER_KEEPALIVE),
        keepalive_max: USER_KEEPALIVE_MAX,
        window_size: flow::WINDOW,
        maximum_packet_size: flow::MAX_PACKET,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..Default::default()
        },
        nodelay: true,
        ..Default::default()
    });

    // SO_REUSEPORT would let a second gateway of the same user share the port silently and split
    // users between two policies: make sure nobody listens there before joining it ourselves.
    drop(
        std::net::TcpListener::bind(cfg.listen).map_err(|source| RelayError::Bind {
            addr: cfg.listen,
            source,
        })?,
    );
    let rdp_cert = match cfg.rdp_listen {
        Some(addr) => {
            let (cert, created) = rdp::tls::load_or_create(
                &cfg.data_dir,
                cfg.rdp_cert.as_ref().map(|(c, _)| c.as_path()),
                cfg.rdp_cert.as_ref().map(|(_, k)| k.as_path()),
            )?;
            info!(fingerprint = %cert.fingerprint, created, "gateway rdp certificate");
            drop(
                std::net::TcpListener::bind(addr)
                    .map_err(|source| RelayError::Bind { addr, source })?,
            );
            Some((addr, Arc::new(cert)))
        }
        None => None,
    };
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let live = Arc::new(AtomicUsize::new(0));
    let limits = Arc::new(cfg.limits.clone());
    let mfa = Arc::new(mfa::Mfa::default());
    let throttle = Arc::new(mfa::Throttle::default());
    let user_slots = startups::UserSlots::new(
        cfg.limits.max_connections_per_user,
        cfg.limits.max_connections,
    );
    // Pre-authentication failures: at most 20 log lines a second for the whole relay.
    let preauth_log = Arc::new(Mutex::new(startups::LogLimiter::new(
        20,
        Duration::from_secs(1),
    )));

    let mut reserved = vec![cfg.listen];
    reserved.extend(rdp_cert.as_ref().map(|(a, _)| *a));
    let leases = passthrough::Leases::new(reserved);

    let allowed_cpus = worker::allowed_cpus();
    if cfg.pin_workers && cfg.workers > allowed_cpus.len() && !allowed_cpus.is_empty() {
        warn!(
            workers = cfg.workers,
            cpus = allowed_cpus.len(),
            "more workers than cpus: some cpus run two workers"
        );
    }
    for (i, worker_recorder) in worker_recorders.into_iter().enumerate() {
        let listener = worker::bind(cfg.listen).map_err(|source| RelayError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let rdp_listener = match &rdp_cert {
            Some((addr, cert)) => Some(worker::RdpListener {
                listener: worker::bind(*addr).map_err(|source| RelayError::Bind {
                    addr: *addr,
                    source,
                })?,
                cert: cert.clone(),
            }),
            None => None,
        };
        let ctx = Arc::new(session::WorkerCtx {
            worker: i,
            policy: store.clone(),
            audit: audit.clone(),
            recorder: worker_recorder,
            server_config: server_config.clone(),
            shutdown: shutdown_rx.clone(),
            live: live.clone(),
            sessions: live_sessions.clone(),
            limits: limits.clone(),
            startups: startups.clone(),
            counters: counters.0[i].clone(),
            preauth_log: preauth_log.clone(),
            user_slots: user_slots.clone(),
            mfa: mfa.clone(),
            approvals: approvals.clone(),
            throttle: throttle.clone(),
            leases: leases.clone(),
        });
        let io = cfg.io;
        let cpus = if cfg.pin_workers {
            allowed_cpus.clone()
        } else {
            Vec::new()
        };
        std::thread::Builder::new()
            .name(format!("psm-worker-{i}"))
            .spawn(move || {
                if !cpus.is_empty() {
                    match worker::pin_current_thread(i, &cpus) {
                        Some(cpu) => info!(worker = i, cpu, "worker pinned"),
                        None => warn!(
                            worker = i,
                            "could not pin the worker to a cpu; it runs unpinned"
                        ),
                    }
                }
                if let Err(e) = worker::run_worker(i, listener, rdp_listener, ctx, io) {
                    error!(worker = i, error = %e, "worker stopped");
                    std::process::exit(1);
                }
            })
            .map_err(RelayError::Thread)?;
    }
    info!(listen = %cfg.listen, workers = cfg.workers, "relay listening");
    if let Some((addr, _)) = &rdp_cert {
        info!(listen = %addr, workers = cfg.workers, "relay listening for rdp");
    }
    Ok(Relay {
        shutdown,
        live,
        audit,
    })
}
