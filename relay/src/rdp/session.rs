//! One RDP connection up to its start: the pre-authentication limits, X.224, TLS, CredSSP
//! toward the user, the second factor, the access decision, the recording and the target
//! login, all within the login grace time. The second factor and the decision are in `admit`,
//! the running session in `live`.
//!
//! Every refusal after the user named itself reaches the client as a CredSSP logon failure,
//! and the audit log as `auth_failure` (method `nla`, `nla+totp`) or `session_denied` with the
//! side at fault, exactly as for SSH.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use psm_control_api::{now_ms, Account, AuditKind, Denial, Escaped, Login, Target};
use sspi::credssp::TsRequest;

use tracing::info;

use super::accept::{negotiate, Negotiation};
use super::credssp::{encode, logon_failure, FrontNla, NlaLogin, Step};
use super::target::TargetLeg;
use super::tls::GatewayCert;
use super::wire::{Framed, ReadError};
use crate::control_link::Counters;
use crate::end::{Refusal, Side};
use crate::recording::Unstarted;
use crate::session::{logged_login, WorkerCtx};
use crate::startups::UserPermit;

/// The TLS stream toward the user.
pub type ClientTls = tokio_rustls::server::TlsStream<super::RdpLeg>;

/// The authentication method names in the audit log.
pub const METHOD: &str = "nla";
/// With a second factor.
pub const METHOD_TOTP: &str = "nla+totp";

/// Counts live connections for a graceful shutdown.
pub(super) struct LiveGuard(Arc<AtomicUsize>);

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

/// A session id: time plus randomness, as SSH sessions get.
pub(super) fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    format!(
        "{:011x}{}",
        now_ms(),
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// Counts a connection that failed before authenticating and logs it, rate-limited.
/// Counts a failure before authentication and logs it at a limited rate (relay-wide).
pub(super) fn preauth_failure(ctx: &WorkerCtx, peer: SocketAddr, why: &str) {
    Counters::bump(&ctx.counters.preauth_failures);
    let allowed = match ctx.preauth_log.lock() {
        Ok(mut l) => l.allow(Instant::now()),
        Err(p) => p.into_inner().allow(Instant::now()),
    };
    if let Some(suppressed) = allowed {
        info!(%peer, reason = %Escaped(why), suppressed, protocol = "rdp", "connection failed before authentication");
    }
}

/// Who a session is for, once admitted.
pub(super) struct SessionInfo {
    pub(super) session_id: String,
    pub(super) start_ms: u64,
    pub(super) peer: SocketAddr,
    pub(super) user: String,
    pub(super) target: Target,
    pub(super) account: Account,
    pub(super) rules: psm_control_api::RdpChannels,
    /// The reason the user gave, where the grant asks for one.
    pub(super) justification: Option<String>,
    /// What the login gave beyond the first factor (the governor holds the grant in force to it).
    pub(super) satisfied: psm_control_api::Satisfied,
}

/// What the connection phase hands to the running session.
pub(super) struct Admitted {
    pub(super) info: SessionInfo,
    pub(super) client: Framed<ClientTls>,
    pub(super) leg: TargetLeg,
    /// Discarded if the session does not start.
    pub(super) recording: Unstarted,
    pub(super) user_permit: UserPermit,
}

/// Serves one accepted RDP connection to its end.
pub async fn handle_rdp_connection(
    ctx: Arc<WorkerCtx>,
    cert: Arc<GatewayCert>,
    stream: crate::uring::Incoming,
    peer: SocketAddr,
) {
    let _live = LiveGuard::new(&ctx.live);
    Counters::bump(&ctx.counters.connections);
    let permit = match ctx.startups.admit(peer.ip()) {
        Ok(p) => p,
        Err(refusal) => {
            Counters::bump(&ctx.counters.startups_refused);
            preauth_failure(&ctx, peer, &format!("refused: {refusal}"));
            return;
        }
    };
    let _ = stream.set_nodelay();
    let stream = match super::leg(stream) {
        Ok(s) => s,
        Err(e) => {
            preauth_failure(&ctx, peer, &format!("cannot set the connection up: {e}"));
            return;
        }
    };
    let mut phase = Phase {
        ctx: &ctx,
        peer,
        session_id: new_id(),
        start_ms: now_ms(),
        login: None,
        awaiting: Arc::new(AtomicBool::new(false)),
    };
    let awaiting = phase.awaiting.clone();
    let mut shutdown = ctx.shutdown.clone();
    let outcome = {
        let run = phase.run(&cert, stream);
        tokio::pin!(run);
        let grace = tokio::time::sleep(ctx.limits.login_grace);
        tokio::pin!(grace);
        let mut waited = false;
        loop {
            tokio::select! {
                r = &mut run => break r.map_or(Outcome::Ended, |a| Outcome::Admitted(Box::new(a))),
                _ = &mut grace => {
                    let now = tokio::time::Instant::now();
                    if awaiting.load(Ordering::Acquire) {
                        // an access request is open: its own timeout bounds the wait
                        waited = true;
                        grace.as_mut().reset(now + Duration::from_secs(1));
                    } else if waited {
                        // approved: the rest of the login gets a whole grace time
                        waited = false;
                        grace.as_mut().reset(now + ctx.limits.login_grace);
                    } else {
                        break Outcome::GraceExceeded;
                    }
                }
                _ = shutdown.wait_for(|s| *s) => break Outcome::Ended,
            }
        }
    };
    let admitted = match outcome {
        Outcome::Admitted(a) => *a,
        Outcome::Ended => return,
        Outcome::GraceExceeded => {
            phase.grace_exceeded();
            return;
        }
    };
    drop(permit);
    super::live::run(&ctx, admitted).await;
}

/// How the connection phase ended.
enum Outcome {
    Admitted(Box<Admitted>),
    /// Refused or gone (audited already), or the relay is stopping.
    Ended,
    GraceExceeded,
}

/// The connection phase of one connection.
pub(super) struct Phase<'a> {
    pub(super) ctx: &'a WorkerCtx,
    pub(super) peer: SocketAddr,
    pub(super) session_id: String,
    pub(super) start_ms: u64,
    /// The login, once the client named it in NTLM.
    pub(super) login: Option<String>,
    /// An access request is open: the login grace time is suspended.
    pub(super) awaiting: Arc<AtomicBool>,
}

