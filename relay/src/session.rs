//! One user connection: authentication, the access decision, the target leg, and the relaying
//! of every channel between the two legs.
//!
//! The russh server handler ([`Conn`]) stays thin: it authenticates against the policy snapshot,
//! asks [`PolicySnapshot::authorize`](psm_control_api::PolicySnapshot::authorize) for the
//! decision, connects the target leg ([`crate::upstream`]), forwards channel requests and hands
//! each started channel to four small tasks (a reader and a writer per direction) joined by
//! [`crate::flow::Flow`]. Every task stays on the worker thread that accepted the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use psm_control_api::{
    decide, now_ms, Attempt, AuditKind, ChannelKind, Escaped, Governor, LiveSession, Login,
    PolicySnapshot, RelayToControl, Verdict,
};
use psm_recorder_format::{CloseSummary, RecordingMeta};
use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelWriteHalf, MethodKind, MethodSet,
    Pty, Sig,
};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::control_link::{AuditSink, Counters, KillSwitch, PolicyStore, SessionBytes};
use crate::cut::Cuttable;
use crate::end::EndReason;
use crate::flow::{Flow, WindowMirror, WINDOW};
use crate::mfa::{Mfa, Throttle};
use crate::notices::Notices;
use crate::pipe::{
    account_down, down_item, read_client, read_target, record_down, write_client, write_target,
};
use crate::prestart::{Early, PreStart, MAX_PRESTART_REQUESTS};
use crate::recording::{RecordingStream, StreamStatus, WorkerRecorder};
use crate::startups::{LogLimiter, Permit, Startups, UserPermit, UserSlots};
use crate::upstream::{self, LossWatch, TargetHandle};
use crate::Limits;

mod login;

/// What the user is told when recording is required and psm-recorder cannot take the session.
pub const RECORDING_UNAVAILABLE: &str = "psm: session recording is unavailable; try again later";
/// How long the relay waits for the target to answer a channel request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Session channels one connection may have open at once (as OpenSSH's `MaxSessions`).
pub const MAX_CHANNELS: usize = 10;
/// Longest login name written whole to the audit log and the relay's log.
pub const MAX_LOGGED_LOGIN: usize = 256;
/// How long a connection told to go may take to close before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Largest terminal size psm passes on and records; larger requests are clamped.
pub const MAX_PTY_CELLS: u32 = 4096;
/// Largest terminal size in pixels psm passes on.
pub const MAX_PTY_PIXELS: u32 = 65_535;
/// Messages a target may send on a channel while psm waits for its answer to a request.
const MAX_EARLY_MESSAGES: usize = 1024;

/// A pty size as psm passes it on: each side at most [`MAX_PTY_CELLS`].
pub fn clamp_cells(v: u32) -> u32 {
    v.min(MAX_PTY_CELLS)
}

/// A pty size as psm records it: clamped, and 80x24 where the client gave none (0).
pub fn recorded_size(cols: u32, rows: u32) -> (u32, u32) {
    let or = |v: u32, d: u32| if v == 0 { d } else { clamp_cells(v) };
    (or(cols, 80), or(rows, 24))
}

/// What every connection on one worker shares.
pub struct WorkerCtx {
    /// This worker's index (its core).
    pub worker: usize,
    /// Policy in force.
    pub policy: Arc<PolicyStore>,
    /// Audit events to control.
    pub audit: AuditSink,
    /// This worker's recording queue.
    pub recorder: WorkerRecorder,
    /// russh server configuration (host key, algorithms, limits).
    pub server_config: Arc<russh::server::Config>,
    /// Becomes `true` when the relay stops: every connection is closed and accounted for.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Connections alive on all workers.
    pub live: Arc<AtomicUsize>,
    /// Sessions running on this relay (announced to control on reconnect).
    pub sessions: Arc<crate::control_link::LiveSessions>,
    /// Timeouts and caps.
    pub limits: Arc<Limits>,
    /// The relay-wide table of unauthenticated connections.
    pub startups: Arc<Startups>,
    /// The relay's counters.
    pub counters: Arc<Counters>,
    /// Rate limit of the log lines about pre-authentication failures (relay-wide).
    pub preauth_log: Arc<Mutex<LogLimiter>>,
    /// The relay-wide table of authenticated connections per user.
    pub user_slots: Arc<UserSlots>,
    /// TOTP steps used and the MFA cache (relay-wide).
    pub mfa: Arc<Mfa>,
    /// Dual-control calls to psm-control (relay-wide).
    pub approvals: Arc<crate::control_link::ApprovalRpc>,
    /// Failed logins per source and per user (relay-wide).
    pub throttle: Arc<Throttle>,
}

impl WorkerCtx {
    /// Counts a connection that failed before authenticating and logs it, rate-limited.
    fn preauth_failure(&self, peer: SocketAddr, why: &dyn std::fmt::Display) {
        Counters::bump(&self.counters.preauth_failures);
        let allowed = match self.preauth_log.lock() {
            Ok(mut l) => l.allow(Instant::now()),
            Err(p) => p.into_inner().allow(Instant::now()),
        };
        if let Some(suppressed) = allowed {
            let why = why.to_string();
            if suppressed > 0 {
                info!(%peer, reason = %Escaped(&why), suppressed, "connection failed before authentication (earlier lines suppressed)");
            } else {
                info!(%peer, reason = %Escaped(&why), "connection failed before authentication");
            }
        }
    }
}

struct SessionInfo {
    user: String,
    target: String,
    account: String,
    recording_id: String,
    justification: Option<String>,
}

#[derive(Default)]
pub(crate) struct SharedState {
    info: Option<SessionInfo>,
    recording: Option<RecordingStream>,
    targets: Vec<Arc<TargetHandle>>,
    pub(crate) exit_status: Option<u32>,
    pub(crate) exit_signal: Option<String>,
    end: Option<EndReason>,
    /// The policy side of the session, once it started.
    governor: Option<Governor>,
    /// Channels relaying now (where an end-of-session line is written).
    running: Vec<ChannelId>,
}

/// State of one connection that outlives the russh handler (for the end-of-session record).
pub(crate) struct Shared {
    session_id: String,
    peer: SocketAddr,
    start_ms: u64,
    pub(crate) bytes: Arc<SessionBytes>,
    authenticated: AtomicBool,
    /// Notified when psm-recorder can no longer write this session's recording.
    recording_lost: Notify,
    /// Notified when the client broke the protocol (the reason is in the state's `end`).
    violation: Notify,
    /// The connection's aggregated notices.
    pub(crate) notices: Arc<Notices>,
    /// Channels whose relaying finished (russh does not call `channel_close` when the target
    /// closed them): the handler drops them from its tables.
    finished: Mutex<Vec<ChannelId>>,
    /// An operator's kill arrives here.
    kill: Arc<KillSwitch>,
    /// Notified when the relay itself ends the session (a command rule that terminates).
    stopped: Notify,
    /// The login waits for an approval: the login grace time does not run meanwhile.
    pub(crate) awaiting: AtomicBool,
    /// The policy in force (for command decisions on the relay tasks).
    policy: Arc<PolicyStore>,
    /// Audit events.
    audit: AuditSink,
    /// Notified when the session starts (its governor is set).
    governed: Notify,
    state: Mutex<SharedState>,
}

