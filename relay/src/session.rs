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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use psm_control_api::{now_ms, AuditKind, LiveSession, Login, PolicySnapshot};
use psm_recorder_format::{CloseSummary, Direction, RecordingMeta};
use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelWriteHalf, MethodKind, MethodSet,
    Pty, Sig,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::control_link::{AuditSink, PolicyStore};
use crate::flow::Flow;
use crate::recording::{RecordingStream, WorkerRecorder};
use crate::upstream::{self, TargetHandle};

/// What the user is told when recording is required and psm-recorder cannot take the session.
pub const RECORDING_UNAVAILABLE: &str = "psm: session recording is unavailable; try again later";
/// How long the relay waits for the target to answer a channel request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client has to authenticate (as OpenSSH's `LoginGraceTime`, shorter).
pub const LOGIN_GRACE: Duration = Duration::from_secs(60);
/// Session channels one connection may have open at once (as OpenSSH's `MaxSessions`).
pub const MAX_CHANNELS: usize = 10;

/// What every connection on one worker shares.
pub struct WorkerCtx {
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
}

struct SessionInfo {
    user: String,
    target: String,
    account: String,
    recording_id: String,
}

#[derive(Default)]
struct SharedState {
    info: Option<SessionInfo>,
    recording: Option<RecordingStream>,
    targets: Vec<Arc<TargetHandle>>,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    first_close: Option<&'static str>,
}

/// State of one connection that outlives the russh handler (for the end-of-session record).
struct Shared {
    session_id: String,
    peer: SocketAddr,
    start_ms: u64,
    started: Instant,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    authenticated: AtomicBool,
    state: Mutex<SharedState>,
}

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut SharedState) -> R) -> R {
        match self.state.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
    fn recording(&self) -> Option<RecordingStream> {
        self.with(|s| s.recording.clone())
    }
    fn closed_by(&self, who: &'static str) {
        self.with(|s| {
            s.first_close.get_or_insert(who);
        });
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

/// Serves one accepted TCP connection to its end, then writes the end-of-session records.
pub async fn handle_connection(
    ctx: Arc<WorkerCtx>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let _live = LiveGuard::new(&ctx.live);
    let _ = stream.set_nodelay(true);
    let shared = Arc::new(Shared {
        session_id: new_id(),
        peer,
        start_ms: now_ms(),
        started: Instant::now(),
        bytes_up: AtomicU64::new(0),
        bytes_down: AtomicU64::new(0),
        authenticated: AtomicBool::new(false),
        state: Mutex::new(SharedState::default()),
    });
    let conn = Conn {
        ctx: ctx.clone(),
        shared: shared.clone(),
        login: String::new(),
        user: None,
        started: false,
        channels: HashMap::new(),
        flows: HashMap::new(),
    };
    let grace_end = tokio::time::Instant::now() + LOGIN_GRACE;
    let start = russh::server::run_stream(ctx.server_config.clone(), stream, conn);
    let running = match tokio::time::timeout_at(grace_end, start).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "ssh connection failed before the session started");
            return;
        }
        Err(_) => {
            debug!(%peer, "no ssh identification within the login grace time");
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
    let mut reason: Option<String> = None;
    let kick = loop {
        tokio::select! {
            r = &mut running => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "client connection ended with an error");
                    reason.get_or_insert_with(|| format!("client connection error: {e}"));
                }
                break None;
            }
            _ = &mut grace, if !grace_over => {
                grace_over = true;
                if !shared.authenticated.load(Ordering::Acquire) {
                    info!(%peer, "login grace time exceeded");
                    break Some("psm: login grace time exceeded");
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    reason = Some("gateway shutting down".into());
                    break Some("psm: the gateway is shutting down");
                }
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
                reason = Some("session recording was lost".into());
                break Some("psm: session recording was lost; the session was closed");
            }
        }
    };
    if let Some(message) = kick {
        let _ = handle
            .disconnect(
                russh::Disconnect::ByApplication,
                message.into(),
                "en".into(),
            )
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut running).await;
    }
    finish(&ctx, &shared, reason).await;
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

