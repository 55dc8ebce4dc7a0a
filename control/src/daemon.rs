//! The psm-control daemon: serves relays on `policy.sock` and psmctl on `control.sock`.
//!
//! - Relays send `Hello` first and get the current full snapshot; after every change every
//!   connected relay gets the new full snapshot right away (a `tokio::sync::watch` channel
//!   carries the encoded line, built once per version). Relays send audit events back; they are
//!   numbered and appended to `audit.jsonl`, and `session_start`/`session_end` events keep the
//!   table of live sessions.
//! - psmctl speaks the [`crate::protocol`]. Every change is one store transaction that bumps
//!   the policy version, then a snapshot push, then an `admin_change` audit event naming the
//!   actor: the uid from the connection's `SO_PEERCRED` and its user name (`getpwuid_r`).
//!   Requests run on tokio's blocking pool (SQLite, PBKDF2), never on the async executor.
//! - psm users' passwords arrive in clear over the owner-only control socket; the daemon
//!   refuses those shorter than the minimum ([`Options::min_password_length`], default
//!   [`DEFAULT_MIN_PASSWORD_LENGTH`]) and stores only a PBKDF2 hash.
//! - Only the uid that owns the data directory may connect to either socket (checked with
//!   `SO_PEERCRED`); both sockets are mode 0600.
//! - Relays report their counters and each running session's byte counts every few seconds.
//!   When a relay's link drops, its sessions wait [`RELAY_LOST_GRACE`] for the relay to come back
//!   and announce them again; those that are not announced get their `session_end` from control,
//!   with the reason `relay lost` and the last byte counts seen.
//!
//! What it does not do: talk SSH, or keep decrypted credentials anywhere but in the current
//! snapshot line (wiped when replaced).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use psm_control_api::{encode_line, ControlToRelay, PolicySnapshot};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use zeroize::Zeroizing;

use crate::audit::{AuditError, AuditLog};
use crate::datadir::{init_data_dir, load_master_key, DataDir, InitError};
use crate::protocol::RelayInfo;
use crate::store::{Store, StoreError};
use crate::vault::{Vault, VaultError};

mod approvals;
mod governance;
mod relays;
mod requests;
mod retention;
#[cfg(test)]
mod tests;

pub use crate::store::Lockout;
pub use governance::otpauth_uri;
use relays::{serve_policy, LiveSession};
use requests::serve_control;

/// How long a relay has to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the sessions of a relay whose link dropped wait for it to come back and announce
/// them, before control ends them with the reason [`REASON_RELAY_LOST`].
pub const RELAY_LOST_GRACE: Duration = Duration::from_secs(10);
/// The `session_end` reason control writes for the sessions of a relay that never came back.
pub const REASON_RELAY_LOST: &str = "relay lost";

/// Minimum length of a psm user's password, in characters, unless configured otherwise.
pub const DEFAULT_MIN_PASSWORD_LENGTH: usize = 12;
/// The minimum password lengths psm-control accepts as configuration.
pub const MIN_PASSWORD_LENGTH_RANGE: std::ops::RangeInclusive<usize> = 8..=1024;

/// Settings of the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Shortest password (in characters) a psm user may be given.
    pub min_password_length: usize,
    /// When failed logins lock a user.
    pub lockout: Lockout,
    /// Whether every session needs a second factor (`[policy] mfa = "required"`).
    pub mfa_required: bool,
    /// Events between two signed audit checkpoints (one is also written at shutdown).
    pub audit_checkpoint_every: u64,
    /// Where the audit stream is exported (`[[siem.sink]]`).
    pub siem: Vec<crate::siem::config::SinkConfig>,
    /// What retention keeps of the recordings.
    pub retention: crate::retention::Retention,
    /// How often retention looks (the first time once relays had time to announce their
    /// sessions).
    pub retention_interval: Duration,
    /// When the live audit segment is rotated.
    pub audit_rotation: crate::audit::Rotation,
    /// What retention keeps of the closed audit segments.
    pub audit_retention: crate::retention::Retention,
    /// Where to serve psm-control's counters (Prometheus text); `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long the sessions of a relay whose link dropped wait for it to announce them again
    /// before control ends them ([`RELAY_LOST_GRACE`]).
    pub relay_lost_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_password_length: DEFAULT_MIN_PASSWORD_LENGTH,
            lockout: Lockout::default(),
            mfa_required: false,
            audit_checkpoint_every: crate::audit::DEFAULT_CHECKPOINT_EVERY,
            siem: Vec::new(),
            retention: Default::default(),
            retention_interval: Duration::from_secs(60),
            audit_rotation: Default::default(),
            audit_retention: Default::default(),
            metrics_listen: None,
            relay_lost_grace: RELAY_LOST_GRACE,
        }
    }
}