impl Shared {
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut SharedState) -> R) -> R {
        match self.state.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
    fn recording(&self) -> Option<RecordingStream> {
        self.with(|s| s.recording.clone())
    }
    /// Records why the session ended; the first reason given wins.
    pub(crate) fn ended(&self, why: EndReason) {
        self.with(|s| {
            s.end.get_or_insert(why);
        });
    }

    /// The relay ends the session with `why` (the first reason wins).
    pub(crate) fn stop(&self, why: EndReason) {
        self.ended(why);
        self.stopped.notify_one();
    }

    /// Decides one command line on channel `channel` under the policy in force now, and audits
    /// it (`source`: `exec`, `shell` or `stdin`).
    pub(crate) fn decide_command(
        &self,
        channel: u32,
        line: &str,
        source: &str,
    ) -> psm_control_api::CommandVerdict {
        let snap = self.policy.get();
        let (gov, info) = self.with(|s| {
            (
                s.governor.clone(),
                s.info
                    .as_ref()
                    .map(|i| (i.user.clone(), i.target.clone(), i.account.clone())),
            )
        });
        let verdict = gov
            .and_then(|g| {
                let permit = decide(
                    &snap,
                    &Attempt {
                        user: &g.user,
                        account: &g.account,
                        target: &g.target,
                        source: g.source,
                        now_ms: now_ms(),
                    },
                )
                .ok()?;
                let user = snap.user(&g.user)?;
                Some(
                    psm_control_api::CommandPolicy::for_session(&snap, permit.grant, user)
                        .check(line),
                )
            })
            // no grant covers the session any more: nothing runs (the governor ends it)
            .unwrap_or(psm_control_api::CommandVerdict {
                action: psm_control_api::CommandAction::Deny,
                rule: None,
                pattern: None,
            });
        let (user, target, account) = info.unwrap_or_default();
        let (kept, _) = psm_control_api::escape::truncate(line, 4096);
        if verdict.action != psm_control_api::CommandAction::Allow {
            info!(session = %self.session_id, line = %Escaped(kept), decision = %verdict.action, "command control");
        }
        self.audit.emit(AuditKind::Command {
            session_id: self.session_id.clone(),
            user,
            target,
            account,
            channel,
            line: kept.to_string(),
            decision: verdict.action.to_string(),
            rule: verdict.rule,
            source: source.to_string(),
        });
        verdict
    }

    /// The client broke the protocol: the connection is closed with `why`.
    pub(crate) fn violated(&self, why: String) {
        warn!(session = %self.session_id, peer = %self.peer, reason = %Escaped(&why), "client protocol violation; disconnecting");
        self.with(|s| s.end = Some(EndReason::ClientViolation(why)));
        self.violation.notify_one();
    }
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let ms = now_ms();
    format!(
        "{ms:011x}{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// A login name as the audit log and the relay's log keep it: at most [`MAX_LOGGED_LOGIN`]
/// bytes, marked when cut.
pub fn logged_login(login: &str) -> String {
    let (kept, cut) = psm_control_api::escape::truncate(login, MAX_LOGGED_LOGIN);
    if cut {
        format!("{kept}…[truncated, {} bytes]", login.len())
    } else {
        kept.to_string()
    }
}

/// Serves one accepted TCP connection to its end, then writes the end-of-session records.
pub async fn handle_connection(
    ctx: Arc<WorkerCtx>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let _live = LiveGuard::new(&ctx.live);
    Counters::bump(&ctx.counters.connections);
    let permit = match ctx.startups.admit(peer.ip()) {
        Ok(p) => p,
        Err(refusal) => {
            // Dropping the stream closes it before any SSH byte is sent, as OpenSSH does.
            Counters::bump(&ctx.counters.startups_refused);
            ctx.preauth_failure(peer, &format_args!("refused: {refusal}"));
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (stream, cutter) = Cuttable::new(stream);
    let session_id = new_id();
    let shared = Arc::new(Shared {
        notices: Arc::new(Notices::new(ctx.audit.clone(), session_id.clone())),
        session_id,
        peer,
        start_ms: now_ms(),
        bytes: Arc::new(SessionBytes::default()),
        authenticated: AtomicBool::new(false),
        recording_lost: Notify::new(),
        violation: Notify::new(),
        finished: Mutex::new(Vec::new()),
        kill: Arc::new(KillSwitch::default()),
        stopped: Notify::new(),
        awaiting: AtomicBool::new(false),
        policy: ctx.policy.clone(),
        audit: ctx.audit.clone(),
        governed: Notify::new(),
        state: Mutex::new(SharedState::default()),
    });
    let conn = Conn {
        ctx: ctx.clone(),
        shared: shared.clone(),
        login: String::new(),
        user: None,
        started: false,
        permit: Some(permit),
        user_permit: None,
        window: WindowMirror::new(WINDOW),
        pending: None,
        reason: None,
        approval_watch: None,
        mfa_tries: 0,
        conditions: Default::default(),
        channels: HashMap::new(),
        flows: HashMap::new(),
    };
    let grace_end = tokio::time::Instant::now() + ctx.limits.login_grace;
    let start = russh::server::run_stream(ctx.server_config.clone(), stream, conn);
    let running = match tokio::time::timeout_at(grace_end, start).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            ctx.preauth_failure(peer, &format_args!("ssh handshake failed: {e}"));
            return;
        }
        Err(_) => {
            cutter.cut();
            ctx.preauth_failure(peer, &"no ssh identification within the login grace time");
            return;
        }
    };
    let handle = running.handle();
    let mut link = ctx.recorder.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    tokio::pin!(running);
    let grace = tokio::time::sleep_until(grace_end);
    tokio::pin!(grace);
    let mut grace_over = false;
    let mut reason: Option<EndReason> = None;
    let policy = govern(&ctx, &shared);
    tokio::pin!(policy);
    let kick = loop {
        tokio::select! {
            stop = &mut policy => {
                info!(session = %shared.session_id, reason = %stop, "session ended by policy");
                let line = stop.user_line();
                reason = Some(stop);
                break line;
            }
            _ = shared.stopped.notified() => {
                let r = shared.with(|s| s.end.clone()).unwrap_or(EndReason::Shutdown);
                let line = r.user_line();
                reason = Some(r);
                break line;
            }
            k = shared.kill.fired() => {
                info!(session = %shared.session_id, actor = %Escaped(&k.actor), reason = %Escaped(&k.reason), "session killed by an operator");
                let r = EndReason::Operator { reason: k.reason, actor: k.actor };
                let line = r.user_line();
                reason = Some(r);
                break line;
            }
            r = &mut running => {
                if let Err(e) = r {
                    if shared.authenticated.load(Ordering::Acquire) {
                        debug!(%peer, error = %e, "client connection ended with an error");
                        reason.get_or_insert_with(|| EndReason::ClientError(e.to_string()));
                    } else {
                        ctx.preauth_failure(peer, &format_args!("ssh protocol error: {e}"));
                    }
                }
                break None;
            }
            _ = &mut grace, if !grace_over => {
                if shared.awaiting.load(Ordering::Acquire) {
                    // an access request is open: its own timeout bounds the wait
                    grace.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(1));
                    continue;
                }
                grace_over = true;
                if !shared.authenticated.load(Ordering::Acquire) {
                    ctx.preauth_failure(peer, &"login grace time exceeded");
                    break Some("psm: login grace time exceeded".to_string());
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    reason = Some(EndReason::Shutdown);
                    break EndReason::Shutdown.user_line();
                }
            }
            _ = shared.violation.notified() => {
                let r = shared.with(|s| s.end.clone());
                if let Some(EndReason::ClientViolation(why)) = &r {
                    ctx.audit.emit(AuditKind::Notice {
                        message: format!("client protocol violation from {peer}: {why}; disconnected"),
                        session_id: Some(shared.session_id.clone()),
                        kind: Some("client protocol violation".into()),
                        count: None,
                    });
                }
                let line = r.as_ref().and_then(|r| r.user_line());
                reason = r;
                break line.or(Some("psm: protocol violation".to_string()));
            }
            _ = shared.recording_lost.notified() => {
                let why = shared
                    .recording()
                    .map(|r| match &*r.status().borrow() {
                        StreamStatus::Failed(w) | StreamStatus::Refused(w) => w.clone(),
                        _ => String::new(),
                    })
                    .unwrap_or_default();
                warn!(session = %shared.session_id, reason = %why, "recording failed; closing the session");
                let r = EndReason::RecordingFailed(why);
                let line = r.user_line();
                reason = Some(r);
                break line;
            }
            changed = link.changed() => {
                if changed.is_ok() {
                    let gen = shared.recording().map(|r| r.generation());
                    let now = link.borrow().generation;
                    if !matches!(gen, Some(g) if g != now) {
                        continue;
                    }
                }
                // The recorder link dropped (or is gone for good) under this session.
                warn!(session = %shared.session_id, "recording lost; closing the session");
                reason = Some(EndReason::RecordingLost);
                break EndReason::RecordingLost.user_line();
            }
        }
    };
    if let Some(message) = kick {
        // The line goes to every running channel's stderr (what an exec client or a terminal
        // shows) as well as into the disconnect message.
        for ch in shared.with(|s| s.running.clone()) {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                handle.extended_data(ch, 1, Bytes::from(format!("\r\n{message}\r\n"))),
            )
            .await;
        }
        let polite = if shared.authenticated.load(Ordering::Acquire) {
            CLOSE_GRACE
        } else {
            // An unauthenticated peer gets no more time than it takes to send the message.
            Duration::from_millis(200)
        };
        let _ = tokio::time::timeout(
            polite,
            handle.disconnect(russh::Disconnect::ByApplication, message, "en".into()),
        )
        .await;
        if tokio::time::timeout(polite, &mut running).await.is_err() {
            // A peer that does not read cannot keep its connection: cut it.
            cutter.cut();
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut running).await;
        }
    }
    finish(&ctx, &shared, reason).await;
    shared.notices.flush();
}

