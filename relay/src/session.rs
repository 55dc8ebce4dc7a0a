//! One user connection: authentication, the access decision, the target leg, and the relaying
//! of every channel between the two legs.
//!
//! The russh server handler ([`Conn`]) stays thin: it authenticates against the policy snapshot
//! (the login dialogue after the first factor is in `login`), asks
//! [`psm_control_api::policy::decide`] for the decision, connects the target leg
//! ([`crate::upstream`]), forwards channel requests (`broker`) and hands each started channel to
//! four small tasks (a reader and a writer per direction) joined by [`crate::flow::Flow`]. The
//! connection's life, with the policy checks while it runs, is in `lifecycle`. Every task stays
//! on the worker thread that accepted the connection.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use psm_control_api::{
    decide, now_ms, Attempt, AuditKind, ChannelKind, Escaped, Governor, LiveSession, Login,
    PolicySnapshot, Verdict,
};
use psm_recorder_format::{CloseSummary, RecordingMeta};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelWriteHalf, Pty, Sig};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::control_link::{AuditSink, Counters, KillSwitch, PolicyStore, SessionBytes};
use crate::cut::Cuttable;
use crate::end::{EndReason, Refusal, Side};
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

mod auth;
mod broker;
mod lease;
mod lifecycle;
mod login;
mod relay;
mod requests;
mod reverse;
mod shared;
pub(crate) mod tap;
mod tcp_forward;

pub use lifecycle::handle_connection;
pub use login::MAX_REASON;
use shared::SessionInfo;
pub(crate) use shared::{Shared, SharedState, Windows};

use auth::{check_password, key_registered, reject, second_factor};
use requests::{disconnect_target, Req};
pub(crate) use requests::{ForwardKind, Open};

/// What the user is told when recording is required and psm-recorder cannot take the session.
pub const RECORDING_UNAVAILABLE: &str = "psm: session recording is unavailable; try again later";

/// Opens a new session's recording as policy says, for SSH and RDP alike: none under a grant
/// that says `unrecorded`; otherwise confirmed open by psm-recorder, or, when it cannot take the
/// session, a refusal if recording is required (`recording_unavailable`) and no recording if it
/// is optional.
pub(crate) async fn open_recording(
    recorder: &WorkerRecorder,
    unrecorded: bool,
    required: bool,
    meta: RecordingMeta,
) -> Result<Option<RecordingStream>, Refusal> {
    if unrecorded {
        return Ok(None);
    }
    match recorder.open(meta).await {
        Ok(rec) => Ok(Some(rec)),
        Err(e) if required => Err(Refusal::new(
            Side::Recorder,
            "recording_unavailable",
            format!("session recording unavailable: {e}"),
            RECORDING_UNAVAILABLE.into(),
        )),
        Err(e) => {
            debug!(error = %e, "recording not required; the session runs unrecorded");
            Ok(None)
        }
    }
}
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
    /// Open pass-through leases (relay-wide).
    pub leases: Arc<crate::passthrough::Leases>,
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

enum Chan {
    /// On a login without a target: waits for its request (`requests …`, or refused).
    Plain,
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
        /// What the channel's target connection may open toward the user (the agent).
        route: Arc<upstream::Route>,
    },
    /// Relaying.
    Running {
        up_w: Arc<ChannelWriteHalf<russh::client::Msg>>,
        /// Command control of a shell.
        gate: Option<Arc<crate::commands::Gate>>,
    },
    /// A lease of a `tcp` target: the line its shell or exec request answers with.
    Lease(String),
    /// A local forward relayed to a `tcp` target's own connection.
    Forwarding,
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
    /// What the login gave beyond the first factor: every channel's grant, and the running
    /// session's, is held to it (a grant that asks for more refuses the channel or ends the
    /// session).
    satisfied: psm_control_api::Satisfied,
    /// Remote forwards in place: (address, port as the user knows it) → their target connection.
    remote_forwards: HashMap<(String, u32), Arc<TargetHandle>>,
    /// The conditions of the grant the latest channel was brokered under.
    conditions: psm_control_api::Conditions,
    channels: HashMap<ChannelId, Chan>,
    /// The kinds of request whose refusal the user was told of (once each: repeats are only
    /// refused, or a flood of them would queue notices the user never reads).
    told: HashSet<&'static str>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // an access request this connection watched and never waited on: nobody else will
        if let Some((id, _, _)) = self.approval_watch.take() {
            self.ctx.approvals.unwatch(id);
        }
    }
}