async fn finish(ctx: &WorkerCtx, shared: &Shared, reason: Option<String>) {
    let (info, recording, targets, exit_status, exit_signal, first_close) = shared.with(|s| {
        (
            s.info.take(),
            s.recording.take(),
            std::mem::take(&mut s.targets),
            s.exit_status,
            s.exit_signal.clone(),
            s.first_close,
        )
    });
    for t in targets {
        disconnect_target(&t).await;
    }
    let Some(info) = info else { return };
    ctx.sessions.remove(&shared.session_id);
    let end_ms = now_ms();
    let reason = reason.unwrap_or_else(|| match first_close {
        Some("target") => "target ended the session".into(),
        _ => "client closed the session".into(),
    });
    if let Some(rec) = recording {
        rec.close(CloseSummary {
            end_ms,
            exit_status,
            exit_signal: exit_signal.clone(),
            reason: reason.clone(),
        })
        .await;
    }
    let bytes_up = shared.bytes_up.load(Ordering::Relaxed);
    let bytes_down = shared.bytes_down.load(Ordering::Relaxed);
    info!(session = %shared.session_id, user = %info.user, target = %info.target, bytes_up, bytes_down, %reason, "session ended");
    ctx.audit.emit(AuditKind::SessionEnd {
        session_id: shared.session_id.clone(),
        user: info.user,
        source: shared.peer.to_string(),
        target: info.target,
        account: info.account,
        start_ms: shared.start_ms,
        end_ms,
        duration_ms: shared.started.elapsed().as_millis() as u64,
        bytes_up,
        bytes_down,
        exit_status,
        exit_signal,
        recording_id: info.recording_id,
        reason,
    });
}

