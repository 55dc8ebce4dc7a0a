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
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod control_link;
pub mod flow;
pub mod host_key;
pub mod recording;
pub mod session;
pub mod upstream;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::{MethodKind, MethodSet, SshId};
use tracing::{error, info};

pub use worker::IoBackend;

/// Relay settings, validated.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Data directory (host key, sockets).
    pub data_dir: PathBuf,
    /// Where users connect.
    pub listen: SocketAddr,
    /// Worker threads (one per core by default).
    pub workers: usize,
    /// Relay id reported to control and in audit events.
    pub relay_id: String,
    /// Runtime back end of the workers.
    pub io: IoBackend,
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
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
}

/// Starts the relay: control link, recorder link and workers. Returns once everything runs; the
/// workers live until the process exits.
pub fn start(cfg: &RelayConfig) -> Result<(), RelayError> {
    let (key, created) = host_key::load_or_create(&cfg.data_dir)?;
    info!(fingerprint = %host_key::fingerprint(&key), created, "gateway host key");

    let store = Arc::new(control_link::PolicyStore::default());
    let origin = format!("relay-{}", cfg.relay_id);
    let (audit, audit_rx) = control_link::AuditSink::new(&origin);
    {
        let socket = cfg.data_dir.join(psm_control_api::POLICY_SOCKET);
        let store = store.clone();
        let relay_id = cfg.relay_id.clone();
        std::thread::Builder::new()
            .name("psm-control-link".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(control_link::run(socket, relay_id, store, audit_rx)),
                    Err(e) => error!(error = %e, "cannot start the control link runtime"),
                }
            })
            .map_err(RelayError::Thread)?;
    }
    let recorder = recording::RecorderLink::start(cfg.data_dir.join("recorder.sock"))
        .map_err(RelayError::Thread)?;

    let server_config = Arc::new(russh::server::Config {
        server_id: SshId::Standard(format!("SSH-2.0-psm_{}", env!("CARGO_PKG_VERSION")).into()),
        methods: MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    });

    for i in 0..cfg.workers {
        let listener = worker::bind(cfg.listen).map_err(|source| RelayError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let ctx = Arc::new(session::WorkerCtx {
            policy: store.clone(),
            audit: audit.clone(),
            recorder: recorder.worker(),
            server_config: server_config.clone(),
        });
        let io = cfg.io;
        std::thread::Builder::new()
            .name(format!("psm-worker-{i}"))
            .spawn(move || {
                if let Err(e) = worker::run_worker(i, listener, ctx, io) {
                    error!(worker = i, error = %e, "worker stopped");
                    std::process::exit(1);
                }
            })
            .map_err(RelayError::Thread)?;
    }
    info!(listen = %cfg.listen, workers = cfg.workers, "relay listening");
    Ok(())
}
