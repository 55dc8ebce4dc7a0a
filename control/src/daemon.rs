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

use psm_control_api::{
    decode_line, encode_line, AuditEvent, AuditKind, ControlToRelay, PasswordHash, PolicySnapshot,
    Protocol, RelayToControl, Secret, MAX_LINE,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use zeroize::{Zeroize, Zeroizing};

use crate::audit::{AuditError, AuditLog};
use crate::datadir::{init_data_dir, load_master_key, DataDir, InitError};
use crate::protocol::{
    Changed, CredentialKind, RelayInfo, Request, Response, SessionInfo, StatusInfo, MAX_REQUEST,
};
use crate::store::{Removed, Store, StoreError};
use crate::validate;
use crate::vault::{Vault, VaultError};

mod approvals;
mod governance;
pub use crate::store::Lockout;
pub use governance::otpauth_uri;

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

struct LiveSession {
    conn: u64,
    info: SessionInfo,
    /// Last byte counts its relay reported.
    bytes_up: u64,
    bytes_down: u64,
    /// When its relay's link dropped (ms since the epoch, and for the grace period).
    lost: Option<(u64, std::time::Instant)>,
}

impl LiveSession {
    fn new(conn: u64, info: SessionInfo) -> LiveSession {
        LiveSession {
            conn,
            info,
            bytes_up: 0,
            bytes_down: 0,
            lost: None,
        }
    }
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
    /// Deletes the recordings retention no longer keeps, each after its `retention` audit
    /// event is written (an event that cannot be written keeps the file).
    fn retention_sweep(&self) {
        let r = self.options.retention;
        let live: std::collections::HashSet<String> = lock(&self.sessions)
            .values()
            .map(|s| s.info.session.recording_id.clone())
            .collect();
        let all = match crate::retention::scan(&self.recordings_dir) {
            Ok(all) => all,
            Err(e) => {
                warn!(dir = %self.recordings_dir.display(), error = %e, "retention cannot list the recordings");
                return;
            }
        };
        let now = psm_control_api::now_ms();
        for (c, why) in crate::retention::select(all, &live, now, &r) {
            let path = self.recordings_dir.join(format!(
                "{}.{}",
                c.id,
                psm_recorder_format::file::EXTENSION
            ));
            let audited = lock(&self.audit).append_control(AuditKind::Retention {
                recording_id: c.id.clone(),
                bytes: c.bytes,
                reason: why.as_str().into(),
                modified_ms: c.modified_ms,
                audit_segment: None,
            });
            if let Err(e) = audited {
                error!(recording_id = %c.id, error = %e, "retention keeps the recording: its deletion cannot be audited");
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    info!(recording_id = %c.id, bytes = c.bytes, reason = why.as_str(), "recording deleted by retention");
                    self.forget_indexed(&c.id);
                }
                Err(e) => {
                    error!(recording_id = %c.id, error = %e, "retention cannot delete the recording");
                    let _ = lock(&self.audit).append_control(AuditKind::Notice {
                        message: format!("retention could not delete recording {}: {e}", c.id),
                        session_id: None,
                        kind: Some("retention failed".into()),
                        count: None,
                    });
                }
            }
        }
    }
}

impl Shared {
    /// Removes a deleted recording's lines from the search index, so that search finds
    /// nothing of it. The index is psm-recorder's (it may be absent, or busy for a moment);
    /// a failure is logged and `psmctl recordings reindex` rebuilds it.
    fn forget_indexed(&self, recording_id: &str) {
        let path = self.recordings_dir.join(psm_recorder_index::INDEX_FILE);
        if !path.exists() {
            return;
        }
        let forgotten =
            psm_recorder_index::IndexWriter::open(&path).and_then(|mut w| w.forget(recording_id));
        if let Err(e) = forgotten {
            warn!(recording_id = %recording_id, error = %e, "the search index still has a recording retention deleted (psmctl recordings reindex removes it)");
        }
    }
}