/// A refused login, audited already: the client gets a logon failure and the connection closes.
pub(super) struct Fail;

impl Phase<'_> {
    pub(super) fn source(&self) -> String {
        self.peer.to_string()
    }

    /// An `auth_failure` audit event (method `nla`); `counted`: a wrong secret, counted toward
    /// the rate limit and the lockout.
    pub(super) fn auth_failure(
        &self,
        login: &str,
        method: &str,
        reason: &str,
        side: Option<Side>,
        counted: bool,
    ) {
        let login = logged_login(login);
        if counted {
            self.ctx
                .throttle
                .failed(self.peer.ip(), Login::user_part(&login), now_ms());
        }
        Counters::bump(&self.ctx.counters.auth_failures);
        if let Some(side) = side {
            self.ctx.counters.fault(side);
        }
        info!(peer = %self.peer, login = %Escaped(&login), method, reason = %Escaped(reason), protocol = "rdp", "authentication failed");
        self.ctx.audit.emit(AuditKind::AuthFailure {
            protocol: psm_control_api::Protocol::Rdp,
            login,
            method: method.to_string(),
            source: self.source(),
            reason: reason.to_string(),
            side: side.map(|s| s.to_string()).unwrap_or_default(),
        });
    }

    /// A `session_denied` audit event.
    pub(super) fn denied(&self, login: &str, user: &str, r: &Refusal) {
        info!(peer = %self.peer, login = %Escaped(login), reason = %Escaped(&r.reason), code = r.code, side = %r.side, protocol = "rdp", "session denied");
        self.ctx.counters.fault(r.side);
        self.ctx.audit.emit(AuditKind::SessionDenied {
            protocol: psm_control_api::Protocol::Rdp,
            login: logged_login(login),
            user: user.to_string(),
            source: self.source(),
            reason: r.reason.clone(),
            reason_code: r.code.to_string(),
            side: r.side.to_string(),
            client_message: r.user_line.clone(),
        });
    }

    fn grace_exceeded(&self) {
        let why = "login grace time exceeded";
        match self.login.clone() {
            Some(login) => self.auth_failure(&login, METHOD, why, Some(Side::Client), false),
            None => {
                self.early_failure(why);
            }
        }
    }

    /// A failure before the client named a user: counted and logged (rate-limited) as a
    /// pre-authentication failure, and audited as an `auth_failure` without a login at most 20
    /// times a second for the whole relay (anyone can open connections that fail here: they do
    /// not get to fill the audit queue), the events held back counted in the next one.
    fn early_failure(&self, why: &str) -> Option<Admitted> {
        preauth_failure(self.ctx, self.peer, why);
        // its own limiter: the log's is shared with SSH's pre-authentication failures
        static AUDITED: std::sync::Mutex<Option<crate::startups::LogLimiter>> =
            std::sync::Mutex::new(None);
        let suppressed = {
            let mut l = AUDITED.lock().unwrap_or_else(|p| p.into_inner());
            l.get_or_insert_with(|| {
                crate::startups::LogLimiter::new(20, std::time::Duration::from_secs(1))
            })
            .allow(Instant::now())
        }?;
        let reason = if suppressed > 0 {
            format!("{why} ({suppressed} earlier failures before a login not audited)")
        } else {
            why.to_string()
        };
        self.ctx.audit.emit(AuditKind::AuthFailure {
            protocol: psm_control_api::Protocol::Rdp,
            login: String::new(),
            method: METHOD.to_string(),
            source: self.source(),
            reason,
            side: Side::Client.to_string(),
        });
        None
    }

    async fn run(&mut self, cert: &GatewayCert, stream: super::RdpLeg) -> Option<Admitted> {
        let mut io = Framed::new(stream);
        let cr = match io.read_pdu().await {
            Ok(f) => f,
            // a port scan or a health check: no audit event, as for SSH
            Err(ReadError::Eof) => {
                preauth_failure(self.ctx, self.peer, "closed before the X.224 request");
                return None;
            }
            Err(e) => return self.early_failure(&format!("X.224 request: {e}")),
        };
        match negotiate(&cr) {
            Err(e) => return self.early_failure(&e),
            Ok(Negotiation::Refuse { failure, reason }) => {
                let _ = io.send(&failure).await;
                return self.early_failure(&reason);
            }
            Ok(Negotiation::Hybrid { confirm, .. }) => {
                if io.send(&confirm).await.is_err() {
                    return self.early_failure("connection lost after the X.224 negotiation");
                }
            }
        }
        if !io.buf.is_empty() {
            return self.early_failure("client sent data before the TLS handshake");
        }
        let tls = match tokio_rustls::TlsAcceptor::from(cert.server.clone())
            .accept(io.io)
            .await
        {
            Ok(t) => t,
            Err(e) => return self.early_failure(&format!("TLS handshake failed: {e}")),
        };
        let mut client = Framed::new(tls);
        let (mut nla, login, held) = self.nla(cert, &mut client).await.ok()?;
        let admitted = match self.admit(&login).await {
            Ok(g) => Admitted {
                info: SessionInfo {
                    session_id: self.session_id.clone(),
                    start_ms: self.start_ms,
                    peer: self.peer,
                    user: g.user,
                    target: g.target,
                    account: g.account,
                    rules: g.rules,
                    justification: g.justification,
                    satisfied: g.satisfied,
                },
                client,
                leg: g.leg,
                recording: g.recording,
                user_permit: g.user_permit,
            },
            Err(Fail) => {
                if let Some(r) = logon_failure(*held) {
                    let _ = client.send(&r).await;
                }
                return None;
            }
        };
        self.finish_nla(&mut nla, admitted, *held).await
    }

    /// CredSSP up to the held key proof: the user proved its password.
    async fn nla(
        &mut self,
        cert: &GatewayCert,
        client: &mut Framed<ClientTls>,
    ) -> Result<(FrontNla, NlaLogin, Box<TsRequest>), Fail> {
        let snap = self.ctx.policy.get();
        let throttle = self.ctx.throttle.clone();
        let ip = self.peer.ip();
        let lookup = Box::new(move |l: &NlaLogin| {
            let user = Login::user_part(&l.login);
            let now = now_ms();
            if throttle.limited(ip, user, now) {
                return Err(
                    "rate limited: too many failed logins from this address or for this user"
                        .to_string(),
                );
            }
            let u =
                psm_control_api::policy::user_usable(&snap, user, now).map_err(|d| match d {
                    Denial::UserLocked { .. } => "locked".to_string(),
                    Denial::UserDisabled { .. } => "disabled".to_string(),
                    Denial::UnknownUser { .. } => "unknown user".to_string(),
                    other => other.to_string(),
                })?;
            u.nt_hash.clone().ok_or_else(|| {
                "no NT hash for this user: RDP needs the password set again with psmctl".to_string()
            })
        });
        let mut nla =
            match FrontNla::new(cert.public_key.clone(), &self.peer.ip().to_string(), lookup) {
                Ok(n) => n,
                Err(e) => {
                    self.early_failure(&format!("cannot start CredSSP: {e}"));
                    return Err(Fail);
                }
            };
        loop {
            let bytes = match client.read_ts_request().await {
                Ok(b) => b,
                Err(e) => {
                    let why = format!("CredSSP: {e}");
                    match self.login.clone() {
                        Some(l) => self.auth_failure(&l, METHOD, &why, Some(Side::Client), false),
                        None => {
                            self.early_failure(&why);
                        }
                    }
                    return Err(Fail);
                }
            };
            match nla.step(&bytes) {
                Step::Reply(r) => {
                    if client.send(&r).await.is_err() {
                        self.early_failure("connection lost during CredSSP");
                        return Err(Fail);
                    }
                }
                Step::Verified { login, reply } => {
                    self.login = Some(login.login.clone());
                    return Ok((nla, login, reply));
                }
                Step::Done => {
                    self.early_failure("CredSSP ended before the user was verified");
                    return Err(Fail);
                }
                Step::Failed {
                    reply,
                    login,
                    reason,
                    wrong_secret,
                } => {
                    if let Some(r) = reply {
                        let _ = client.send(&r).await;
                    }
                    let counted = wrong_secret && !reason.starts_with("rate limited");
                    match login {
                        Some(l) => self.auth_failure(&l.login, METHOD, &reason, None, counted),
                        None => {
                            self.early_failure(&reason);
                        }
                    }
                    return Err(Fail);
                }
            }
        }
    }

    /// Sends the held key proof and reads the client's delegated credentials (dropped).
    async fn finish_nla(
        &self,
        nla: &mut FrontNla,
        mut admitted: Admitted,
        held: TsRequest,
    ) -> Option<Admitted> {
        let login = self.login.clone().unwrap_or_default();
        let fail = |why: String| {
            self.auth_failure(&login, METHOD, &why, Some(Side::Client), false);
        };
        let sent = match encode(&held) {
            Ok(b) => admitted.client.send(&b).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let result = match sent {
            Err(e) => Err(format!("CredSSP: cannot send the key proof: {e}")),
            Ok(()) => match admitted.client.read_ts_request().await {
                Err(e) => Err(format!("CredSSP: client did not finish: {e}")),
                Ok(bytes) => match nla.step(&bytes) {
                    Step::Done => Ok(()),
                    Step::Failed { reason, .. } => Err(format!("CredSSP: {reason}")),
                    _ => Err("CredSSP: unexpected message after the key proof".into()),
                },
            },
        };
        match result {
            Ok(()) => Some(admitted),
            Err(why) => {
                fail(why);
                admitted.recording.discard().await;
                None
            }
        }
    }
}