/// The policy side of a connection: once the session started, asks its governor at every
/// snapshot and every deadline whether it may go on; returns only when it may not.
async fn govern(ctx: &WorkerCtx, shared: &Shared) -> EndReason {
    let mut watch = ctx.policy.watch();
    loop {
        let Some(gov) = shared.with(|s| s.governor.clone()) else {
            shared.governed.notified().await;
            continue;
        };
        let now = now_ms();
        let last = shared.bytes.last_input_ms.load(Ordering::Relaxed);
        match gov.check(&ctx.policy.get(), now, last) {
            Verdict::End(stop) => return EndReason::Policy(stop),
            Verdict::Continue { next_check_ms } => {
                let sleep = async {
                    match next_check_ms {
                        Some(t) => {
                            tokio::time::sleep(Duration::from_millis(t.saturating_sub(now))).await
                        }
                        None => std::future::pending().await,
                    }
                };
                let changed = async {
                    if watch.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = sleep => {}
                    _ = changed => {}
                }
            }
        }
    }
}

/// Counts live connections for a graceful shutdown.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> LiveGuard {
        live.fetch_add(1, Ordering::AcqRel);
        LiveGuard(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn finish(ctx: &WorkerCtx, shared: &Shared, reason: Option<EndReason>) {
    let (info, recording, targets, exit_status, exit_signal, end) = shared.with(|s| {
        (
            s.info.take(),
            s.recording.take(),
            std::mem::take(&mut s.targets),
            s.exit_status,
            s.exit_signal.clone(),
            s.end.clone(),
        )
    });
    for t in targets {
        disconnect_target(&t).await;
    }
    let Some(info) = info else { return };
    ctx.sessions.remove(&shared.session_id);
    let end_ms = now_ms().max(shared.start_ms);
    let reason = reason.or(end).unwrap_or(EndReason::ClientClosed);
    if let Some(rec) = recording {
        rec.close(CloseSummary {
            end_ms,
            exit_status,
            exit_signal: exit_signal.clone(),
            reason: reason.to_string(),
        })
        .await;
    }
    let bytes_up = shared.bytes.up.load(Ordering::Relaxed);
    let bytes_down = shared.bytes.down.load(Ordering::Relaxed);
    info!(session = %shared.session_id, user = %info.user, target = %info.target, bytes_up, bytes_down, %reason, side = %reason.side(), "session ended");
    ctx.audit.emit(AuditKind::SessionEnd {
        session_id: shared.session_id.clone(),
        user: info.user,
        source: shared.peer.to_string(),
        target: info.target,
        account: info.account,
        start_ms: shared.start_ms,
        end_ms,
        duration_ms: end_ms - shared.start_ms,
        bytes_up,
        bytes_down,
        exit_status,
        exit_signal,
        recording_id: info.recording_id,
        reason: reason.to_string(),
        reason_code: reason.code().into(),
        side: reason.side().to_string(),
        justification: info.justification,
    });
}

enum Chan {
    /// The session was refused; the message is delivered on the first shell/exec/subsystem.
    Denied(String),
    /// Brokered, waiting for the request that starts it.
    Pending {
        up: Channel<russh::client::Msg>,
        down_w: ChannelWriteHalf<Msg>,
        /// Reads the user's channel until it starts.
        reader: PreStart,
        early: Vec<ChannelMsg>,
        target: Arc<TargetHandle>,
        loss: LossWatch,
        /// Requests the client sent before the start.
        requests: u32,
        /// The terminal the target granted (cols, rows), if any.
        pty: Option<(u32, u32)>,
    },
    /// Relaying.
    Running {
        up_w: Arc<ChannelWriteHalf<russh::client::Msg>>,
        /// Command control of a shell.
        gate: Option<Arc<crate::commands::Gate>>,
    },
    /// Finished or failed.
    Done,
}

/// The russh server handler for one user connection.
pub struct Conn {
    ctx: Arc<WorkerCtx>,
    shared: Arc<Shared>,
    login: String,
    user: Option<String>,
    started: bool,
    /// This connection's place among the unauthenticated ones, until it authenticates.
    permit: Option<Permit>,
    /// Its place among the user's connections, once authenticated.
    user_permit: Option<UserPermit>,
    /// russh's receive windows on this connection, replayed to catch data beyond them.
    window: WindowMirror,
    /// First factor passed, second factor asked: (login, user, first method).
    pending: Option<login::Pending>,
    /// The reason the user gave (when the grant asks for one).
    reason: Option<String>,
    /// The access request the login waits on: id, its updates, its expiry.
    approval_watch: Option<(
        u64,
        tokio::sync::watch::Receiver<Option<psm_control_api::ApprovalRequest>>,
        u64,
    )>,
    /// Verification codes refused on this connection.
    mfa_tries: u32,
    /// The conditions of the grant the latest channel was brokered under.
    conditions: psm_control_api::Conditions,
    channels: HashMap<ChannelId, Chan>,
    flows: HashMap<ChannelId, Arc<Flow>>,
}

fn methods() -> MethodSet {
    MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..])
}

