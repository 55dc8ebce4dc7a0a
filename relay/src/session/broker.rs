//! Deciding and brokering: the access decision for each new channel, the target leg, the
//! channel requests forwarded and answered, the start of relaying, denials and notices.

use super::*;

/// A new user channel's target leg, brokered: the channel on its own target connection.
pub(super) struct Brokered {
    pub(super) up: Channel<russh::client::Msg>,
    pub(super) leg: TargetLeg,
}

/// A target connection set up for one user channel or one remote forward.
pub(super) struct TargetLeg {
    pub(super) target: Arc<TargetHandle>,
    pub(super) loss: LossWatch,
    /// What the target may open toward the user over this connection.
    pub(super) route: Arc<upstream::Route>,
}

impl Conn {
    /// A channel the user opened: russh's window bookkeeping for it starts.
    pub(super) fn opened(&self, id: ChannelId) {
        self.shared.windows(|w| w.mirror.opened(id.into(), WINDOW));
    }

    /// Admits a new user channel: an authenticated user, and room under [`MAX_CHANNELS`];
    /// otherwise the open is refused here and None returned.
    pub(super) async fn admit_channel(
        &mut self,
        reply: ChannelOpenHandle,
    ) -> Option<(String, ChannelOpenHandle)> {
        let Some(user) = self.user.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return None;
        };
        self.reap();
        if self.channels.len() >= MAX_CHANNELS {
            reply
                .reject(ChannelOpenFailure::Other {
                    code: 4, // SSH_OPEN_RESOURCE_SHORTAGE
                    reason: format!("psm: at most {MAX_CHANNELS} channels per connection"),
                })
                .await;
            return None;
        }
        Some((user, reply))
    }

    /// A brokered channel waiting for the request that starts it (a local forward starts at
    /// once); the user's side is read from now on.
    pub(super) fn pending_channel(&self, channel: Channel<Msg>, b: Brokered) -> Chan {
        let id = channel.id();
        let (down_r, down_w) = channel.split();
        let shared = self.shared.clone();
        let reader = PreStart::spawn(down_r, move |n| {
            shared.violated(format!(
                "sent {n} bytes on channel {} before it started",
                u32::from(id)
            ))
        });
        Chan::Pending {
            up: b.up,
            down_w,
            reader,
            early: Vec::new(),
            target: b.leg.target,
            loss: b.leg.loss,
            requests: 0,
            pty: None,
            route: b.leg.route,
        }
    }

    pub(super) fn source(&self) -> String {
        self.shared.peer.to_string()
    }

    pub(super) fn auth_failed(&self, login: &str, method: &str, reason: &str) {
        self.ctx
            .throttle
            .failed(self.shared.peer.ip(), Login::user_part(login), now_ms());
        self.auth_refused(login, method, reason);
    }

    /// Audits a refused login without counting it toward the rate limit (a key an agent
    /// offers that is not registered, a denied approval).
    pub(super) fn auth_refused(&self, login: &str, method: &str, reason: &str) {
        self.auth_refused_by(login, method, reason, None);
    }

    /// [`Conn::auth_refused`] naming the side at fault when it is not the client.
    pub(super) fn auth_refused_by(
        &self,
        login: &str,
        method: &str,
        reason: &str,
        side: Option<Side>,
    ) {
        let login = logged_login(login);
        Counters::bump(&self.ctx.counters.auth_failures);
        if let Some(side) = side {
            self.ctx.counters.fault(side);
        }
        info!(peer = %self.shared.peer, login = %Escaped(&login), method, reason, "authentication failed");
        self.ctx.audit.emit(AuditKind::AuthFailure {
            protocol: psm_control_api::Protocol::Ssh,
            login,
            method: method.to_string(),
            source: self.source(),
            reason: reason.to_string(),
            side: side.map(|s| s.to_string()).unwrap_or_default(),
        });
    }

    pub(super) fn auth_ok(&mut self, login: &str, user: &str, method: &str) -> Auth {
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
            protocol: psm_control_api::Protocol::Ssh,
            login: logged_login(login),
            user: user.to_string(),
            method: method.to_string(),
            source: self.source(),
        });
        Auth::Accept
    }

    /// Counts a request on a channel that has not started; too many is a protocol violation.
    pub(super) fn prestart_request(&mut self, channel: ChannelId) {
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

    /// Audits a refused session, channel or forward; returns the user's line.
    pub(super) fn deny(&self, user: &str, r: Refusal) -> String {
        info!(peer = %self.shared.peer, login = %Escaped(&self.login), reason = %Escaped(&r.reason), code = r.code, side = %r.side, "session denied");
        self.ctx.counters.fault(r.side);
        self.ctx.audit.emit(AuditKind::SessionDenied {
            protocol: psm_control_api::Protocol::Ssh,
            login: logged_login(&self.login),
            user: user.to_string(),
            source: self.source(),
            reason: r.reason,
            reason_code: r.code.to_string(),
            side: r.side.to_string(),
            client_message: r.user_line.clone(),
        });
        r.user_line
    }

    /// `user`'s attempt on `account@target` from this connection's address, now.
    pub(super) fn attempt<'a>(
        &self,
        user: &'a str,
        account: &'a str,
        target: &'a str,
    ) -> Attempt<'a> {
        Attempt {
            user,
            account,
            target,
            source: self.shared.peer.ip(),
            now_ms: now_ms(),
        }
    }

    /// Whether the MFA cache stands in for the second factor `permit` asks of `user` now.
    pub(super) fn mfa_cached(&self, user: &str, permit: &psm_control_api::Permit<'_>) -> bool {
        let ip = self.shared.peer.ip();
        permit
            .conditions()
            .mfa_cache_ms
            .is_some_and(|ms| self.ctx.mfa.cached(user, ip, ms, now_ms()))
    }

    /// Whether the grant in force now for this connection's login allows channels of `kind`
    /// (decided again: a policy push since the channel opened counts), and asks for no step
    /// the login did not give.
    pub(super) fn allows_now(&self, kind: ChannelKind) -> bool {
        self.conditions_now(|c| c.allows(kind))
    }

    /// `f` of the conditions of the grant in force now for this connection's login; false
    /// when nothing allows the login now, or the grant asks for a step the login did not give.
    pub(super) fn conditions_now(
        &self,
        f: impl FnOnce(&psm_control_api::Conditions) -> bool,
    ) -> bool {
        let (Some(user), Ok(login)) = (&self.user, Login::parse(&self.login)) else {
            return false;
        };
        let snap = self.ctx.policy.get();
        decide(&snap, &self.attempt(user, &login.account, &login.target))
            .is_ok_and(|permit| self.satisfied.missing(&permit).is_none() && f(permit.conditions()))
    }

    /// Why this connection's login may no longer run at all under the policy in force now (no
    /// grant allows it, or the grant asks for a step the login did not give); None while it may.
    pub(super) fn stop_now(&self) -> Option<psm_control_api::PolicyStop> {
        let (Some(user), Ok(login)) = (&self.user, Login::parse(&self.login)) else {
            return None;
        };
        let snap = self.ctx.policy.get();
        match decide(&snap, &self.attempt(user, &login.account, &login.target)) {
            Err(d) => Some(psm_control_api::PolicyStop::Denied(d)),
            Ok(permit) => self
                .satisfied
                .missing(&permit)
                .map(psm_control_api::PolicyStop::Unsatisfied),
        }
    }

    /// The refusal of a login without a target when nothing is available to it.
    pub(super) fn no_account() -> Refusal {
        Refusal::new(
            Side::Policy,
            "no_account_available",
            "no target named and no account available now".into(),
            "psm: no account is available to you now; name one with ssh <user>@<account>@<target>@<gateway>".into(),
        )
    }

    /// Decides and, when allowed, brokers a new session channel or local forward on the
    /// target. Each user channel gets its own target connection, so a slow channel never holds
    /// up another one's target leg (a russh connection stops reading for all its channels when
    /// one is full).
    pub(super) async fn broker(
        &mut self,
        user: &str,
        open: &Open,
        handle: russh::server::Handle,
    ) -> Result<Brokered, String> {
        let leg = self.target_leg(user, open, handle).await?;
        let (target, name) = (leg.target.clone(), self.shared.who().unwrap_or_default().1);
        let opening = match open {
            Open::Session => {
                tokio::time::timeout(REQUEST_TIMEOUT, target.channel_open_session()).await
            }
            Open::DirectTcpip {
                host,
                port,
                orig_addr,
                orig_port,
            } => {
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    target.channel_open_direct_tcpip(
                        host.clone(),
                        *port,
                        orig_addr.clone(),
                        *orig_port,
                    ),
                )
                .await
            }
            Open::RemoteForward { .. } => Ok(Err(russh::Error::WrongChannel)),
        };
        match opening.unwrap_or(Err(russh::Error::ConnectionTimeout)) {
            Ok(up) => Ok(Brokered { up, leg }),
            Err(e) => {
                let err = upstream::UpstreamError::ChannelRefused {
                    target: name,
                    reason: e.to_string(),
                };
                Err(self.deny(user, Refusal::target(&err)))
            }
        }
    }

    /// Decides a new channel or forward under the policy in force and, for the first one, opens
    /// its recording (confirmed open before anything reaches the target: a user who cannot be
    /// recorded is told so up front). Denials are audited; the user's line is returned.
    pub(super) async fn admit_open(
        &mut self,
        user: &str,
        open: &Open,
    ) -> Result<
        (
            psm_control_api::Target,
            psm_control_api::Account,
            Option<RecordingStream>,
        ),
        String,
    > {
        let login = match Login::parse(&self.login) {
            Ok(l) => l,
            Err(_) if !self.login.contains('@') => {
                // a login without a target whose menu had nothing to offer
                return Err(self.deny(user, Conn::no_account()));
            }
            Err(e) => {
                let line = format!(
                    "psm: malformed login '{}': use ssh <user>@<account>@<target>@<gateway>",
                    crate::escape_short(&self.login)
                );
                return Err(self.deny(
                    user,
                    Refusal::new(Side::Client, "malformed_login", e.to_string(), line),
                ));
            }
        };
        let snap = self.ctx.policy.get();
        let permit = match decide(&snap, &self.attempt(user, &login.account, &login.target)) {
            Ok(p) => p,
            Err(d) => return Err(self.deny(user, Refusal::policy(&d))),
        };
        let (target, account) = (permit.target.clone(), permit.account.clone());
        // the grant deciding now may not be the one that decided the login (it was refused
        // then, or another grant applies now): it gets no step of the login for free
        if permit.mfa && !self.satisfied.mfa {
            self.satisfied.mfa = self.mfa_cached(user, &permit);
        }
        if let Some(step) = self.satisfied.missing(&permit) {
            return Err(self.deny(
                user,
                Refusal::new(
                    Side::Policy,
                    "login_step_missing",
                    format!(
                        "the grant in force for {}@{} asks for {step} at login, which this connection's login did not give",
                        account.username, target.name
                    ),
                    format!(
                        "psm: {}@{} needs {step} at login: connect again",
                        account.username, target.name
                    ),
                ),
            ));
        }
        self.conditions = permit.conditions().clone();
        if self.started
            && self.shared.recording().is_none()
            && !self.conditions.unrecorded
            && snap.recording_required
        {
            // the session began unrecorded under a grant that said so; the grant deciding now
            // records, and a channel cannot join an unrecorded session under it
            return Err(self.deny(
                user,
                Refusal::new(
                    Side::Policy,
                    "recording_required",
                    format!(
                        "the session is unrecorded and the grant now in force for {}@{} records",
                        account.username, target.name
                    ),
                    "psm: this session is unrecorded and the grant now in force records it: connect again".into(),
                ),
            ));
        }
        if target.protocol == psm_control_api::Protocol::Tcp {
            let t = &target.name;
            match open {
                Open::Session => {}
                Open::DirectTcpip { host, port, .. } => {
                    if !tcp_forward::names_target(&target, host, *port) {
                        let to = crate::escape_short(&format!("{host}:{port}"));
                        return Err(self.deny(
                            user,
                            Refusal::new(
                                Side::Policy,
                                "forward_not_allowed",
                                format!("local forward to {to} on tcp target {t}, which forwards reach only at itself ({})", target.address),
                                format!("psm: {t} is a tcp target: a local forward reaches only {t} at its port"),
                            ),
                        ));
                    }
                }
                Open::RemoteForward { .. } => {
                    return Err(self.deny(
                        user,
                        Refusal::new(
                            Side::Client,
                            "lease_only",
                            format!("{t} is a tcp target: only a lease (a session channel) or a local forward to it opens there"),
                            format!("psm: {t} is a tcp target: hold a lease with ssh <user>@{}@{t}@<gateway> and connect to its psm port, or forward to it with ssh -L", psm_control_api::TCP_ACCOUNT),
                        ),
                    ));
                }
            }
        }
        if let Open::DirectTcpip { host, port, .. } = open {
            if !self.conditions.forward_allowed(host, *port) {
                let to = crate::escape_short(&format!("{host}:{port}"));
                self.notice("port forwarding", &to, format!(" to {to}"));
                return Err(self.deny(
                    user,
                    Refusal::new(
                        Side::Policy,
                        "forward_not_allowed",
                        format!(
                            "local forward to {to} not allowed by the grant for {}@{}",
                            account.username, target.name
                        ),
                        format!("psm: port forwarding to {to} is not permitted by policy"),
                    ),
                ));
            }
        }
        if let Open::RemoteForward { address, port } = open {
            if !self.allows_now(ChannelKind::ForwardRemote) {
                let at = crate::escape_short(&format!("{address}:{port}"));
                self.notice("remote port forwarding", &at, format!(" of {at}"));
                return Err(self.deny(
                    user,
                    Refusal::new(
                        Side::Policy,
                        "remote_forward_not_allowed",
                        format!(
                            "remote forward of {at} not allowed by the grant for {}@{}",
                            account.username, target.name
                        ),
                        "psm: remote port forwarding is not permitted by policy".to_string(),
                    ),
                ));
            }
        }
        // The recording is confirmed open before the relay logs in to the target: a user who
        // cannot be recorded is told so up front, and the target never sees the login.
        let mut opened = None;
        if !self.started {
            let meta = RecordingMeta {
                protocol: String::new(),
                recording_id: self.shared.session_id.clone(),
                session_id: self.shared.session_id.clone(),
                user: user.to_string(),
                target: target.name.clone(),
                account: account.username.clone(),
                source: self.source(),
                start_ms: self.shared.start_ms,
            };
            let unrecorded = self.conditions.unrecorded;
            opened = open_recording(
                &self.ctx.recorder,
                unrecorded,
                snap.recording_required,
                meta,
            )
            .await
            .map_err(|r| self.deny(user, r))?;
        }
        Ok((target, account, opened))
    }

    /// Starts the session on its first brokered channel: the governor, `session_start`, the
    /// live-session entry.
    pub(super) fn begin(
        &mut self,
        user: &str,
        target: &psm_control_api::Target,
        account: &psm_control_api::Account,
        opened: Option<RecordingStream>,
    ) {
        if self.started {
            return;
        }
        let recorded = opened.is_some();
        {
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
                    recorded,
                    satisfied: self.satisfied,
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
                recorded,
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
                protocol: psm_control_api::Protocol::Ssh,
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
                recorded,
            });
            self.started = true;
        }
    }

    /// Decides a new channel or forward under the policy in force, starts the session (its
    /// recording confirmed open, `session_start`) when it is the first, and logs in to the
    /// target on a connection of its own. Denials are audited; the user's line is returned.
    pub(super) async fn target_leg(
        &mut self,
        user: &str,
        open: &Open,
        handle: russh::server::Handle,
    ) -> Result<TargetLeg, String> {
        let (target, account, opened) = self.admit_open(user, open).await?;
        if target.protocol == psm_control_api::Protocol::Tcp {
            // the policy made the target `tcp` after this connection's channel was routed here:
            // no SSH login toward it (a lease or a forward on a new connection reaches it)
            if let Some(rec) = opened {
                rec.discard().await;
            }
            let t = &target.name;
            return Err(self.deny(
                user,
                Refusal::new(
                    Side::Policy,
                    "lease_only",
                    format!("{t} became a tcp target while the channel was decided"),
                    format!("psm: {t} is a tcp target: connect again"),
                ),
            ));
        }
        let (target, account) = (&target, &account);
        let (reverse_tx, reverse_rx) = mpsc::channel(upstream::REVERSE_QUEUE);
        let route = Arc::new(upstream::Route::default());
        let (target_handle, loss) = match upstream::connect(
            target,
            account,
            self.ctx.limits.target_keepalive,
            self.shared.notices.clone(),
            Some((route.clone(), reverse_tx)),
        )
        .await
        {
            Ok((h, loss)) => (Arc::new(h), loss),
            Err(e) => {
                if let Some(rec) = opened {
                    rec.discard().await;
                }
                return Err(self.deny(user, Refusal::target(&e)));
            }
        };
        // the session may have ended while the target was dialled (a kill, a policy stop, the
        // user gone): then this connection goes at once instead of outliving the session
        let closing = self.shared.with(|s| {
            if !s.closing {
                // connections of channels that are over are closed: the list keeps live ones
                s.targets.retain(|t| !t.is_closed());
                s.targets.push(target_handle.clone());
            }
            s.closing
        });
        if closing {
            disconnect_target(&target_handle).await;
            if let Some(rec) = opened {
                rec.discard().await;
            }
            return Err("psm: the session is ending".into());
        }
        self.begin(user, target, account, opened);
        reverse::spawn_router(self.shared.clone(), handle, reverse_rx, loss.clone());
        Ok(TargetLeg {
            target: target_handle,
            loss,
            route,
        })
    }

    /// Sends a request upstream and waits for the target's answer, keeping anything else that
    /// arrives meanwhile for the relay tasks.
    pub(super) async fn forward_request(&mut self, channel: ChannelId, req: Req) -> Option<bool> {
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
    pub(super) async fn start(
        &mut self,
        channel: ChannelId,
        handle: russh::server::Handle,
        shell: bool,
        forward: Option<(ForwardKind, String)>,
        tap: Option<Arc<tap::Tap>>,
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
        // every shell gets command control: its lines are audited, and decided by the rules
        let gate = shell.then(|| Arc::new(crate::commands::Gate::new(pty)));
        let up_w = relay::spawn(
            &self.shared,
            relay::Relaying {
                channel,
                handle,
                down_r,
                down_w,
                before,
                up: relay::Up::Channel { up, early, loss },
                gate: gate.clone(),
                forward,
                dedicated: Some(target),
                tap,
            },
        )
        .await;
        if let Some(up_w) = up_w {
            self.channels.insert(channel, Chan::Running { up_w, gate });
        }
    }

    /// Delivers a denial on a channel: the message on stderr, exit status 255, close.
    pub(super) fn deliver_denial(
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

    pub(super) async fn start_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
        req: Req,
    ) -> Result<(), russh::Error> {
        match self.channels.get(&channel) {
            Some(Chan::Plain) => {
                if let Req::Exec(cmd) = &req {
                    let cmd = String::from_utf8_lossy(cmd).into_owned();
                    if cmd.trim_start().starts_with("requests") {
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
                let user = self.user.clone().unwrap_or_default();
                let msg = self.deny(&user, Conn::no_account());
                self.channels.insert(channel, Chan::Denied(msg));
                return self.deliver_denial(channel, session);
            }
            Some(Chan::Denied(_)) => return self.deliver_denial(channel, session),
            Some(Chan::Lease(_)) => return self.lease_started(channel, session),
            Some(Chan::Pending { .. }) => {}
            _ => return session.channel_failure(channel),
        }
        let (request, command) = req.describe();
        let kind = req.kind();
        let shell = matches!(req, Req::Shell);
        let permitted = match kind {
            Some(k) => self.allows_now(k),
            None => false,
        };
        if permitted && matches!(req, Req::Exec(_)) {
            // command control: the command line is decided before it is sent
            let v = self
                .shared
                .decide_command(channel.into(), &command, "exec")
                .await;
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
        // file transfers (sftp, legacy scp) and an exec's end are read from the channel's bytes
        let tap = if permitted {
            tap::Tap::for_start(channel.into(), kind, &command, matches!(req, Req::Exec(_)))
        } else {
            None
        };
        let accepted = if permitted {
            self.forward_request(channel, req).await == Some(true)
        } else if let Some(stop) = self.stop_now() {
            // the policy changed under a request in flight: the session itself ends, and the
            // user is told why rather than that the channel kind is refused
            self.refuse_started(channel, stop.user_line());
            self.shared.stop(EndReason::Policy(stop));
            false
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
        self.shared
            .audit_request(channel.into(), request, command, accepted);
        if accepted {
            session.channel_success(channel)?;
            self.start(channel, session.handle(), shell, None, tap)
                .await;
        } else if !permitted {
            return self.deliver_denial(channel, session);
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    /// Turns a brokered channel into a denied one (its target connection is closed); the
    /// denial is delivered by [`Conn::deliver_denial`].
    pub(super) fn refuse_started(&mut self, channel: ChannelId, message: String) {
        if let Some(Chan::Pending { target, .. }) = self.channels.remove(&channel) {
            tokio::spawn(async move { disconnect_target(&target).await });
        }
        self.channels.insert(channel, Chan::Denied(message));
    }

    pub(super) fn refuse_notice(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
        what: &'static str,
    ) {
        self.notice(what, "", String::new());
        if !self.told.insert(what) {
            return;
        }
        let _ = session.extended_data(
            channel,
            1,
            Bytes::from(format!("psm: {what} is not permitted\r\n")),
        );
    }

    /// An aggregated notice of kind `what refused` (see [`Notices`]).
    pub(super) fn notice(&self, what: &'static str, detail: &str, extra: String) {
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
    pub(super) fn reap(&mut self) {
        let done: Vec<ChannelId> = self
            .shared
            .finished
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        for ch in &done {
            self.channels.remove(ch);
        }
        self.shared.windows(|w| {
            for ch in done {
                w.flows.remove(&ch);
                w.mirror.closed(ch.into());
            }
        });
        self.channels.retain(|_, c| !matches!(c, Chan::Done));
    }
}