enum Chan {
    /// The session was refused; the message is delivered on the first shell/exec/subsystem.
    Denied(String),
    /// Brokered, waiting for the request that starts it.
    Pending {
        up: Channel<russh::client::Msg>,
        down: Channel<Msg>,
        early: Vec<ChannelMsg>,
        target: Arc<TargetHandle>,
    },
    /// Relaying.
    Running {
        up_w: Arc<ChannelWriteHalf<russh::client::Msg>>,
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
    channels: HashMap<ChannelId, Chan>,
    flows: HashMap<ChannelId, Arc<Flow>>,
}

fn methods() -> MethodSet {
    MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..])
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
        info!(peer = %self.shared.peer, %login, method, reason, "authentication failed");
        self.ctx.audit.emit(AuditKind::AuthFailure {
            login: login.to_string(),
            method: method.to_string(),
            source: self.source(),
            reason: reason.to_string(),
        });
    }

    fn auth_ok(&mut self, login: &str, user: &str, method: &str) {
        info!(peer = %self.shared.peer, %login, %user, method, "authenticated");
        self.login = login.to_string();
        self.user = Some(user.to_string());
        self.shared.authenticated.store(true, Ordering::Release);
        self.ctx.audit.emit(AuditKind::AuthSuccess {
            login: login.to_string(),
            user: user.to_string(),
            method: method.to_string(),
            source: self.source(),
        });
    }

    fn deny(&self, user: &str, reason: String, client_message: String) -> String {
        info!(peer = %self.shared.peer, login = %self.login, %reason, "session denied");
        self.ctx.audit.emit(AuditKind::SessionDenied {
            login: self.login.clone(),
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
    ) -> Result<(Channel<russh::client::Msg>, Arc<TargetHandle>), String> {
        let login = match Login::parse(&self.login) {
            Ok(l) => l,
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
        if snap.user(user).is_none() {
            return Err(self.deny(
                user,
                format!("user '{user}' no longer exists"),
                "psm: access denied".into(),
            ));
        }
        let (target, account) = match snap.authorize(user, &login.account, &login.target) {
            Ok(x) => x,
            Err(d) => {
                return Err(self.deny(user, d.to_string(), format!("psm: {}", d.client_message())))
            }
        };
        if snap.recording_required && !self.ctx.recorder.state().connected {
            return Err(self.deny(
                user,
                "session recording unavailable: psm-recorder is not connected".into(),
                RECORDING_UNAVAILABLE.into(),
            ));
        }
        let handle = match upstream::connect(target, account).await {
            Ok(h) => Arc::new(h),
            Err(e) => return Err(self.deny(user, e.to_string(), e.client_message())),
        };
        if !self.started {
            let recording_id = self.shared.session_id.clone();
            let meta = RecordingMeta {
                recording_id: recording_id.clone(),
                session_id: self.shared.session_id.clone(),
                user: user.to_string(),
                target: target.name.clone(),
                account: account.username.clone(),
                source: self.source(),
                start_ms: self.shared.start_ms,
            };
            let recording = self.ctx.recorder.open(meta).await;
            if recording.is_none() && snap.recording_required {
                disconnect_target(&handle).await;
                return Err(self.deny(
                    user,
                    "session recording unavailable: psm-recorder link dropped".into(),
                    RECORDING_UNAVAILABLE.into(),
                ));
            }
            self.shared.with(|s| {
                s.info = Some(SessionInfo {
                    user: user.to_string(),
                    target: target.name.clone(),
                    account: account.username.clone(),
                    recording_id: recording_id.clone(),
                });
                s.recording = recording;
            });
            info!(session = %self.shared.session_id, %user, target = %target.name, account = %account.username, "session started");
            let live = LiveSession {
                session_id: self.shared.session_id.clone(),
                user: user.to_string(),
                source: self.source(),
                target: target.name.clone(),
                target_address: target.address.clone(),
                account: account.username.clone(),
                recording_id,
                start_ms: self.shared.start_ms,
            };
            self.ctx.sessions.insert(live.clone());
            self.ctx.audit.emit(AuditKind::SessionStart {
                session_id: live.session_id,
                user: live.user,
                source: live.source,
                target: live.target,
                target_address: live.target_address,
                account: live.account,
                recording_id: live.recording_id,
                start_ms: live.start_ms,
            });
            self.started = true;
        }
        self.shared.with(|s| s.targets.push(handle.clone()));
        let open = tokio::time::timeout(REQUEST_TIMEOUT, handle.channel_open_session()).await;
        match open.unwrap_or(Err(russh::Error::ConnectionTimeout)) {
            Ok(ch) => Ok((ch, handle)),
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
    async fn start(&mut self, channel: ChannelId, handle: russh::server::Handle) {
        let Some(Chan::Pending {
            up,
            down,
            early,
            target,
        }) = self.channels.remove(&channel)
        else {
            return;
        };
        let (up_r, up_w) = up.split();
        let (down_r, down_w) = down.split();
        let up_w = Arc::new(up_w);
        let flow = Flow::new();
        let rec = self.shared.recording();
        let ch: u32 = channel.into();
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        for m in early {
            if let Some(item) = down_item(m) {
                record_down(rec.as_ref(), ch, &item).await;
                account_down(&self.shared, &flow, &item);
                let _ = down_tx.send(item);
            }
        }
        self.flows.insert(channel, flow.clone());
        tokio::spawn(read_client(
            down_r,
            up_tx,
            flow.clone(),
            self.shared.clone(),
            rec.clone(),
            ch,
        ));
        tokio::spawn(write_target(up_rx, up_w.clone(), flow.clone()));
        tokio::spawn(read_target(
            up_r,
            down_tx,
            flow.clone(),
            self.shared.clone(),
            rec,
            ch,
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
        tokio::spawn(async move {
            write_client(down_rx, down_w, handle, flow).await;
            // The channel is over: its dedicated target connection goes with it.
            disconnect_target(&target).await;
        });
        self.channels.insert(channel, Chan::Running { up_w });
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
            Some(Chan::Denied(_)) => return self.deliver_denial(channel, session),
            Some(Chan::Pending { .. }) => {}
            _ => return session.channel_failure(channel),
        }
        let (request, command) = req.describe();
        let accepted = self.forward_request(channel, req).await == Some(true);
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
            self.start(channel, session.handle()).await;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    fn refuse_notice(&self, channel: ChannelId, session: &mut Session, what: &str) {
        let _ = session.extended_data(
            channel,
            1,
            Bytes::from(format!("psm: {what} is not permitted\r\n")),
        );
        self.ctx.audit.emit(AuditKind::Notice {
            message: format!(
                "{what} refused for {} from {} (session {})",
                self.login,
                self.source(),
                self.shared.session_id
            ),
        });
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    fn adjust_window(&mut self, channel: ChannelId, _current: u32) -> u32 {
        // The user's window follows what psm can still hold for this channel (see `flow`).
        self.flows
            .get(&channel)
            .map(|f| f.user_window())
            .unwrap_or(crate::flow::WINDOW)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.flows.remove(&channel);
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
                self.auth_failed(login, "publickey", reason);
                Ok(reject())
            }
        }
    }

    async fn auth_publickey(
        &mut self,
        login: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let user = Login::user_part(login).to_string();
        match key_registered(&self.ctx.policy.get(), &user, key.public_key) {
            Ok(()) => {
                self.auth_ok(login, &user, "publickey");
                Ok(Auth::Accept)
            }
            Err(reason) => {
                self.auth_failed(login, "publickey", reason);
                Ok(reject())
            }
        }
    }

    async fn auth_password(&mut self, login: &str, password: &str) -> Result<Auth, Self::Error> {
        let user = Login::user_part(login).to_string();
        let snap = self.ctx.policy.get();
        let verdict = match snap.user(&user).map(|u| u.password.clone()) {
            None => Err("unknown user"),
            Some(None) => Err("password login not enabled for this user"),
            Some(Some(hash)) => {
                let pw = zeroize::Zeroizing::new(password.to_string());
                // PBKDF2 takes tens of milliseconds: keep it off the worker's event loop.
                let ok = tokio::task::spawn_blocking(move || hash.verify(&pw))
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
            Ok(()) => {
                self.auth_ok(login, &user, "password");
                Ok(Auth::Accept)
            }
            Err(reason) => {
                self.auth_failed(login, "password", reason);
                Ok(reject())
            }
        }
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
        self.channels.retain(|_, c| !matches!(c, Chan::Done));
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
        let state = match self.broker(&user).await {
            Ok((up, target)) => Chan::Pending {
                up,
                down: channel,
                early: Vec::new(),
                target,
            },
            Err(msg) => Chan::Denied(msg),
        };
        self.channels.insert(id, state);
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.ctx.audit.emit(AuditKind::Notice {
            message: format!(
                "port forwarding to {host}:{port} refused for {} from {}",
                self.login,
                self.source()
            ),
        });
        reply
            .reject(ChannelOpenFailure::Other {
                code: 1, // SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
                reason: "psm: port forwarding is not permitted".into(),
            })
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.ctx.audit.emit(AuditKind::Notice {
            message: format!(
                "remote port forwarding of {address}:{port} refused for {} from {}",
                self.login,
                self.source()
            ),
        });
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
        session.channel_failure(channel)?;
        self.refuse_notice(channel, session, "X11 forwarding");
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
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
        match self.channels.get(&channel) {
            Some(Chan::Denied(_)) => return session.channel_success(channel),
            Some(Chan::Pending { .. }) => {}
            _ => return session.channel_failure(channel),
        }
        let req = Req::Pty {
            term: term.to_string(),
            cols: col_width,
            rows: row_height,
            pix_width,
            pix_height,
            modes: modes.to_vec(),
        };
        let ok = self.forward_request(channel, req).await;
        if ok == Some(true) {
            if let Some(rec) = self.shared.recording() {
                rec.resize(channel.into(), col_width, row_height).await;
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
        let sent = match self.channels.get(&channel) {
            Some(Chan::Running { up_w }) => up_w
                .window_change(col_width, row_height, pix_width, pix_height)
                .await
                .is_ok(),
            Some(Chan::Pending { up, .. }) => up
                .window_change(col_width, row_height, pix_width, pix_height)
                .await
                .is_ok(),
            _ => false,
        };
        if sent {
            if let Some(rec) = self.shared.recording() {
                rec.resize(channel.into(), col_width, row_height).await;
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
        if let Some(Chan::Running { up_w }) = self.channels.get(&channel) {
            let _ = up_w.signal(signal).await;
        }
        Ok(())
    }
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

/// What travels from a reader task to its writer task.
enum Item {
    Data(Bytes),
    Ext(u32, Bytes),
    Eof,
    ExitStatus(u32),
    ExitSignal {
        signal: Sig,
        core_dumped: bool,
        message: String,
    },
    Close,
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Data(b) | Item::Ext(_, b) => b.len(),
            _ => 0,
        }
    }
}

fn down_item(m: ChannelMsg) -> Option<Item> {
    Some(match m {
        ChannelMsg::Data { data } => Item::Data(data),
        ChannelMsg::ExtendedData { data, ext } => Item::Ext(ext, data),
        ChannelMsg::Eof => Item::Eof,
        ChannelMsg::ExitStatus { exit_status } => Item::ExitStatus(exit_status),
        ChannelMsg::ExitSignal {
            signal_name,
            core_dumped,
            error_message,
            ..
        } => Item::ExitSignal {
            signal: signal_name,
            core_dumped,
            message: error_message,
        },
        ChannelMsg::Close => Item::Close,
        _ => return None,
    })
}

async fn record_down(rec: Option<&RecordingStream>, ch: u32, item: &Item) {
    let Some(rec) = rec else { return };
    match item {
        Item::Data(d) => rec.data(ch, Direction::Output, d.clone()).await,
        Item::Ext(_, d) => rec.data(ch, Direction::Error, d.clone()).await,
        _ => {}
    }
}

fn account_down(shared: &Shared, flow: &Flow, item: &Item) {
    match item {
        Item::Data(_) | Item::Ext(..) => {
            shared
                .bytes_down
                .fetch_add(item.len() as u64, Ordering::Relaxed);
            flow.down_queued(item.len());
        }
        Item::ExitStatus(s) => shared.with(|st| st.exit_status = Some(*s)),
        Item::ExitSignal { signal, .. } => {
            let name = sig_name(signal);
            shared.with(|st| st.exit_signal = Some(name));
        }
        Item::Close => shared.closed_by("target"),
        Item::Eof => {}
    }
}

fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(c) => c.clone(),
    }
}

/// User -> relay: drains the user's channel into the up queue, recording input.
async fn read_client(
    mut r: russh::ChannelReadHalf,
    tx: mpsc::UnboundedSender<Item>,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
    rec: Option<RecordingStream>,
    ch: u32,
) {
    loop {
        // Only a user who multiplexes channels and keeps one of them congested can get here;
        // the window hook keeps a single channel far below this.
        tokio::select! {
            _ = flow.up_ready() => {}
            _ = tx.closed() => return,
        }
        let item = match r.wait().await {
            Some(ChannelMsg::Data { data }) => {
                shared
                    .bytes_up
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(rec) = &rec {
                    rec.data(ch, Direction::Input, data.clone()).await;
                }
                flow.up_queued(data.len());
                Item::Data(data)
            }
            Some(ChannelMsg::Eof) => Item::Eof,
            Some(ChannelMsg::Close) | None => {
                shared.closed_by("client");
                let _ = tx.send(Item::Close);
                return;
            }
            // Requests are handled by the handler callbacks; nothing else matters here.
            Some(_) => continue,
        };
        if tx.send(item).is_err() {
            return;
        }
    }
}

/// Relay -> target: writes the up queue to the target channel (waiting on its window).
async fn write_target(
    mut rx: mpsc::UnboundedReceiver<Item>,
    w: Arc<ChannelWriteHalf<russh::client::Msg>>,
    flow: Arc<Flow>,
) {
    while let Some(item) = rx.recv().await {
        let n = item.len();
        let r = match item {
            Item::Data(d) => w.data_bytes(d).await,
            Item::Eof => w.eof().await,
            Item::Close => {
                let _ = w.close().await;
                return;
            }
            _ => Ok(()),
        };
        flow.up_written(n);
        if r.is_err() {
            return;
        }
    }
}

/// Target -> relay: drains the target channel into the down queue, recording output.
async fn read_target(
    mut r: russh::ChannelReadHalf,
    tx: mpsc::UnboundedSender<Item>,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
    rec: Option<RecordingStream>,
    ch: u32,
) {
    loop {
        tokio::select! {
            _ = flow.down_ready() => {}
            // The user side is gone: nothing will drain the queue any more.
            _ = tx.closed() => return,
        }
        let Some(msg) = r.wait().await else {
            shared.closed_by("target");
            let _ = tx.send(Item::Close);
            return;
        };
        let Some(item) = down_item(msg) else { continue };
        record_down(rec.as_ref(), ch, &item).await;
        account_down(&shared, &flow, &item);
        let close = matches!(item, Item::Close);
        if tx.send(item).is_err() || close {
            return;
        }
    }
}

/// Relay -> user: writes the down queue to the user's channel (waiting on its window), with
/// exit status / signal and close in order after the data.
async fn write_client(
    mut rx: mpsc::UnboundedReceiver<Item>,
    w: ChannelWriteHalf<Msg>,
    handle: russh::server::Handle,
    flow: Arc<Flow>,
) {
    while let Some(item) = rx.recv().await {
        let n = item.len();
        let r = match item {
            Item::Data(d) => w.data_bytes(d).await,
            Item::Ext(ext, d) => w.extended_data_bytes(ext, d).await,
            Item::Eof => w.eof().await,
            Item::ExitStatus(s) => w.exit_status(s).await,
            Item::ExitSignal {
                signal,
                core_dumped,
                message,
            } => handle
                .exit_signal_request(w.id(), signal, core_dumped, message, "en".into())
                .await
                .map_err(|_| russh::Error::SendError),
            Item::Close => {
                let _ = w.close().await;
                return;
            }
        };
        flow.down_written(n);
        if r.is_err() {
            return;
        }
    }
}