fn second_factor() -> MethodSet {
    MethodSet::from(&[MethodKind::KeyboardInteractive][..])
}

fn reject() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(methods()),
        partial_success: false,
    }
}

fn key_registered(snap: &PolicySnapshot, user: &str, key: &PublicKey) -> Result<(), &'static str> {
    let u = snap.user(user).ok_or("unknown user")?;
    let found = u.ssh_keys.iter().any(|line| {
        PublicKey::from_openssh(line)
            .map(|k| k.key_data() == key.key_data())
            .unwrap_or(false)
    });
    if found {
        Ok(())
    } else {
        Err("public key not registered for this user")
    }
}

impl Conn {
    fn source(&self) -> String {
        self.shared.peer.to_string()
    }

    fn auth_failed(&self, login: &str, method: &str, reason: &str) {
        self.ctx
            .throttle
            .failed(self.shared.peer.ip(), Login::user_part(login), now_ms());
        self.auth_refused(login, method, reason);
    }

    /// Audits a refused login without counting it toward the rate limit (a key an agent
    /// offers that is not registered, a denied approval).
    fn auth_refused(&self, login: &str, method: &str, reason: &str) {
        let login = logged_login(login);
        Counters::bump(&self.ctx.counters.auth_failures);
        info!(peer = %self.shared.peer, login = %Escaped(&login), method, reason, "authentication failed");
        self.ctx.audit.emit(AuditKind::AuthFailure {
            login,
            method: method.to_string(),
            source: self.source(),
            reason: reason.to_string(),
        });
    }

    fn auth_ok(&mut self, login: &str, user: &str, method: &str) -> Auth {
        let permit = match self.ctx.user_slots.admit(user) {
            Ok(p) => p,
            Err(refusal) => {
                self.auth_failed(login, method, &format!("connection refused: {refusal}"));
                return reject();
            }
        };
        self.user_permit = Some(permit);
        info!(peer = %self.shared.peer, login = %Escaped(login), user = %Escaped(user), method, "authenticated");
        self.login = login.to_string();
        self.user = Some(user.to_string());
        self.shared.authenticated.store(true, Ordering::Release);
        // Authenticated: no longer counted against max_startups.
        self.permit = None;
        self.ctx.audit.emit(AuditKind::AuthSuccess {
            login: logged_login(login),
            user: user.to_string(),
            method: method.to_string(),
            source: self.source(),
        });
        Auth::Accept
    }

    /// Counts a request on a channel that has not started; too many is a protocol violation.
    fn prestart_request(&mut self, channel: ChannelId) {
        if let Some(Chan::Pending { requests, .. }) = self.channels.get_mut(&channel) {
            *requests += 1;
            if *requests == MAX_PRESTART_REQUESTS + 1 {
                self.shared.violated(format!(
                    "more than {MAX_PRESTART_REQUESTS} requests on channel {} before it started",
                    u32::from(channel)
                ));
            }
        }
    }

    fn deny(&self, user: &str, reason: String, client_message: String) -> String {
        info!(peer = %self.shared.peer, login = %Escaped(&self.login), reason = %Escaped(&reason), "session denied");
        self.ctx.audit.emit(AuditKind::SessionDenied {
            login: logged_login(&self.login),
            user: user.to_string(),
            source: self.source(),
            reason,
            client_message: client_message.clone(),
        });
        client_message
    }