impl Shared {
    /// Deletes the closed audit segments retention no longer keeps, oldest first, each after
    /// its `retention` audit event (its file, `seq` range and last line's hash) is written.
    /// The audit log stays locked meanwhile, so no rotation runs between the listing and the
    /// deletions.
    fn audit_retention_sweep(&self) {
        let r = self.options.audit_retention;
        if !r.enabled() {
            return;
        }
        let mut audit = lock(&self.audit);
        let closed = match crate::audit::closed_segments(audit.path()) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "retention cannot list the audit segments");
                return;
            }
        };
        let candidates = closed
            .iter()
            .map(|s| crate::retention::Candidate {
                id: s.file.clone(),
                bytes: s.bytes,
                modified_ms: s.modified_ms,
            })
            .collect();
        let now = psm_control_api::now_ms();
        for (c, why) in crate::retention::select_segments(candidates, now, &r) {
            let Some(seg) = closed.iter().find(|s| s.file == c.id) else {
                continue;
            };
            let tail = match crate::audit::segments::segment_tail(&seg.path) {
                Ok(Some(t)) => t,
                Ok(None) => (
                    seg.first_seq.saturating_sub(1),
                    psm_evidence::audit::GENESIS,
                ),
                Err(e) => {
                    error!(segment = %seg.file, error = %e, "retention keeps the audit segment: it cannot be read");
                    break;
                }
            };
            let audited = audit.append_control(AuditKind::Retention {
                recording_id: String::new(),
                bytes: seg.bytes,
                reason: why.as_str().into(),
                modified_ms: seg.modified_ms,
                audit_segment: Some(psm_control_api::AuditSegment {
                    file: seg.file.clone(),
                    first_seq: seg.first_seq,
                    last_seq: tail.0,
                    last_hash: psm_evidence::hex(&tail.1),
                }),
            });
            if let Err(e) = audited {
                error!(segment = %seg.file, error = %e, "retention keeps the audit segment: its deletion cannot be audited");
                break;
            }
            match fs::remove_file(&seg.path) {
                Ok(()) => {
                    info!(segment = %seg.file, first_seq = seg.first_seq, last_seq = tail.0, reason = why.as_str(), "audit segment deleted by retention")
                }
                Err(e) => {
                    error!(segment = %seg.file, error = %e, "retention cannot delete the audit segment");
                    let _ = audit.append_control(AuditKind::Notice {
                        message: format!(
                            "retention could not delete audit segment {}: {e}",
                            seg.file
                        ),
                        session_id: None,
                        kind: Some("retention failed".into()),
                        count: None,
                    });
                    break;
                }
            }
        }
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn removed_suffix(r: &Removed) -> String {
    let mut parts = Vec::new();
    if r.accounts > 0 {
        parts.push(plural(r.accounts, "account", "accounts"));
    }
    if r.grants > 0 {
        parts.push(plural(r.grants, "grant", "grants"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" (and {})", parts.join(", "))
    }
}

impl Shared {
    /// Builds and publishes the snapshot of the store's current state.
    fn publish(&self, store: &mut Store) -> Result<u64, StoreError> {
        let mut snap = store.snapshot(&self.vault)?;
        snap.mfa_required = self.options.mfa_required;
        let line = SnapshotLine::encode(snap);
        let version = line.version;
        self.snapshot.send_replace(Arc::new(line));
        Ok(version)
    }

    fn read<T: serde::Serialize>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError>,
    ) -> Response {
        match f(&lock(&self.store)) {
            Ok(v) => Response::ok(&v),
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Runs one change: store transaction, snapshot push, audit event, in that order and all
    /// under the store lock so versions, pushes and audit lines stay in the same order. `f` may
    /// refine the audited `object` (with what it found in the store).
    fn change(
        &self,
        actor: &Actor,
        action: &str,
        mut object: String,
        f: impl FnOnce(&mut Store, &mut String) -> Result<(u64, String), StoreError>,
    ) -> Response {
        let mut store = lock(&self.store);
        let (version, message) = match f(&mut store, &mut object) {
            Ok(x) => x,
            Err(e) => {
                debug!(action, ?object, error = %e, "change refused");
                return Response::error(e.to_string());
            }
        };
        // The change is saved: audit it whatever happens next.
        let published = self.publish(&mut store);
        let audited = lock(&self.audit).append_control(AuditKind::AdminChange {
            action: action.to_string(),
            object: object.clone(),
            actor_uid: Some(actor.uid),
            actor: actor.name.clone(),
        });
        drop(store);
        if let Err(e) = published {
            error!(action, ?object, error = %e, "change saved but snapshot not built");
            return Response::error(format!(
                "change saved (policy version {version}) but the snapshot could not be built: {e}"
            ));
        }
        if let Err(e) = audited {
            error!(action, ?object, error = %e, "change applied but not audited");
            return Response::error(format!(
                "change applied (policy version {version}) but not audited: {e}"
            ));
        }
        info!(action, ?object, version, actor_uid = actor.uid, actor = ?actor.name, "policy changed");
        Response::ok(&Changed { version, message })
    }

    /// Checks a psm user's new password against the minimum length and hashes it (PBKDF2:
    /// slow, so this runs on the blocking pool like every request).
    fn hash_password(&self, password: &Secret) -> Result<PasswordHash, String> {
        let min = self.options.min_password_length;
        if password.expose().chars().count() < min {
            return Err(format!(
                "password is too short: psm requires at least {min} characters"
            ));
        }
        PasswordHash::new(password.expose()).map_err(|e| format!("cannot hash the password: {e}"))
    }

    /// Answers one request from `actor`. Blocking (store, password hashing): run it on the
    /// blocking pool.
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

    fn handle(&self, req: Request, actor: &Actor) -> Response {
        let req = match self.handle_governance(req, actor) {
            Ok(resp) => return resp,
            Err(req) => req,
        };
        match req {
            Request::Status => {
                let version = self.snapshot.borrow().version;
                let (recordings, recordings_error) = match disk_space(&self.recordings_dir) {
                    Ok(d) => (Some(d), None),
                    Err(e) => (None, Some(e)),
                };
                let rdp_targets: Vec<String> = lock(&self.store)
                    .list_targets()
                    .map(|ts| {
                        ts.into_iter()
                            .filter(|t| t.protocol == Protocol::Rdp)
                            .map(|t| t.name)
                            .collect()
                    })
                    .unwrap_or_default();
                let (sessions, rdp_sessions) = {
                    let live = lock(&self.sessions);
                    let live: Vec<_> = live.values().filter(|s| s.lost.is_none()).collect();
                    let rdp = live
                        .iter()
                        .filter(|s| rdp_targets.contains(&s.info.session.target))
                        .count();
                    (live.len(), rdp)
                };
                Response::ok(&StatusInfo {
                    version,
                    relays: lock(&self.relays).values().cloned().collect(),
                    sessions,
                    rdp_sessions,
                    recordings,
                    recordings_error,
                    siem: self.siem.status(),
                })
            }
            Request::UserAdd {
                name,
                password,
                ssh_keys,
            } => {
                let hash = match password.as_ref().map(|p| self.hash_password(p)).transpose() {
                    Ok(h) => h,
                    Err(e) => return Response::error(e),
                };
                // RDP's NLA checks users by the NT hash of their password: kept sealed.
                let nt = password.as_ref().map(|p| crate::ntlm::nt_hash(p.expose()));
                drop(password);
                self.change(actor, "user add", name.clone(), |s, _| {
                    let v = s.add_user_with_nt_hash(
                        &self.vault,
                        &name,
                        hash.as_ref().zip(nt.as_ref()),
                        &ssh_keys,
                    )?;
                    let mut how = Vec::new();
                    if hash.is_some() {
                        how.push("password".to_string());
                    }
                    if !ssh_keys.is_empty() {
                        how.push(plural(ssh_keys.len(), "ssh key", "ssh keys"));
                    }
                    Ok((v, format!("added user {name} ({})", how.join(", "))))
                })
            }
            Request::UserPasswd { name, password } => {
                let hash = match self.hash_password(&password) {
                    Ok(h) => h,
                    Err(e) => return Response::error(e),
                };
                let nt = crate::ntlm::nt_hash(password.expose());
                drop(password);
                self.change(actor, "user passwd", name.clone(), |s, _| {
                    let v = s.set_password_with_nt_hash(&self.vault, &name, &hash, &nt)?;
                    Ok((v, format!("changed the password of user {name}")))
                })
            }
            Request::UserRemove { name } => {
                self.change(actor, "user remove", name.clone(), |s, _| {
                    let r = s.remove_user(&name)?;
                    Ok((
                        r.version,
                        format!("removed user {name}{}", removed_suffix(&r)),
                    ))
                })
            }
            Request::UserList => self.read(|s| s.list_users()),
            Request::TargetAdd {
                name,
                address,
                host_key,
                protocol,
                listen,
            } => {
                if let (Protocol::Tcp, Some(listen)) = (protocol, &listen) {
                    let object = format!("{name} (tcp, {}, listen {listen})", address.trim());
                    return self.change(actor, "target add", object, |s, _| {
                        let v = s.add_tcp_target(&name, &address, listen)?;
                        Ok((
                            v,
                            format!(
                                "added tcp target {name} ({}), served on {listen}; grant its '{}' account with --unrecorded-tcp",
                                address.trim(),
                                psm_control_api::TCP_ACCOUNT
                            ),
                        ))
                    });
                }
                let object = match protocol {
                    Protocol::Ssh => format!(
                        "{name} ({}, {})",
                        address.trim(),
                        validate::fingerprint(&host_key)
                    ),
                    Protocol::Rdp => format!(
                        "{name} (rdp, {}, certificate {})",
                        address.trim(),
                        validate::fingerprint(&host_key)
                    ),
                    Protocol::Tcp => format!("{name} (tcp, {}, no listen)", address.trim()),
                };
                self.change(actor, "target add", object, |s, _| {
                    let v = s.add_target_with(&name, &address, &host_key, protocol)?;
                    Ok(match protocol {
                        Protocol::Ssh | Protocol::Tcp => {
                            (v, format!("added target {name} ({})", address.trim()))
                        }
                        Protocol::Rdp => (
                            v,
                            format!(
                                "added RDP target {name} ({})",
                                validate::address_for(protocol, &address)?
                            ),
                        ),
                    })
                })
            }
            Request::TargetUpdate {
                name,
                address,
                host_key,
            } => self.change(actor, "target update", name.clone(), |s, object| {
                let (v, before) =
                    s.update_target(&name, address.as_deref(), host_key.as_deref())?;
                let mut what = Vec::new();
                let mut said = Vec::new();
                if let Some(a) = &address {
                    let a = a.trim();
                    what.push(format!("address {} -> {a}", before.address));
                    said.push(format!("address {a}"));
                }
                if let Some(k) = &host_key {
                    let fp = validate::fingerprint(k);
                    let pin = match before.protocol {
                        Protocol::Ssh => "host key",
                        Protocol::Rdp => "certificate",
                        Protocol::Tcp => "pin",
                    };
                    what.push(format!(
                        "{pin} {} -> {fp}",
                        validate::fingerprint(&before.host_key)
                    ));
                    said.push(format!("{pin} {fp}"));
                }
                *object = format!("{name} ({})", what.join(", "));
                Ok((v, format!("updated target {name} ({})", said.join(", "))))
            }),
            Request::TargetRemove { name } => {
                self.change(actor, "target remove", name.clone(), |s, _| {
                    let r = s.remove_target(&name)?;
                    Ok((
                        r.version,
                        format!("removed target {name}{}", removed_suffix(&r)),
                    ))
                })
            }
            Request::TargetList => self.read(|s| s.list_targets()),
            Request::AccountAdd {
                target,
                username,
                credential,
                domain,
            } => {
                let kind = CredentialKind::of(&credential).as_str();
                let what = match &domain {
                    Some(d) => format!("{kind}, domain {}", psm_control_api::escape(d)),
                    None => kind.to_string(),
                };
                let object = format!("{username}@{target} ({what})");
                self.change(actor, "account add", object, |s, _| {
                    let v = s.add_account_with(
                        &self.vault,
                        &target,
                        &username,
                        &credential,
                        domain.as_deref(),
                    )?;
                    Ok((v, format!("added account {username}@{target} ({what})")))
                })
            }
            Request::AccountRemove { target, username } => self.change(
                actor,
                "account remove",
                format!("{username}@{target}"),
                |s, _| {
                    let r = s.remove_account(&target, &username)?;
                    let r = Removed { accounts: 0, ..r };
                    Ok((
                        r.version,
                        format!("removed account {username}@{target}{}", removed_suffix(&r)),
                    ))
                },
            ),
            Request::AccountList => self.read(|s| s.list_accounts()),
            Request::GrantAdd {
                user,
                target,
                account,
                allow_env,
                mut conditions,
            } => {
                conditions.allow_env.extend(allow_env);
                if let Some(bad) = conditions
                    .allow_env
                    .iter()
                    .find(|n| !validate::env_pattern(n))
                {
                    return Response::error(format!(
                        "invalid environment variable name {}: use letters, digits and _, optionally ending in *",
                        psm_control_api::escape(bad)
                    ));
                }
                if let Err(e) = conditions.validate() {
                    return Response::error(e);
                }
                let mut object = format!("{user} -> {account}@{target}");
                let described = conditions.describe();
                if !described.is_empty() {
                    object.push_str(&format!(" ({})", described.join("; ")));
                }
                self.change(actor, "grant add", object.clone(), |s, _| {
                    let v = s.add_grant_with(&user, &target, &account, &conditions)?;
                    Ok((v, format!("added grant {object}")))
                })
            }
            Request::GrantRemove {
                user,
                target,
                account,
            } => {
                let object = format!("{user} -> {account}@{target}");
                self.change(actor, "grant remove", object.clone(), |s, _| {
                    let v = s.remove_grant(&user, &target, &account)?;
                    Ok((v, format!("removed grant {object}")))
                })
            }
            Request::GrantList => self.read(|s| s.list_grants()),
            Request::SessionsList => {
                // the protocol of each session's target, from the store (a sessions list is rare)
                let protocols: HashMap<String, Protocol> = lock(&self.store)
                    .list_targets()
                    .map(|ts| ts.into_iter().map(|t| (t.name, t.protocol)).collect())
                    .unwrap_or_default();
                let mut list: Vec<SessionInfo> = lock(&self.sessions)
                    .values()
                    .filter(|s| s.lost.is_none())
                    .map(|s| SessionInfo {
                        bytes_up: s.bytes_up,
                        bytes_down: s.bytes_down,
                        protocol: protocols
                            .get(&s.info.session.target)
                            .copied()
                            .unwrap_or_default(),
                        ..s.info.clone()
                    })
                    .collect();
                list.sort_by(|a, b| {
                    (a.session.start_ms, &a.session.session_id)
                        .cmp(&(b.session.start_ms, &b.session.session_id))
                });
                Response::ok(&list)
            }
            // every other request is answered by `handle_governance`
            _ => Response::error("internal error: request not handled"),
        }
    }

    /// Records an audit event from a relay: live-session table, then the log.
    fn relay_event(&self, conn: u64, relay_id: &str, mut event: AuditEvent) {
        if event.origin.is_empty() {
            event.origin = format!("relay-{relay_id}");
        }
        match &event.kind {
            AuditKind::SessionStart {
                session_id,
                user,
                source,
                target,
                target_address,
                account,
                recording_id,
                start_ms,
                justification,
                worker,
                recorded,
                ..
            } => {
                lock(&self.sessions).insert(
                    session_id.clone(),
                    LiveSession::new(
                        conn,
                        SessionInfo {
                            session: psm_control_api::LiveSession {
                                session_id: session_id.clone(),
                                user: user.clone(),
                                source: source.clone(),
                                target: target.clone(),
                                target_address: target_address.clone(),
                                account: account.clone(),
                                recording_id: recording_id.clone(),
                                recorded: *recorded,
                                start_ms: *start_ms,
                                justification: justification.clone(),
                                worker: *worker,
                            },
                            relay: relay_id.to_string(),
                            bytes_up: 0,
                            bytes_down: 0,
                            protocol: Protocol::Ssh,
                        },
                    ),
                );
            }
            AuditKind::SessionEnd { session_id, .. } => {
                lock(&self.sessions).remove(session_id);
            }
            kind @ (AuditKind::AuthFailure { .. } | AuditKind::AuthSuccess { .. }) => {
                self.auth_event(kind)
            }
            _ => {}
        }
        if let Err(e) = lock(&self.audit).append(event) {
            error!(%relay_id, error = %e, "cannot write audit event");
        }
    }

    /// A relay's counters and its sessions' progress.
    fn relay_stats(
        &self,
        conn: u64,
        stats: psm_control_api::RelayStats,
        progress: Vec<psm_control_api::SessionProgress>,
    ) {
        if let Some(r) = lock(&self.relays).get_mut(&conn) {
            r.stats = stats;
        }
        let mut sessions = lock(&self.sessions);
        for p in progress {
            if let Some(s) = sessions.get_mut(&p.session_id) {
                if s.conn == conn {
                    s.bytes_up = p.bytes_up;
                    s.bytes_down = p.bytes_down;
                }
            }
        }
    }

    /// A relay's link dropped: its sessions wait for it to come back (see [`Shared::sweep`]).
    fn relay_gone(&self, conn: u64) {
        lock(&self.relays).remove(&conn);
        let now = (psm_control_api::now_ms(), std::time::Instant::now());
        for s in lock(&self.sessions).values_mut() {
            if s.conn == conn && s.lost.is_none() {
                s.lost = Some(now);
            }
        }
    }

    /// Ends the sessions whose relay has been gone for longer than `grace` without announcing
    /// them again: each gets its `session_end` ("relay lost") with what control knows.
    fn sweep(&self, grace: Duration) {
        let expired: Vec<LiveSession> = {
            let mut sessions = lock(&self.sessions);
            let ids: Vec<String> = sessions
                .iter()
                .filter(|(_, s)| s.lost.is_some_and(|(_, at)| at.elapsed() >= grace))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| sessions.remove(id)).collect()
        };
        for s in expired {
            let end_ms = s
                .lost
                .map(|(ms, _)| ms)
                .unwrap_or_else(psm_control_api::now_ms);
            let info = s.info.session;
            let end_ms = end_ms.max(info.start_ms);
            warn!(session = %info.session_id, relay = %s.info.relay, "relay never came back; ending its session");
            let ended = lock(&self.audit).append_control(AuditKind::SessionEnd {
                session_id: info.session_id,
                user: info.user,
                source: info.source,
                target: info.target,
                account: info.account,
                start_ms: info.start_ms,
                end_ms,
                duration_ms: end_ms - info.start_ms,
                bytes_up: s.bytes_up,
                bytes_down: s.bytes_down,
                exit_status: None,
                exit_signal: None,
                recording_id: info.recording_id,
                reason: REASON_RELAY_LOST.into(),
                reason_code: "relay_lost".into(),
                side: "relay".into(),
                justification: info.justification,
                unconfirmed_bytes: None,
            });
            if let Err(e) = ended {
                error!(error = %e, "cannot write session_end for a lost relay's session");
            }
        }
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

async fn serve_control(shared: Arc<Shared>, stream: UnixStream) {
    let peer = stream.peer_cred();
    let (r, mut w) = stream.into_split();
    let reply = |resp: Response| {
        let mut line = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        line
    };
    let uid = match peer {
        Ok(c) if c.uid() == shared.owner_uid => c.uid(),
        other => {
            let why = match other {
                Ok(c) => format!(
                    "permission denied: uid {} does not own the data directory (owner uid {})",
                    c.uid(),
                    shared.owner_uid
                ),
                Err(e) => format!("permission denied: cannot check peer credentials: {e}"),
            };
            warn!(reason = %why, "refused psmctl connection");
            let _ = w.write_all(&reply(Response::error(why))).await;
            return;
        }
    };
    let actor = match tokio::task::spawn_blocking(move || Actor::lookup(uid)).await {
        Ok(a) => a,
        Err(_) => Actor { uid, name: None },
    };
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.zeroize();
        match read_line(&mut reader, &mut buf, MAX_REQUEST).await {
            Ok(Line::Data) => {}
            Ok(Line::Eof) => break,
            Ok(Line::TooLong) => {
                let msg = format!("request longer than {MAX_REQUEST} bytes");
                let _ = w.write_all(&reply(Response::error(msg))).await;
                break;
            }
            Err(e) => {
                debug!(error = %e, "psmctl connection read failed");
                break;
            }
        }
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let resp = match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => {
                let (shared, actor) = (shared.clone(), actor.clone());
                tokio::task::spawn_blocking(move || shared.handle(req, &actor))
                    .await
                    .unwrap_or_else(|e| Response::error(format!("request failed: {e}")))
            }
            Err(e) => Response::error(format!("malformed request: {e}")),
        };
        buf.zeroize();
        if let Err(e) = w.write_all(&reply(resp)).await {
            debug!(error = %e, "psmctl connection write failed");
            break;
        }
    }
    buf.zeroize();
}

async fn serve_policy(shared: Arc<Shared>, stream: UnixStream, conn: u64) {
    match stream.peer_cred() {
        Ok(c) if c.uid() == shared.owner_uid => {}
        Ok(c) => {
            warn!(
                uid = c.uid(),
                owner_uid = shared.owner_uid,
                "refused relay connection: peer does not own the data directory"
            );
            return;
        }
        Err(e) => {
            warn!(error = %e, "refused relay connection: cannot check peer credentials");
            return;
        }
    }
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    let (relay_id, have_version, live) =
        match tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut reader, &mut buf, MAX_LINE)).await
        {
            Ok(Ok(Line::Data)) => match decode_line::<RelayToControl>(&buf) {
                Ok(RelayToControl::Hello {
                    relay_id,
                    have_version,
                    live,
                }) => (relay_id, have_version, live),
                Ok(other) => {
                    warn!(message = ?other, "relay did not start with hello; closing");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "malformed hello from relay; closing");
                    return;
                }
            },
            Ok(Ok(_)) => {
                debug!("relay closed before hello");
                return;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "relay connection failed before hello");
                return;
            }
            Err(_) => {
                warn!("relay sent no hello within {HELLO_TIMEOUT:?}; closing");
                return;
            }
        };
    info!(%relay_id, ?have_version, live = live.len(), "relay connected");
    lock(&shared.relays).insert(
        conn,
        RelayInfo {
            relay_id: relay_id.clone(),
            connected_ms: psm_control_api::now_ms(),
            stats: Default::default(),
        },
    );
    {
        // The relay's running sessions: what a restarted control would otherwise not know.
        let mut sessions = lock(&shared.sessions);
        for session in live {
            // A session of a relay that came back: it is this connection's now, no longer lost,
            // and keeps the byte counts seen so far.
            let id = session.session_id.clone();
            let info = SessionInfo {
                session,
                relay: relay_id.clone(),
                bytes_up: 0,
                bytes_down: 0,
                protocol: Protocol::Ssh,
            };
            match sessions.get_mut(&id) {
                Some(s) => {
                    s.conn = conn;
                    s.info = info;
                    s.lost = None;
                }
                None => {
                    sessions.insert(id, LiveSession::new(conn, info));
                }
            }
        }
    }
    let mut rx = shared.snapshot.subscribe();
    let mut kills = shared.kills.subscribe();
    let writer = async {
        let line = rx.borrow_and_update().clone();
        w.write_all(&line.line).await?;
        drop(line);
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok::<(), io::Error>(());
                    }
                    let line = rx.borrow_and_update().clone();
                    w.write_all(&line.line).await?;
                    debug!(%relay_id, version = line.version, "snapshot sent");
                }
                kill = kills.recv() => match kill {
                    Ok(line) => w.write_all(&line).await?,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(%relay_id, missed = n, "kill requests dropped for a slow relay");
                    }
                    Err(_) => return Ok(()),
                },
            }
        }
    };
    let reader_loop = async {
        loop {
            buf.clear();
            match read_line(&mut reader, &mut buf, MAX_LINE).await? {
                Line::Eof => return Ok::<(), io::Error>(()),
                Line::TooLong => {
                    return Err(io::Error::other(format!(
                        "message longer than {MAX_LINE} bytes"
                    )))
                }
                Line::Data => {}
            }
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            match decode_line::<RelayToControl>(&buf) {
                Ok(RelayToControl::Audit(event)) => shared.relay_event(conn, &relay_id, event),
                Ok(RelayToControl::Hello { .. }) => debug!(%relay_id, "repeated hello ignored"),
                Ok(RelayToControl::Stats { stats, sessions }) => {
                    shared.relay_stats(conn, stats, sessions)
                }
                Ok(RelayToControl::Approval { corr, op }) => {
                    let shared = shared.clone();
                    let relay_id = relay_id.clone();
                    tokio::task::spawn_blocking(move || shared.approval(&relay_id, corr, op));
                }
                Ok(RelayToControl::MfaUsed { user, step }) => {
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || shared.mfa_used(&user, step));
                }
                Ok(RelayToControl::Rehash { user, old, new }) => {
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || shared.rehash(&user, &old, &new));
                }
                Err(e) => warn!(%relay_id, error = %e, "malformed message from relay"),
            }
        }
    };
    let res = tokio::select! {
        r = writer => r,
        r = reader_loop => r,
    };
    shared.relay_gone(conn);
    match res {
        Ok(()) => info!(%relay_id, "relay disconnected"),
        Err(e) => warn!(%relay_id, error = %e, "relay connection lost"),
    }
}