/// Who sent a request on the control socket: the peer's uid and, when the system knows it,
/// its user name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// Peer uid (`SO_PEERCRED`).
    pub uid: u32,
    /// User name of `uid`.
    pub name: Option<String>,
}

impl Actor {
    /// The actor for `uid`, with its user name looked up (`getpwuid_r`; this may block on
    /// NSS, so call it off the async executor).
    pub fn lookup(uid: u32) -> Actor {
        let name = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => Some(u.name),
            Ok(None) => None,
            Err(e) => {
                debug!(uid, error = %e, "cannot look up the user name");
                None
            }
        };
        Actor { uid, name }
    }
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The data directory, master key or database is unusable.
    #[error(transparent)]
    Init(#[from] InitError),
    /// The store failed while building the first snapshot.
    #[error("cannot build the policy snapshot: {0}")]
    Store(#[from] StoreError),
    /// The vault key was rejected.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The audit log is unusable.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The evidence key (`evidence.key`) that signs audit checkpoints is unusable.
    #[error(transparent)]
    Evidence(#[from] psm_evidence::KeyError),
    /// A SIEM sink's queue or TLS files are unusable.
    #[error("{0}")]
    Siem(String),
    /// A socket could not be set up.
    #[error("cannot listen on {}: {source}", .path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Another daemon already serves this data directory.
    #[error("another psm-control is already serving {}", .path.display())]
    AlreadyRunning {
        /// The socket that answered.
        path: PathBuf,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(io::Error),
    /// The data directory belongs to another user.
    #[error("data directory {} is owned by uid {owner}, but psm-control runs as uid {me}: run it as the directory's owner, or chown the directory", .path.display())]
    NotOwner {
        /// The data directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
    },
}

/// The current snapshot, encoded once as a policy-socket line. The buffer holds decrypted
/// credentials and is wiped when dropped.
pub struct SnapshotLine {
    /// Snapshot version.
    pub version: u64,
    /// `ControlToRelay::Snapshot` JSON line, newline included.
    pub line: Zeroizing<Vec<u8>>,
}

impl SnapshotLine {
    fn encode(snapshot: PolicySnapshot) -> SnapshotLine {
        let version = snapshot.version;
        SnapshotLine {
            version,
            line: Zeroizing::new(encode_line(&ControlToRelay::Snapshot(snapshot))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Shared {
    store: Mutex<Store>,
    vault: Vault,
    audit: Mutex<AuditLog>,
    snapshot: watch::Sender<Arc<SnapshotLine>>,
    /// Lines for every connected relay besides snapshots (`Kill`, approval replies and
    /// updates).
    kills: tokio::sync::broadcast::Sender<Arc<Vec<u8>>>,
    /// Dual-control requests.
    approvals: Mutex<approvals::Approvals>,
    sessions: Mutex<HashMap<String, LiveSession>>,
    relays: Mutex<BTreeMap<u64, RelayInfo>>,
    recordings_dir: PathBuf,
    owner_uid: u32,
    next_conn: AtomicU64,
    options: Options,
    siem: crate::siem::Siem,
}

impl Shared {
    /// Each target's protocol, from the store (read without holding any other lock).
    fn target_protocols(&self) -> HashMap<String, psm_control_api::Protocol> {
        lock(&self.store)
            .list_targets()
            .map(|ts| ts.into_iter().map(|t| (t.name, t.protocol)).collect())
            .unwrap_or_default()
    }

    /// Builds and publishes the snapshot of the store's current state.
    fn publish(&self, store: &mut Store) -> Result<u64, StoreError> {
        let mut snap = store.snapshot(&self.vault)?;
        snap.mfa_required = self.options.mfa_required;
        let line = SnapshotLine::encode(snap);
        let version = line.version;
        self.snapshot.send_replace(Arc::new(line));
        Ok(version)
    }

    /// psm-control's counters as Prometheus families.
    fn metrics(&self) -> Vec<psm_metrics::Family> {
        use psm_metrics::{Family, Kind};
        let version = self.snapshot.borrow().version;
        let relays = lock(&self.relays).len();
        let sessions = lock(&self.sessions)
            .values()
            .filter(|s| s.lost.is_none())
            .count();
        let written = lock(&self.audit).next_seq().saturating_sub(1);
        vec![
            Family::new(
                "psm_control_policy_version",
                Kind::Gauge,
                "Version of the policy snapshot pushed to relays.",
            )
            .sample(vec![], version as f64),
            Family::new("psm_control_relays", Kind::Gauge, "Relays connected.")
                .sample(vec![], relays as f64),
            Family::new(
                "psm_control_sessions_live",
                Kind::Gauge,
                "Sessions the relays report running.",
            )
            .sample(vec![], sessions as f64),
            Family::new(
                "psm_control_audit_events_total",
                Kind::Counter,
                "Audit events written (the last sequence number).",
            )
            .sample(vec![], written as f64),
        ]
    }
}

enum Line {
    Data,
    Eof,
    TooLong,
}

/// Reads one line into `buf` (newline stripped), refusing lines longer than `max`.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Line::Data);
    }
    if buf.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Data)
}

fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::AlreadyRunning {
                path: path.to_path_buf(),
            });
        }
        fs::remove_file(path).map_err(|source| ControlError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Socket {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

/// Runs the daemon on `data_dir` with `options` until SIGTERM or SIGINT, then removes its
/// sockets.
pub async fn run(data_dir: PathBuf, options: Options) -> Result<(), ControlError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ControlError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ControlError::Signal)?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    };
    run_until_with(data_dir, options, stop).await
}

/// [`run_until_with`] with the default [`Options`].
pub async fn run_until<F: Future<Output = ()>>(
    data_dir: PathBuf,
    shutdown: F,
) -> Result<(), ControlError> {
    run_until_with(data_dir, Options::default(), shutdown).await
}

/// Runs the daemon on `data_dir` until `shutdown` completes, then closes every connection and
/// removes its sockets. [`run`] is this with the signal handlers as `shutdown`.
pub async fn run_until_with<F: Future<Output = ()>>(
    data_dir: PathBuf,
    options: Options,
    shutdown: F,
) -> Result<(), ControlError> {
    let relay_lost_grace = options.relay_lost_grace;
    let me = nix::unistd::geteuid().as_raw();
    // another user's directory is refused before anything is written into it (relays and
    // psmctl run as the same user as psm-control; they would all be refused)
    if let Ok(m) = std::fs::metadata(&data_dir) {
        use std::os::unix::fs::MetadataExt as _;
        if m.is_dir() && m.uid() != me {
            return Err(ControlError::NotOwner {
                path: data_dir.clone(),
                owner: m.uid(),
                me,
            });
        }
    }
    init_data_dir(&data_dir)?;
    let paths = DataDir::new(&data_dir);
    // (its owner was checked above: an existing directory, or one init_data_dir made for `me`)
    let owner_uid = paths.owner_uid()?;
    let vault = Vault::new(&*load_master_key(&paths.master_key())?)?;
    let mut store = Store::open(&paths.database()).map_err(|source| InitError::Database {
        path: paths.database(),
        source,
    })?;
    let mut first = store.snapshot(&vault)?;
    first.mfa_required = options.mfa_required;
    let first = SnapshotLine::encode(first);
    let version = first.version;
    let mut audit = AuditLog::open(&paths.audit_log())?;
    let (evidence_key, _) = psm_evidence::EvidenceKey::load_or_create(&data_dir)?;
    audit.sign_checkpoints(evidence_key, options.audit_checkpoint_every);
    audit.rotate_when(options.audit_rotation);
    let siem = crate::siem::Siem::start(&data_dir, &options.siem).map_err(ControlError::Siem)?;
    audit.tap = siem.tap();
    let next_seq = audit.next_seq();
    let (snapshot, _) = watch::channel(Arc::new(first));
    let shared = Arc::new(Shared {
        store: Mutex::new(store),
        vault,
        audit: Mutex::new(audit),
        snapshot,
        kills: tokio::sync::broadcast::channel(1024).0,
        approvals: Mutex::new(Default::default()),
        sessions: Mutex::new(HashMap::new()),
        relays: Mutex::new(BTreeMap::new()),
        recordings_dir: data_dir.join("recordings"),
        owner_uid,
        next_conn: AtomicU64::new(1),
        options,
        siem,
    });
    if let Some(addr) = shared.options.metrics_listen {
        let weak = Arc::downgrade(&shared);
        let bound = psm_metrics::serve(addr, move || {
            weak.upgrade()
                .map(|s| psm_metrics::render(&s.metrics()))
                .unwrap_or_default()
        })
        .map_err(|source| ControlError::Socket {
            path: PathBuf::from(addr.to_string()),
            source,
        })?;
        info!(listen = %bound, "psm-control counters served (Prometheus text)");
        if let Some(why) = psm_metrics::exposure(bound) {
            tracing::warn!(listen = %bound, "{why}");
        }
    }
    let weak = Arc::downgrade(&shared);
    shared.siem.forward_notices(move |kind| {
        if let Some(Err(e)) = weak.upgrade().map(|s| lock(&s.audit).append_control(kind)) {
            error!(error = %e, "cannot write a SIEM notice");
        }
    });
    let control_path = paths.control_socket();
    let policy_path = paths.policy_socket();
    let control = bind(&control_path)?;
    let policy = match bind(&policy_path) {
        Ok(l) => l,
        Err(e) => {
            let _ = fs::remove_file(&control_path);
            return Err(e);
        }
    };
    info!(
        data_dir = %data_dir.display(),
        policy_version = version,
        next_audit_seq = next_seq,
        "psm-control listening"
    );

    let mut tasks = JoinSet::new();
    // after a restart, relays have RELAY_LOST_GRACE to announce their live sessions: retention
    // never runs before it knows them
    let mut next_retention = tokio::time::Instant::now()
        + RELAY_LOST_GRACE.max(shared.options.retention_interval)
        + Duration::from_secs(2);
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = sweep.tick() => {
                shared.sweep(relay_lost_grace);
                shared.approvals_sweep();
                if let Err(e) = lock(&shared.audit).rotate_if_due(psm_control_api::now_ms()) {
                    error!(error = %e, "cannot rotate the audit log");
                }
                if (shared.options.retention.enabled() || shared.options.audit_retention.enabled())
                    && tokio::time::Instant::now() >= next_retention
                {
                    next_retention =
                        tokio::time::Instant::now() + shared.options.retention_interval;
                    let s = shared.clone();
                    tasks.spawn(async move {
                        let _ = tokio::task::spawn_blocking(move || {
                            if s.options.retention.enabled() {
                                s.retention_sweep();
                            }
                            s.audit_retention_sweep();
                        })
                        .await;
                    });
                }
            }
            r = control.accept() => match r {
                Ok((stream, _)) => {
                    tasks.spawn(serve_control(shared.clone(), stream));
                }
                Err(e) => {
                    warn!(error = %e, "accept on control socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            r = policy.accept() => match r {
                Ok((stream, _)) => {
                    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    tasks.spawn(serve_policy(shared.clone(), stream, conn));
                }
                Err(e) => {
                    warn!(error = %e, "accept on policy socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(control);
    drop(policy);
    tasks.shutdown().await;
    if let Err(e) = lock(&shared.audit).checkpoint("shutdown") {
        error!(error = %e, "cannot write the shutdown audit checkpoint");
    }
    shared.siem.stop().await;
    for p in [&control_path, &policy_path] {
        if let Err(e) = fs::remove_file(p) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %p.display(), error = %e, "cannot remove socket");
            }
        }
    }
    info!("psm-control stopped");
    Ok(())
}