    /// Decides and, when allowed, brokers a new session channel on the target. Each user channel
    /// gets its own target connection, so a slow channel never holds up another one's target
    /// leg (a russh connection stops reading for all its channels when one is full).
    async fn broker(
        &mut self,
        user: &str,
        open: &Open,
    ) -> Result<(Channel<russh::client::Msg>, Arc<TargetHandle>, LossWatch), String> {
        let login = match Login::parse(&self.login) {
            Ok(l) => l,
            Err(_) if !self.login.contains('@') => {
                // a login without a target whose menu had nothing to offer
                return Err(self.deny(
                    user,
                    "no target named and no account available now".into(),
                    "psm: no account is available to you now; name one with ssh <user>@<account>@<target>@<gateway>".into(),
                ));
            }
            Err(e) => {
                return Err(self.deny(
                    user,
                    e.to_string(),
                    format!(
                        "psm: malformed login '{}': use ssh <user>@<account>@<target>@<gateway>",
                        self.login
                    ),
                ))
            }
        };
        let snap = self.ctx.policy.get();
        let attempt = Attempt {
            user,
            account: &login.account,
            target: &login.target,
            source: self.shared.peer.ip(),
            now_ms: now_ms(),
        };
        let permit = match decide(&snap, &attempt) {
            Ok(p) => p,
            Err(d) => {
                return Err(self.deny(user, d.to_string(), format!("psm: {}", d.client_message())))
            }
        };
        let (target, account) = (permit.target, permit.account);
        self.conditions = permit.conditions().clone();
        if let Open::DirectTcpip { host, port, .. } = open {
            if !self.conditions.forward_allowed(host, *port) {
                let to = crate::escape_short(&format!("{host}:{port}"));
                self.notice("port forwarding", &to, format!(" to {to}"));
                return Err(self.deny(
                    user,
                    format!(
                        "local forward to {to} not allowed by the grant for {}@{}",
                        account.username, target.name
                    ),
                    format!("psm: port forwarding to {to} is not permitted by policy"),
                ));
            }
        }
        // The recording is confirmed open before the relay logs in to the target: a user who
        // cannot be recorded is told so up front, and the target never sees the login.
        let mut opened = None;
        if !self.started {
            let meta = RecordingMeta {
                recording_id: self.shared.session_id.clone(),
                session_id: self.shared.session_id.clone(),
                user: user.to_string(),
                target: target.name.clone(),
                account: account.username.clone(),
                source: self.source(),
                start_ms: self.shared.start_ms,
            };
            match self.ctx.recorder.open(meta).await {
                Ok(rec) => opened = Some(rec),
                Err(e) if snap.recording_required => {
                    return Err(self.deny(
                        user,
                        format!("session recording unavailable: {e}"),
                        RECORDING_UNAVAILABLE.into(),
                    ));
                }
                Err(e) => debug!(error = %e, "recording not required; the session runs unrecorded"),
            }
        }
        let (handle, loss) = match upstream::connect(
            target,
            account,
            self.ctx.limits.target_keepalive,
            self.shared.notices.clone(),
        )
        .await
        {
            Ok((h, loss)) => (Arc::new(h), loss),
            Err(e) => {
                if let Some(rec) = opened {
                    rec.discard().await;
                }
                return Err(self.deny(user, e.to_string(), e.client_message()));
            }
        };
        if !self.started {
            let recording_id = self.shared.session_id.clone();
            if let Some(rec) = &opened {
                let mut status = rec.status();
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    // Ends with the stream (sender dropped) or when psm-recorder loses it.
                    if status.wait_for(|s| s.is_lost()).await.is_ok() {
                        shared.recording_lost.notify_one();
                    }
                });
            }
            self.shared.with(|s| {
                s.info = Some(SessionInfo {
                    user: user.to_string(),
                    target: target.name.clone(),
                    account: account.username.clone(),
                    recording_id: recording_id.clone(),
                    justification: self.reason.clone(),
                });
                s.recording = opened;
                s.governor = Some(Governor {
                    user: user.to_string(),
                    account: account.username.clone(),
                    target: target.name.clone(),
                    source: self.shared.peer.ip(),
                    start_ms: self.shared.start_ms,
                });
            });
            self.shared.governed.notify_one();
            info!(session = %self.shared.session_id, %user, target = %target.name, account = %account.username, "session started");
            Counters::bump(&self.ctx.counters.sessions_started);
            let live = LiveSession {
                session_id: self.shared.session_id.clone(),
                user: user.to_string(),
                source: self.source(),
                target: target.name.clone(),
                target_address: target.address.clone(),
                account: account.username.clone(),
                recording_id,
                start_ms: self.shared.start_ms,
                justification: self.reason.clone(),
                worker: Some(self.ctx.worker),
            };
            self.ctx.sessions.insert(
                live.clone(),
                self.shared.bytes.clone(),
                self.shared.kill.clone(),
            );
            self.ctx.audit.emit(AuditKind::SessionStart {
                session_id: live.session_id,
                user: live.user,
                source: live.source,
                target: live.target,
                target_address: live.target_address,
                account: live.account,
                recording_id: live.recording_id,
                start_ms: live.start_ms,
                justification: live.justification,
                worker: live.worker,
            });
            self.started = true;
        }
        self.shared.with(|s| s.targets.push(handle.clone()));
        let open = match open {
            Open::Session => {
                tokio::time::timeout(REQUEST_TIMEOUT, handle.channel_open_session()).await
            }
            Open::DirectTcpip {
                host,
                port,
                orig_addr,
                orig_port,
            } => {
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    handle.channel_open_direct_tcpip(
                        host.clone(),
                        *port,
                        orig_addr.clone(),
                        *orig_port,
                    ),
                )
                .await
            }
        };
        match open.unwrap_or(Err(russh::Error::ConnectionTimeout)) {
            Ok(ch) => Ok((ch, handle, loss)),
            Err(e) => {
                let err = upstream::UpstreamError::ChannelRefused {
                    target: target.name.clone(),
                    reason: e.to_string(),
                };
                Err(self.deny(user, err.to_string(), err.client_message()))
            }
        }
    }

    /// Sends a request upstream and waits for the target's answer, keeping anything else that
    /// arrives meanwhile for the relay tasks.
    async fn forward_request(&mut self, channel: ChannelId, req: Req) -> Option<bool> {
        let Some(Chan::Pending { up, early, .. }) = self.channels.get_mut(&channel) else {
            return None;
        };
        if req.send(up).await.is_err() {
            return Some(false);
        }
        let wait = async {
            loop {
                match up.wait().await {
                    Some(ChannelMsg::Success) => return true,
                    Some(ChannelMsg::Failure) | None => return false,
                    Some(ChannelMsg::WindowAdjusted { .. }) => {}
                    // a target that floods before answering gets no answer from psm either
                    Some(_) if early.len() >= MAX_EARLY_MESSAGES => return false,
                    Some(other) => early.push(other),
                }
            }
        };
        Some(
            tokio::time::timeout(REQUEST_TIMEOUT, wait)
                .await
                .unwrap_or(false),
        )
    }

    /// Starts relaying a channel whose shell/exec/subsystem the target accepted.
    async fn start(
        &mut self,
        channel: ChannelId,
        handle: russh::server::Handle,
        shell: bool,
        forward: Option<String>,
    ) {
        let Some(Chan::Pending {
            up,
            down_w,
            reader,
            early,
            target,
            loss,
            pty,
            ..
        }) = self.channels.remove(&channel)
        else {
            return;
        };
        let Some((down_r, before)) = reader.finish().await else {
            disconnect_target(&target).await;
            return;
        };
        let (up_r, up_w) = up.split();
        let up_w = Arc::new(up_w);
        let flow = Flow::new();
        let rec = self.shared.recording();
        let ch: u32 = channel.into();
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        // every shell gets command control: its lines are audited, and decided by the rules
        let gate = shell.then(|| Arc::new(crate::commands::Gate::new(pty)));
        for m in early {
            if let Some(item) = down_item(m) {
                if let (Some(g), crate::pipe::Item::Data(d)) = (&gate, &item) {
                    g.output(d);
                }
                record_down(rec.as_ref(), ch, &item).await;
                account_down(&self.shared, &flow, &item);
                let _ = down_tx.send(item);
            }
        }
        // what the user sent before the start goes first, recorded and counted like the rest
        for e in before {
            let item = match e {
                Early::Data(data) => {
                    self.shared.bytes.input(data.len());
                    if let Some(rec) = &rec {
                        rec.data(ch, psm_recorder_format::Direction::Input, data.clone())
                            .await;
                    }
                    flow.up_queued(data.len());
                    crate::pipe::Item::Data(data)
                }
                Early::Eof => crate::pipe::Item::Eof,
                Early::Closed => crate::pipe::Item::Close,
            };
            let _ = up_tx.send(item);
        }
        self.flows.insert(channel, flow.clone());
        tokio::spawn(read_client(
            down_r,
            up_tx,
            flow.clone(),
            self.shared.clone(),
            rec.clone(),
            ch,
            gate.clone().map(|g| (g, down_tx.clone())),
        ));
        tokio::spawn(write_target(up_rx, up_w.clone(), flow.clone()));
        tokio::spawn(read_target(
            up_r,
            down_tx,
            flow.clone(),
            self.shared.clone(),
            rec,
            ch,
            loss,
            gate.clone(),
        ));
        if tracing::enabled!(tracing::Level::DEBUG) {
            let flow = flow.clone();
            let sid = self.shared.session_id.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if Arc::strong_count(&flow) <= 1 {
                        return;
                    }
                    debug!(session = %sid, state = %flow.describe(), "flow");
                }
            });
        }
        let shared = self.shared.clone();
        let opened_ms = now_ms();
        tokio::spawn(async move {
            write_client(down_rx, down_w, handle, flow.clone()).await;
            if let Some(destination) = forward {
                // one audit event per forward, with what it moved
                let end_ms = now_ms().max(opened_ms);
                let (user, target, account) = shared
                    .with(|s| {
                        s.info
                            .as_ref()
                            .map(|i| (i.user.clone(), i.target.clone(), i.account.clone()))
                    })
                    .unwrap_or_default();
                shared.audit.emit(AuditKind::Forward {
                    session_id: shared.session_id.clone(),
                    user,
                    target,
                    account,
                    channel: ch,
                    destination,
                    bytes_up: flow.moved_up(),
                    bytes_down: flow.moved_down(),
                    duration_ms: end_ms - opened_ms,
                });
            }
            // The channel is over: its dedicated target connection goes with it, and the
            // handler forgets it (russh does not tell it when the target closed the channel).
            disconnect_target(&target).await;
            if let Ok(mut f) = shared.finished.lock() {
                f.push(channel);
            }
            shared.with(|s| s.running.retain(|c| *c != channel));
        });
        self.shared.with(|s| s.running.push(channel));
        self.channels.insert(channel, Chan::Running { up_w, gate });
    }

    /// Delivers a denial on a channel: the message on stderr, exit status 255, close.
    fn deliver_denial(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(Chan::Denied(msg)) = self.channels.get(&channel) else {
            return Ok(());
        };
        let text = Bytes::from(format!("{msg}\r\n"));
        session.channel_success(channel)?;
        session.extended_data(channel, 1, text)?;
        session.exit_status_request(channel, 255)?;
        session.eof(channel)?;
        session.close(channel)?;
        self.channels.insert(channel, Chan::Done);
        Ok(())
    }

    async fn start_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
        req: Req,
    ) -> Result<(), russh::Error> {
        match self.channels.get(&channel) {
            Some(Chan::Denied(_)) => {
                if let Req::Exec(cmd) = &req {
                    let cmd = String::from_utf8_lossy(cmd).into_owned();
                    if !self.login.contains('@') && cmd.trim_start().starts_with("requests") {
                        // psm's own commands for approvers, on a login without a target
                        let (status, text) = self.approver_command(&cmd).await;
                        self.channels.insert(channel, Chan::Done);
                        session.channel_success(channel)?;
                        session.data(channel, Bytes::from(text))?;
                        session.exit_status_request(channel, status)?;
                        session.eof(channel)?;
                        session.close(channel)?;
                        return Ok(());
                    }
                }
                return self.deliver_denial(channel, session);
            }
            Some(Chan::Pending { .. }) => {}
            _ => return session.channel_failure(channel),
        }
        let (request, command) = req.describe();
        let kind = req.kind();
        let shell = matches!(req, Req::Shell);
        let permitted = match kind {
            Some(k) => self.conditions.allows(k),
            None => false,
        };
        if permitted && matches!(req, Req::Exec(_)) {
            // command control: the command line is decided before it is sent
            let v = self.shared.decide_command(channel.into(), &command, "exec");
            match v.action {
                psm_control_api::CommandAction::Allow | psm_control_api::CommandAction::Alert => {}
                psm_control_api::CommandAction::Deny => {
                    self.refuse_started(
                        channel,
                        format!(
                            "psm: command denied by policy: {}",
                            crate::escape_short(&command)
                        ),
                    );
                    return self.deliver_denial(channel, session);
                }
                psm_control_api::CommandAction::Terminate => {
                    self.refuse_started(
                        channel,
                        format!(
                            "psm: command denied by policy: {}",
                            crate::escape_short(&command)
                        ),
                    );
                    self.shared.stop(EndReason::Policy(
                        psm_control_api::PolicyStop::CommandTerminated {
                            line: command.clone(),
                            rule: v.rule,
                        },
                    ));
                    return self.deliver_denial(channel, session);
                }
            }
        }
        let accepted = if permitted {
            self.forward_request(channel, req).await == Some(true)
        } else {
            let what = match kind {
                Some(k) => format!("{k} sessions are"),
                None => format!("the subsystem '{}' is", crate::escape_short(&command)),
            };
            // Delivered like a denial (the message on stderr, exit status 255): a refused
            // request would make OpenSSH print only "exec request failed".
            self.refuse_started(channel, format!("psm: {what} not permitted by policy"));
            self.notice(
                "channel kind",
                &kind
                    .map(|k| k.to_string())
                    .unwrap_or_else(|| "subsystem".into()),
                format!(" ({request} {})", crate::escape_short(&command)),
            );
            false
        };
        if let Some(info) = self.shared.with(|s| {
            s.info
                .as_ref()
                .map(|i| (i.user.clone(), i.target.clone(), i.account.clone()))
        }) {
            self.ctx.audit.emit(AuditKind::ChannelRequest {
                session_id: self.shared.session_id.clone(),
                user: info.0,
                target: info.1,
                account: info.2,
                channel: channel.into(),
                request: request.into(),
                command,
                accepted,
            });
        }
        if accepted {
            session.channel_success(channel)?;
            self.start(channel, session.handle(), shell, None).await;
        } else if !permitted {
            return self.deliver_denial(channel, session);
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    /// Turns a brokered channel into a denied one (its target connection is closed); the
    /// denial is delivered by [`Conn::deliver_denial`].
    fn refuse_started(&mut self, channel: ChannelId, message: String) {
        if let Some(Chan::Pending { target, .. }) = self.channels.remove(&channel) {
            tokio::spawn(async move { disconnect_target(&target).await });
        }
        self.channels.insert(channel, Chan::Denied(message));
    }

    fn refuse_notice(&self, channel: ChannelId, session: &mut Session, what: &'static str) {
        let _ = session.extended_data(
            channel,
            1,
            Bytes::from(format!("psm: {what} is not permitted\r\n")),
        );
        self.notice(what, "", String::new());
    }

    /// An aggregated notice of kind `what refused` (see [`Notices`]).
    fn notice(&self, what: &'static str, detail: &str, extra: String) {
        let kind: &'static str = match what {
            "X11 forwarding" => "X11 forwarding refused",
            "agent forwarding" => "agent forwarding refused",
            "port forwarding" => "port forwarding refused",
            "remote port forwarding" => "remote port forwarding refused",
            "unix socket forwarding" => "unix socket forwarding refused",
            "environment variable" => "environment variable refused",
            "channel kind" => "channel refused by policy",
            _ => "request refused",
        };
        self.shared.notices.note(kind, detail, || {
            format!(
                "{what}{extra} refused for {} from {} (session {})",
                crate::escape_short(&self.login),
                self.source(),
                self.shared.session_id
            )
        });
    }

    /// Forgets channels whose relaying finished.
    fn reap(&mut self) {
        let done: Vec<ChannelId> = self
            .shared
            .finished
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        for ch in done {
            self.channels.remove(&ch);
            self.flows.remove(&ch);
            self.window.closed(ch.into());
        }
        self.channels.retain(|_, c| !matches!(c, Chan::Done));
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    fn adjust_window(&mut self, channel: ChannelId, _current: u32) -> u32 {
        // The user's window follows what psm can still hold for this channel (see `flow`).
        let w = self
            .flows
            .get(&channel)
            .map(|f| f.user_window())
            .unwrap_or(WINDOW);
        self.window.hook(w);
        w
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Err(v) = self.window.data(channel.into(), data.len()) {
            self.shared.violated(format!(
                "sent {} bytes on channel {} where its SSH window allowed {}",
                v.sent, v.channel, v.allowed
            ));
        }
        Ok(())
    }

    async fn extended_data(
        &mut self,
        channel: ChannelId,
        _code: u32,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.data(channel, data, session).await
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.flows.remove(&channel);
        self.window.closed(channel.into());
        if let Some(Chan::Pending { target, .. }) = self.channels.remove(&channel) {
            // Opened but never started: its target connection has nothing left to do.
            tokio::spawn(async move { disconnect_target(&target).await });
        }
        Ok(())
    }

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        login: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        let user = Login::user_part(login);
        match key_registered(&self.ctx.policy.get(), user, offer.public_key) {
            Ok(()) => Ok(Auth::Accept),
            Err(reason) => {
                // an agent offers every key it holds: only an attempt with a secret counts
                self.auth_refused(login, "publickey", reason);
                Ok(reject())
            }
        }
    }

    async fn auth_publickey(
        &mut self,
        login: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if let Some(r) = self.refused_early(login, "publickey") {
            return Ok(r);
        }
        let user = Login::user_part(login).to_string();
        match key_registered(&self.ctx.policy.get(), &user, key.public_key) {
            Ok(()) => Ok(self.first_factor(login, &user, "publickey")),
            Err(reason) => {
                self.auth_failed(login, "publickey", reason);
                Ok(reject())
            }
        }
    }

    async fn auth_password(&mut self, login: &str, password: &str) -> Result<Auth, Self::Error> {
        if let Some(r) = self.refused_early(login, "password") {
            return Ok(r);
        }
        let user = Login::user_part(login).to_string();
        let snap = self.ctx.policy.get();
        let verdict = match snap.user(&user).map(|u| u.password.clone()) {
            None => Err("unknown user"),
            Some(None) => Err("password login not enabled for this user"),
            Some(Some(hash)) => {
                let pw = zeroize::Zeroizing::new(password.to_string());
                // argon2id and PBKDF2 take tens of milliseconds: keep them off the worker's
                // event loop. A legacy PBKDF2 verifier is replaced by an argon2id one.
                let audit = self.ctx.audit.clone();
                let name = user.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    let ok = hash.verify(&pw);
                    if ok && hash.needs_rehash() {
                        if let Ok(new) = psm_control_api::PasswordHash::new(&pw) {
                            audit.report(RelayToControl::Rehash {
                                user: name,
                                old: hash,
                                new,
                            });
                        }
                    }
                    ok
                })
                .await
                .unwrap_or(false);
                if ok {
                    Ok(())
                } else {
                    Err("wrong password")
                }
            }
        };
        match verdict {
            Ok(()) => Ok(self.first_factor(login, &user, "password")),
            Err(reason) => {
                self.auth_failed(login, "password", reason);
                Ok(reject())
            }
        }
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        login: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.keyboard_interactive(login, response).await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(user) = self.user.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        self.reap();
        if self.channels.len() >= MAX_CHANNELS {
            reply
                .reject(ChannelOpenFailure::Other {
                    code: 4, // SSH_OPEN_RESOURCE_SHORTAGE
                    reason: format!("psm: at most {MAX_CHANNELS} sessions per connection"),
                })
                .await;
            return Ok(());
        }
        let id = channel.id();
        let state = match self.broker(&user, &Open::Session).await {
            Ok((up, target, loss)) => {
                let (down_r, down_w) = channel.split();
                let shared = self.shared.clone();
                let reader = PreStart::spawn(down_r, move |n| {
                    shared.violated(format!(
                        "sent {n} bytes on channel {} before it started",
                        u32::from(id)
                    ))
                });
                Chan::Pending {
                    up,
                    down_w,
                    reader,
                    early: Vec::new(),
                    target,
                    loss,
                    requests: 0,
                    pty: None,
                }
            }
            Err(msg) => Chan::Denied(msg),
        };
        self.channels.insert(id, state);
        self.window.opened(id.into(), WINDOW);
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(user) = self.user.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        self.reap();
        if self.channels.len() >= MAX_CHANNELS {
            reply
                .reject(ChannelOpenFailure::Other {
                    code: 4, // SSH_OPEN_RESOURCE_SHORTAGE
                    reason: format!("psm: at most {MAX_CHANNELS} channels per connection"),
                })
                .await;
            return Ok(());
        }
        // a local forward is a channel of its own, brokered under the grant like a session,
        // allowed only where the grant says forward-local (and lists the destination)
        let open = Open::DirectTcpip {
            host: host.to_string(),
            port,
            orig_addr: originator_address.to_string(),
            orig_port: originator_port,
        };
        let destination = crate::escape_short(&format!("{host}:{port}"));
        match self.broker(&user, &open).await {
            Ok((up, target, loss)) => {
                let id = channel.id();
                let (down_r, down_w) = channel.split();
                let shared = self.shared.clone();
                let reader = PreStart::spawn(down_r, move |n| {
                    shared.violated(format!(
                        "sent {n} bytes on channel {} before it started",
                        u32::from(id)
                    ))
                });
                self.channels.insert(
                    id,
                    Chan::Pending {
                        up,
                        down_w,
                        reader,
                        early: Vec::new(),
                        target,
                        loss,
                        requests: 0,
                        pty: None,
                    },
                );
                self.window.opened(id.into(), WINDOW);
                reply.accept().await;
                if let Some(info) = self.shared.with(|s| {
                    s.info
                        .as_ref()
                        .map(|i| (i.user.clone(), i.target.clone(), i.account.clone()))
                }) {
                    self.ctx.audit.emit(AuditKind::ChannelRequest {
                        session_id: self.shared.session_id.clone(),
                        user: info.0,
                        target: info.1,
                        account: info.2,
                        channel: id.into(),
                        request: "direct-tcpip".into(),
                        command: destination.clone(),
                        accepted: true,
                    });
                }
                self.start(id, session.handle(), false, Some(destination))
                    .await;
            }
            Err(msg) => {
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: 1, // SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
                        reason: msg,
                    })
                    .await;
            }
        }
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let to = crate::escape_short(socket_path);
        self.notice("unix socket forwarding", &to, format!(" to {to}"));
        reply
            .reject(ChannelOpenFailure::Other {
                code: 1, // SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
                reason: "psm: unix socket forwarding is not permitted".into(),
            })
            .await;
        Ok(())
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let at = crate::escape_short(socket_path);
        self.notice("unix socket forwarding", &at, format!(" of {at}"));
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let at = crate::escape_short(&format!("{address}:{port}"));
        self.notice("remote port forwarding", &at, format!(" of {at}"));
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.prestart_request(channel);
        session.channel_failure(channel)?;
        self.refuse_notice(channel, session, "X11 forwarding");
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.prestart_request(channel);
        self.refuse_notice(channel, session, "agent forwarding");
        Ok(false)
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.prestart_request(channel);
        match self.channels.get(&channel) {
            Some(Chan::Denied(_)) => return session.channel_success(channel),
            Some(Chan::Pending { .. }) => {}
            _ => return session.channel_failure(channel),
        }
        let req = Req::Pty {
            term: crate::escape_short(term),
            cols: clamp_cells(col_width),
            rows: clamp_cells(row_height),
            pix_width: pix_width.min(MAX_PTY_PIXELS),
            pix_height: pix_height.min(MAX_PTY_PIXELS),
            modes: modes.to_vec(),
        };
        let ok = self.forward_request(channel, req).await;
        if ok == Some(true) {
            let (cols, rows) = recorded_size(col_width, row_height);
            if let Some(Chan::Pending { pty, .. }) = self.channels.get_mut(&channel) {
                *pty = Some((cols, rows));
            }
            if let Some(rec) = self.shared.recording() {
                rec.resize(channel.into(), cols, rows).await;
            }
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.prestart_request(channel);
        if !self.conditions.env_allowed(name) {
            // Only LANG and LC_* reach targets: LD_PRELOAD, BASH_ENV and the like could change
            // what runs there. The names are audited (aggregated), never the values.
            let shown = crate::escape_short(name);
            self.notice("environment variable", &shown, format!(" {shown}"));
            return session.channel_failure(channel);
        }
        if let Some(Chan::Pending { up, .. }) = self.channels.get(&channel) {
            let _ = up.set_env(false, name, value).await;
        }
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_request(channel, session, Req::Shell).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_request(channel, session, Req::Exec(data.to_vec()))
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_request(channel, session, Req::Subsystem(name.to_string()))
            .await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.prestart_request(channel);
        let (col_width, row_height) = (clamp_cells(col_width), clamp_cells(row_height));
        let (pix_width, pix_height) = (
            pix_width.min(MAX_PTY_PIXELS),
            pix_height.min(MAX_PTY_PIXELS),
        );
        let size = recorded_size(col_width, row_height);
        let sent = match self.channels.get_mut(&channel) {
            Some(Chan::Running { up_w, gate }) => {
                if let Some(g) = gate {
                    g.resize(size.0, size.1);
                }
                up_w.window_change(col_width, row_height, pix_width, pix_height)
                    .await
                    .is_ok()
            }
            Some(Chan::Pending { up, pty, .. }) => {
                if pty.is_some() {
                    *pty = Some(size);
                }
                up.window_change(col_width, row_height, pix_width, pix_height)
                    .await
                    .is_ok()
            }
            _ => false,
        };
        if sent {
            if let Some(rec) = self.shared.recording() {
                let (cols, rows) = recorded_size(col_width, row_height);
                rec.resize(channel.into(), cols, rows).await;
            }
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.prestart_request(channel);
        if let Some(Chan::Running { up_w, .. }) = self.channels.get(&channel) {
            let _ = up_w.signal(signal).await;
        }
        Ok(())
    }
}