/// Free space and inodes of the file system holding `dir`.
fn disk_space(dir: &Path) -> Result<crate::protocol::DiskSpace, String> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let frag = st.fragment_size() as u64;
    Ok(crate::protocol::DiskSpace {
        path: dir.display().to_string(),
        free_bytes: (st.blocks_available() as u64).saturating_mul(frag),
        total_bytes: (st.blocks() as u64).saturating_mul(frag),
        free_inodes: st.files_available() as u64,
    })
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
    init_data_dir(&data_dir)?;
    let paths = DataDir::new(&data_dir);
    let owner_uid = paths.owner_uid()?;
    let me = nix::unistd::geteuid().as_raw();
    if owner_uid != me {
        // Relays and psmctl run as the same user as psm-control; they would all be refused.
        return Err(ControlError::NotOwner {
            path: data_dir.clone(),
            owner: owner_uid,
            me,
        });
    }
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
                shared.sweep(RELAY_LOST_GRACE);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;
    use crate::testkeys::USER_PUB;
    use psm_control_api::{Credential, Secret};
    use tokio::io::AsyncWriteExt;
    use tokio::net::unix::OwnedReadHalf;
    use tokio::sync::oneshot;

    struct Daemon {
        dir: PathBuf,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), ControlError>>,
    }

    impl Daemon {
        async fn start(dir: &Path) -> Daemon {
            Daemon::start_with(dir, Options::default()).await
        }

        async fn start_with(dir: &Path, options: Options) -> Daemon {
            let (tx, rx) = oneshot::channel::<()>();
            let d = dir.to_path_buf();
            let task = tokio::spawn(run_until_with(d, options, async move {
                let _ = rx.await;
            }));
            let sock = dir.join("policy.sock");
            for _ in 0..200 {
                if sock.exists() && dir.join("control.sock").exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(sock.exists(), "daemon did not start");
            Daemon {
                dir: dir.to_path_buf(),
                stop: Some(tx),
                task,
            }
        }

        async fn stop(mut self) {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            let res = tokio::time::timeout(Duration::from_secs(5), &mut self.task)
                .await
                .expect("daemon stops in time")
                .expect("daemon task");
            res.expect("daemon result");
            assert!(!self.dir.join("control.sock").exists());
            assert!(!self.dir.join("policy.sock").exists());
        }

        /// One request through control.sock, on a blocking thread (the client is blocking).
        async fn call(&self, req: Request) -> Result<serde_json::Value, String> {
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || {
                Client::connect(&dir)
                    .and_then(|mut c| c.call(&req))
                    .map_err(|e| e.to_string())
            })
            .await
            .expect("blocking task")
        }

        async fn change(&self, req: Request) -> u64 {
            let v = self.call(req).await.expect("change accepted");
            serde_json::from_value::<Changed>(v)
                .expect("changed")
                .version
        }
    }

    struct FakeRelay {
        reader: BufReader<OwnedReadHalf>,
        writer: tokio::net::unix::OwnedWriteHalf,
    }

    impl FakeRelay {
        async fn connect(dir: &Path, id: &str) -> FakeRelay {
            let s = UnixStream::connect(dir.join("policy.sock"))
                .await
                .expect("connect policy.sock");
            let (r, w) = s.into_split();
            let mut relay = FakeRelay {
                reader: BufReader::new(r),
                writer: w,
            };
            relay
                .send(&RelayToControl::Hello {
                    live: Vec::new(),
                    relay_id: id.into(),
                    have_version: None,
                })
                .await;
            relay
        }

        async fn send(&mut self, msg: &RelayToControl) {
            self.writer
                .write_all(&encode_line(msg))
                .await
                .expect("send");
        }

        async fn snapshot(&mut self) -> PolicySnapshot {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(1), self.reader.read_line(&mut line))
                .await
                .expect("a snapshot within 1 s")
                .expect("read");
            assert!(n > 0, "policy socket closed");
            let ControlToRelay::Snapshot(s) = decode_line(line.as_bytes()).expect("snapshot line")
            else {
                panic!("not a snapshot");
            };
            s
        }
    }

    fn audit_lines(dir: &Path) -> Vec<AuditEvent> {
        fs::read_to_string(dir.join("audit.jsonl"))
            .expect("audit log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line"))
            .collect()
    }

    fn session_start(id: &str) -> AuditEvent {
        AuditEvent {
            seq: 0,
            ts_ms: 1000,
            origin: "relay-r1".into(),
            kind: AuditKind::SessionStart {
                session_id: id.into(),
                user: "alice".into(),
                source: "127.0.0.1:5555".into(),
                target: "web01".into(),
                target_address: "127.0.0.1:22".into(),
                account: "root".into(),
                recording_id: format!("rec-{id}"),
                start_ms: 1000,
                justification: None,
                worker: None,
                recorded: true,
            },
        }
    }

    async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
        for _ in 0..100 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn relays_get_snapshots_and_send_audit_events() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let d = Daemon::start(&dir).await;
        for sock in ["control.sock", "policy.sock"] {
            let mode = fs::metadata(dir.join(sock))
                .expect("sock")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{sock}");
        }

        let mut relay = FakeRelay::connect(&dir, "r1").await;
        let first = relay.snapshot().await;
        assert_eq!(first.version, 1);
        assert!(first.recording_required);
        assert!(first.users.is_empty());

        let v1 = d
            .change(Request::UserAdd {
                name: "alice".into(),
                password: Some(Secret::new("correct horse battery".into())),
                ssh_keys: vec![USER_PUB.into()],
            })
            .await;
        let s = relay.snapshot().await;
        assert_eq!(s.version, v1);
        assert!(v1 > first.version);
        assert_eq!(s.users[0].ssh_keys, vec![USER_PUB.to_string()]);

        d.change(Request::TargetAdd {
            name: "web01".into(),
            address: "127.0.0.1:22".into(),
            host_key: USER_PUB.into(),
            protocol: Protocol::Ssh,
            listen: None,
        })
        .await;
        relay.snapshot().await;
        d.change(Request::AccountAdd {
            target: "web01".into(),
            username: "root".into(),
            credential: Credential::Password(Secret::new("hunter2".into())),
            domain: None,
        })
        .await;
        relay.snapshot().await;
        let v4 = d
            .change(Request::GrantAdd {
                user: "alice".into(),
                target: "web01".into(),
                account: "root".into(),
                allow_env: Vec::new(),
                conditions: Default::default(),
            })
            .await;
        let s = relay.snapshot().await;
        assert_eq!(s.version, v4);
        let (_, account) = s
            .authorize_local("alice", "root", "web01")
            .expect("granted");
        assert_eq!(
            account.credential,
            Credential::Password(Secret::new("hunter2".into()))
        );

        // refused changes push nothing and say why
        let e = d
            .call(Request::GrantAdd {
                user: "bob".into(),
                target: "web01".into(),
                account: "root".into(),
                allow_env: Vec::new(),
                conditions: Default::default(),
            })
            .await
            .expect_err("unknown user");
        assert_eq!(e, "unknown user 'bob'");

        // a second relay gets the latest snapshot right away
        let mut relay2 = FakeRelay::connect(&dir, "r2").await;
        assert_eq!(relay2.snapshot().await.version, v4);

        // lists never carry secrets
        let accounts = d.call(Request::AccountList).await.expect("list");
        assert!(!accounts.to_string().contains("hunter2"));
        let status: StatusInfo =
            serde_json::from_value(d.call(Request::Status).await.expect("status")).expect("status");
        assert_eq!(status.version, v4);
        assert_eq!(status.relays.len(), 2);

        // audit events from a relay are numbered after control's own
        relay
            .send(&RelayToControl::Audit(session_start("s1")))
            .await;
        wait_for("session_start in the audit log", || {
            audit_lines(&dir).len() == 5
        })
        .await;
        let events = audit_lines(&dir);
        let me = Actor::lookup(nix::unistd::geteuid().as_raw());
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(events[3].origin, "control");
        assert_eq!(
            events[3].kind,
            AuditKind::AdminChange {
                action: "grant add".into(),
                object: "alice -> root@web01".into(),
                actor_uid: Some(me.uid),
                actor: me.name.clone(),
            }
        );
        assert!(matches!(events[4].kind, AuditKind::SessionStart { .. }));
        assert_eq!(events[4].origin, "relay-r1");
        let text = fs::read_to_string(dir.join("audit.jsonl")).expect("audit");
        assert!(!text.contains("hunter2"));

        let sessions: Vec<SessionInfo> =
            serde_json::from_value(d.call(Request::SessionsList).await.expect("sessions"))
                .expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].relay, "r1");
        relay
            .send(&RelayToControl::Audit(AuditEvent {
                seq: 0,
                ts_ms: 2000,
                origin: "relay-r1".into(),
                kind: AuditKind::SessionEnd {
                    session_id: "s1".into(),
                    user: "alice".into(),
                    source: "127.0.0.1:5555".into(),
                    target: "web01".into(),
                    account: "root".into(),
                    start_ms: 1000,
                    end_ms: 2000,
                    duration_ms: 1000,
                    bytes_up: 1,
                    bytes_down: 2,
                    exit_status: Some(0),
                    exit_signal: None,
                    recording_id: "rec-s1".into(),
                    reason: "client closed".into(),
                    reason_code: "client_closed".into(),
                    side: "client".into(),
                    justification: None,
                    unconfirmed_bytes: None,
                },
            }))
            .await;
        relay
            .send(&RelayToControl::Audit(session_start("s2")))
            .await;
        wait_for("two more events", || audit_lines(&dir).len() == 7).await;
        let sessions: Vec<SessionInfo> =
            serde_json::from_value(d.call(Request::SessionsList).await.expect("sessions"))
                .expect("sessions");
        assert_eq!(
            sessions
                .iter()
                .map(|s| s.session.session_id.as_str())
                .collect::<Vec<_>>(),
            vec!["s2"]
        );

        // a relay that goes away takes its live sessions with it
        drop(relay);
        let mut empty = false;
        for _ in 0..100 {
            let v = d.call(Request::SessionsList).await.expect("sessions");
            if v.as_array().is_some_and(|a| a.is_empty()) {
                empty = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(empty, "sessions of a gone relay are dropped");

        // a removal pushes too
        let v5 = d
            .change(Request::UserRemove {
                name: "alice".into(),
            })
            .await;
        let s = relay2.snapshot().await;
        assert_eq!(s.version, v5);
        assert!(s.grants.is_empty());

        d.stop().await;

        // the version and the audit sequence survive a restart
        let d = Daemon::start(&dir).await;
        let mut relay = FakeRelay::connect(&dir, "r1").await;
        assert_eq!(relay.snapshot().await.version, v5);
        let v6 = d
            .change(Request::TargetRemove {
                name: "web01".into(),
            })
            .await;
        assert_eq!(v6, v5 + 1);
        assert_eq!(relay.snapshot().await.version, v6);
        let events = audit_lines(&dir);
        // 8 events, the shutdown checkpoint (9), then the target removal
        assert_eq!(events.last().map(|e| e.seq), Some(10));
        assert!(
            events.iter().any(|e| matches!(&e.kind, AuditKind::Notice { kind: Some(k), .. } if k == "audit checkpoint")),
            "no shutdown checkpoint: {events:?}"
        );
        d.stop().await;
    }

    #[tokio::test]
    async fn mfa_required_by_configuration_is_in_every_snapshot() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let d = Daemon::start_with(
            &dir,
            Options {
                mfa_required: true,
                ..Options::default()
            },
        )
        .await;
        let mut relay = FakeRelay::connect(&dir, "r1").await;
        assert!(relay.snapshot().await.mfa_required, "first snapshot");
        d.change(Request::GroupAdd {
            name: "ops".into(),
            targets: false,
        })
        .await;
        assert!(relay.snapshot().await.mfa_required, "after a change");
        d.stop().await;
    }

    #[tokio::test]
    async fn the_daemon_checks_and_hashes_passwords_and_names_the_actor() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let d = Daemon::start_with(
            &dir,
            Options {
                lockout: Default::default(),
                mfa_required: false,
                min_password_length: 20,
                ..Default::default()
            },
        )
        .await;
        let mut relay = FakeRelay::connect(&dir, "r1").await;
        relay.snapshot().await;
        let nineteen = "0123456789abcdefghi";
        let twenty = "0123456789abcdefghij";
        let add = |pw: &str| Request::UserAdd {
            name: "alice".into(),
            password: Some(Secret::new(pw.into())),
            ssh_keys: Vec::new(),
        };
        let e = d.call(add(nineteen)).await.expect_err("too short");
        assert_eq!(
            e,
            "password is too short: psm requires at least 20 characters"
        );
        // characters, not bytes: 19 two-byte characters are still too short
        let e = d.call(add(&"é".repeat(19))).await.expect_err("too short");
        assert!(e.contains("at least 20"), "{e}");
        let v = d.change(add(twenty)).await;
        let snap = relay.snapshot().await;
        assert_eq!(snap.version, v);
        let hash = snap.users[0].password.clone().expect("a verifier");
        assert!(hash.verify(twenty));

        let passwd = |pw: &str| Request::UserPasswd {
            name: "alice".into(),
            password: Secret::new(pw.into()),
        };
        let e = d.call(passwd(nineteen)).await.expect_err("too short");
        assert!(e.contains("at least 20"), "{e}");
        d.change(passwd("an even longer passphrase")).await;
        let snap = relay.snapshot().await;
        let hash = snap.users[0].password.clone().expect("a verifier");
        assert!(hash.verify("an even longer passphrase") && !hash.verify(twenty));

        // a client that hashes for itself (the old protocol) cannot skip the check
        let s = UnixStream::connect(dir.join("control.sock"))
            .await
            .expect("connect");
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(
            br#"{"cmd":"user_add","name":"bob","password":{"iterations":1,"salt":"AAAAAAAAAAA=","hash":"AAAA"}}
"#,
        )
        .await
        .expect("write");
        let mut line = String::new();
        r.read_line(&mut line).await.expect("read");
        let resp: Response = serde_json::from_str(&line).expect("response");
        assert!(
            resp.error
                .unwrap_or_default()
                .starts_with("malformed request"),
            "{line}"
        );

        // every change names who made it; no password is in the log
        let me = Actor::lookup(nix::unistd::geteuid().as_raw());
        let events = audit_lines(&dir);
        assert_eq!(
            events.len(),
            2,
            "refused changes are not audited: {events:?}"
        );
        for (e, action) in events.iter().zip(["user add", "user passwd"]) {
            assert_eq!(
                e.kind,
                AuditKind::AdminChange {
                    action: action.into(),
                    object: "alice".into(),
                    actor_uid: Some(me.uid),
                    actor: me.name.clone(),
                }
            );
        }
        if me.uid == 0 {
            assert_eq!(me.name.as_deref(), Some("root"));
        }
        let text = fs::read_to_string(dir.join("audit.jsonl")).expect("audit");
        assert!(!text.contains(twenty) && !text.contains("longer passphrase"));
        d.stop().await;
    }

    #[tokio::test]
    async fn target_update_keeps_accounts_and_pushes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let d = Daemon::start(&dir).await;
        let mut relay = FakeRelay::connect(&dir, "r1").await;
        relay.snapshot().await;
        d.change(Request::UserAdd {
            name: "alice".into(),
            password: None,
            ssh_keys: vec![USER_PUB.into()],
        })
        .await;
        d.change(Request::TargetAdd {
            name: "web01".into(),
            address: "127.0.0.1:22".into(),
            host_key: USER_PUB.into(),
            protocol: Protocol::Ssh,
            listen: None,
        })
        .await;
        d.change(Request::AccountAdd {
            target: "web01".into(),
            username: "root".into(),
            credential: Credential::Password(Secret::new("hunter2".into())),
            domain: None,
        })
        .await;
        d.change(Request::GrantAdd {
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            allow_env: Vec::new(),
            conditions: Default::default(),
        })
        .await;
        for _ in 0..4 {
            relay.snapshot().await;
        }
        let v = d
            .change(Request::TargetUpdate {
                name: "web01".into(),
                address: Some("127.0.0.1:2200".into()),
                host_key: Some(crate::testkeys::OTHER_PUB.into()),
            })
            .await;
        let snap = relay.snapshot().await;
        assert_eq!(snap.version, v);
        let (target, account) = snap
            .authorize_local("alice", "root", "web01")
            .expect("granted");
        assert_eq!(target.address, "127.0.0.1:2200");
        assert_eq!(target.host_key, crate::testkeys::OTHER_PUB);
        assert_eq!(account.username, "root");
        let e = d
            .call(Request::TargetUpdate {
                name: "db01".into(),
                address: Some("127.0.0.1:2200".into()),
                host_key: None,
            })
            .await
            .expect_err("unknown");
        assert_eq!(e, "unknown target 'db01'");
        let last = audit_lines(&dir).pop().expect("an event");
        match last.kind {
            AuditKind::AdminChange { action, object, .. } => {
                assert_eq!(action, "target update");
                assert!(
                    object.starts_with("web01 (address 127.0.0.1:22 -> 127.0.0.1:2200, host key "),
                    "{object}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        d.stop().await;
    }

    #[tokio::test]
    async fn bad_requests_and_a_second_daemon_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let d = Daemon::start(&dir).await;
        let e = run_until(dir.clone(), async {})
            .await
            .expect_err("second daemon");
        assert!(e.to_string().contains("already serving"), "{e}");

        // raw protocol: malformed line, then a good one on the same connection
        let s = UnixStream::connect(dir.join("control.sock"))
            .await
            .expect("connect");
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"cmd\":\"launch_missiles\"}\n{\"cmd\":\"user_list\"}\n")
            .await
            .expect("write");
        let mut line = String::new();
        r.read_line(&mut line).await.expect("read");
        let resp: Response = serde_json::from_str(&line).expect("response");
        assert!(!resp.ok);
        assert!(resp
            .error
            .unwrap_or_default()
            .starts_with("malformed request"));
        line.clear();
        r.read_line(&mut line).await.expect("read");
        assert_eq!(line, "{\"ok\":true,\"result\":[]}\n");

        // a relay that does not say hello gets nothing, and the daemon carries on
        let mut bad = UnixStream::connect(dir.join("policy.sock"))
            .await
            .expect("connect");
        bad.write_all(b"{\"type\":\"bogus\"}\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), bad.read_to_end(&mut buf))
            .await
            .expect("closed")
            .expect("read");
        assert_eq!(n, 0);
        assert!(d.call(Request::UserList).await.is_ok());
        d.stop().await;
    }

    #[tokio::test]
    async fn a_data_directory_of_another_user_is_refused_at_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        init_data_dir(&dir).expect("init");
        let me = nix::unistd::geteuid().as_raw();
        let other = if me == 4242 { 4343 } else { 4242 };
        if std::os::unix::fs::chown(&dir, Some(other), None).is_err() {
            panic!("this test must run as root: it chowns a directory to uid {other}");
        }
        let e = run_until(dir.clone(), std::future::pending())
            .await
            .expect_err("refused");
        assert!(
            matches!(e, ControlError::NotOwner { owner, .. } if owner == other),
            "{e}"
        );
        assert!(
            e.to_string().contains(&format!("owned by uid {other}")),
            "{e}"
        );
        assert!(!dir.join("control.sock").exists(), "no socket left behind");
    }

    #[tokio::test]
    async fn only_the_data_directory_owner_may_connect() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        init_data_dir(&dir).expect("init");
        let d = Daemon::start(&dir).await;
        // Open the directory and both sockets to everybody, as a careless operator might: the
        // peer-credential check still refuses a stranger.
        for (p, mode) in [
            (tmp.path().to_path_buf(), 0o755),
            (dir.clone(), 0o755),
            (dir.join("control.sock"), 0o666),
            (dir.join("policy.sock"), 0o666),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let stranger = async |socket: &str, line: &str| {
            let out = tokio::process::Command::new("setpriv")
                .args([
                    "--reuid=4242",
                    "--regid=4242",
                    "--clear-groups",
                    "/usr/bin/python3",
                    "-c",
                ])
                .arg(
                    "import socket,sys\n\
                     s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n\
                     data=b''\n\
                     try:\n\
                     \x20 if sys.argv[2]: s.sendall(sys.argv[2].encode())\n\
                     \x20 while True:\n\
                     \x20   b=s.recv(65536)\n\
                     \x20   if not b: break\n\
                     \x20   data+=b\n\
                     except (ConnectionResetError, BrokenPipeError):\n\
                     \x20 pass\n\
                     sys.stdout.write(data.decode())",
                )
                .arg(dir.join(socket))
                .arg(line)
                .output()
                .await
                .expect("setpriv (util-linux) runs");
            assert!(
                out.status.success(),
                "stranger client failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        // the refusal comes unasked, before any request is read
        let answer = stranger("control.sock", "").await;
        assert!(answer.contains("permission denied: uid 4242"), "{answer}");
        let hello = String::from_utf8(encode_line(&RelayToControl::Hello {
            live: Vec::new(),
            relay_id: "x".into(),
            have_version: None,
        }))
        .expect("utf8");
        assert_eq!(
            stranger("policy.sock", &hello).await,
            "",
            "no snapshot for a stranger"
        );
        assert!(
            d.call(Request::UserList).await.is_ok(),
            "the owner still is served"
        );
        d.stop().await;
    }
}