// The heavy handlers (brokering, which dials the target and logs in; starting a channel; the
// keyboard-interactive dialogue) run boxed: russh keeps its connection's future for the whole
// session, and an unboxed handler future inside it would keep its largest state (the target's
// whole handshake) in every idle session's memory.
impl russh::server::Handler for Conn {
    type Error = russh::Error;

    fn adjust_window(&mut self, channel: ChannelId, _current: u32) -> u32 {
        // The user's window follows what psm can still hold for this channel (see `flow`).
        self.shared.windows(|w| {
            let next = w
                .flows
                .get(&channel)
                .map(|f| f.user_window())
                .unwrap_or(WINDOW);
            w.mirror.hook(next);
            next
        })
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.lease_input(channel, data, session)?;
        if let Err(v) = self
            .shared
            .windows(|w| w.mirror.data(channel.into(), data.len()))
        {
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
        self.shared.windows(|w| {
            w.flows.remove(&channel);
            w.mirror.closed(channel.into());
        });
        self.lease_closed(channel);
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
        let verdict = check_password(&self.ctx, &user, password).await;
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
        Ok(Box::pin(self.keyboard_interactive(login, response)).await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((user, reply)) = self.admit_channel(reply).await else {
            return Ok(());
        };
        let id = channel.id();
        if !self.login.contains('@') {
            // a login without a target (nothing to choose from the menu, or an approver): its
            // first request says whether it is psm's own `requests` command or a refusal
            self.channels.insert(id, Chan::Plain);
            self.opened(id);
            reply.accept().await;
            return Ok(());
        }
        if self.login_is_tcp() {
            let state = Box::pin(self.lease(&user)).await;
            self.channels.insert(id, state);
            self.opened(id);
            reply.accept().await;
            return Ok(());
        }
        let state = match Box::pin(self.broker(&user, &Open::Session, session.handle())).await {
            Ok(b) => self.pending_channel(channel, b),
            Err(msg) => Chan::Denied(msg),
        };
        self.channels.insert(id, state);
        self.opened(id);
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
        let Some((user, reply)) = self.admit_channel(reply).await else {
            return Ok(());
        };
        // a local forward is a channel of its own, brokered under the grant like a session,
        // allowed only where the grant says forward-local (and lists the destination)
        let open = Open::DirectTcpip {
            host: host.to_string(),
            port,
            orig_addr: originator_address.to_string(),
            orig_port: originator_port,
        };
        let destination = crate::escape_short(&format!("{host}:{port}"));
        if self.login_is_tcp() {
            Box::pin(self.tcp_forward(&user, channel, &open, destination, reply, session.handle()))
                .await;
            return Ok(());
        }
        match Box::pin(self.broker(&user, &open, session.handle())).await {
            Ok(b) => {
                let id = channel.id();
                let state = self.pending_channel(channel, b);
                self.channels.insert(id, state);
                self.opened(id);
                reply.accept().await;
                self.shared
                    .audit_request(id.into(), "direct-tcpip", destination.clone(), true);
                Box::pin(self.start(
                    id,
                    session.handle(),
                    false,
                    Some((ForwardKind::Local, destination)),
                    None,
                ))
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
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.remote_forward(address, port, session.handle()).await)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.cancel_remote_forward(address, port).await)
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
        Ok(self.forward_agent(channel, session).await)
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
            Some(Chan::Denied(_) | Chan::Plain | Chan::Lease(_)) => {
                return session.channel_success(channel)
            }
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
        if !self.conditions_now(|c| c.env_allowed(name)) {
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
        Box::pin(self.start_request(channel, session, Req::Shell)).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Box::pin(self.start_request(channel, session, Req::Exec(data.to_vec()))).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Box::pin(self.start_request(channel, session, Req::Subsystem(name.to_string()))).await
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