/// What the target leg of a new user channel opens.
pub(crate) enum Open {
    /// A session channel (shell, exec, subsystem follow).
    Session,
    /// A local forward (`direct-tcpip`).
    DirectTcpip {
        host: String,
        port: u32,
        orig_addr: String,
        orig_port: u32,
    },
}

/// A channel request forwarded to the target, answered before the relay goes on.
enum Req {
    Pty {
        term: String,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        modes: Vec<(Pty, u32)>,
    },
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
}

impl Req {
    /// The channel kind a start request opens (None: a subsystem psm does not know).
    fn kind(&self) -> Option<ChannelKind> {
        match self {
            Req::Pty { .. } | Req::Shell => Some(ChannelKind::Shell),
            Req::Exec(cmd) => Some(ChannelKind::of_exec(&String::from_utf8_lossy(cmd))),
            Req::Subsystem(name) if name == "sftp" => Some(ChannelKind::Sftp),
            Req::Subsystem(_) => None,
        }
    }

    /// The request's name and its command line / subsystem name, for the audit log.
    fn describe(&self) -> (&'static str, String) {
        match self {
            Req::Pty { .. } => ("pty-req", String::new()),
            Req::Shell => ("shell", String::new()),
            Req::Exec(cmd) => ("exec", String::from_utf8_lossy(cmd).into_owned()),
            Req::Subsystem(name) => ("subsystem", name.clone()),
        }
    }

    async fn send(self, up: &Channel<russh::client::Msg>) -> Result<(), russh::Error> {
        match self {
            Req::Pty {
                term,
                cols,
                rows,
                pix_width,
                pix_height,
                modes,
            } => {
                up.request_pty(true, &term, cols, rows, pix_width, pix_height, &modes)
                    .await
            }
            Req::Shell => up.request_shell(true).await,
            Req::Exec(cmd) => up.exec(true, cmd).await,
            Req::Subsystem(name) => up.request_subsystem(true, name).await,
        }
    }
}

async fn disconnect_target(t: &TargetHandle) {
    if !t.is_closed() {
        let _ = t
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}
