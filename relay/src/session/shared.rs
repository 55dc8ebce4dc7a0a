//! The state of one connection that outlives the russh handler: who the session is, its
//! recording, its target legs, its policy side, the user leg's windows, and the notifications
//! its tasks wait on.

use super::*;

pub(super) struct SessionInfo {
    pub(super) user: String,
    pub(super) target: String,
    pub(super) account: String,
    pub(super) recording_id: String,
    pub(super) justification: Option<String>,
}

#[derive(Default)]
pub(crate) struct SharedState {
    pub(super) info: Option<SessionInfo>,
    pub(super) recording: Option<RecordingStream>,
    pub(super) targets: Vec<Arc<TargetHandle>>,
    pub(crate) exit_status: Option<u32>,
    pub(crate) exit_signal: Option<String>,
    pub(super) end: Option<EndReason>,
    /// The policy side of the session, once it started.
    pub(super) governor: Option<Governor>,
    /// Channels relaying now (where an end-of-session line is written).
    pub(super) running: Vec<ChannelId>,
    /// The pass-through lease this session holds (a `tcp` target).
    pub(super) lease: Option<crate::passthrough::LeaseGuard>,
    /// The session's loop has ended: nothing new (a lease) may start.
    pub(super) closing: bool,
}

/// The user leg's receive windows: russh's bookkeeping replayed (to catch data beyond them) and
/// the flow of each relayed channel (the window it may have). Shared, because channels psm
/// opens toward the user (remote forwards, the forwarded agent) start outside the handler.
pub(crate) struct Windows {
    pub(super) mirror: WindowMirror,
    pub(super) flows: HashMap<ChannelId, Arc<Flow>>,
}

/// State of one connection that outlives the russh handler (for the end-of-session record).
pub(crate) struct Shared {
    pub(super) session_id: String,
    pub(super) peer: SocketAddr,
    pub(super) start_ms: u64,
    pub(crate) bytes: Arc<SessionBytes>,
    pub(super) authenticated: AtomicBool,
    /// Notified when psm-recorder can no longer write this session's recording.
    pub(super) recording_lost: Notify,
    /// Notified when the client broke the protocol (the reason is in the state's `end`).
    pub(super) violation: Notify,
    /// The connection's aggregated notices.
    pub(crate) notices: Arc<Notices>,
    /// Channels whose relaying finished (russh does not call `channel_close` when the target
    /// closed them): the handler drops them from its tables.
    pub(super) finished: Mutex<Vec<ChannelId>>,
    /// An operator's kill arrives here.
    pub(super) kill: Arc<KillSwitch>,
    /// Notified when the relay itself ends the session (a command rule that terminates).
    pub(super) stopped: Notify,
    /// Until when (ms since the epoch; 0: not) the login waits for an approval: the login
    /// grace time does not run meanwhile. Set when the "waiting for approval" step is sent,
    /// to the request's expiry and the time `ApprovalRpc::decided` waits beyond it, so a
    /// client that never answers that step is cut once the request could no longer be decided.
    pub(crate) awaiting_until: AtomicU64,
    /// The policy in force (for command decisions on the relay tasks).
    pub(super) policy: Arc<PolicyStore>,
    /// Audit events.
    pub(super) audit: AuditSink,
    /// Notified when the session starts (its governor is set).
    pub(super) governed: Notify,
    /// The user leg's windows and flows.
    pub(super) windows: Mutex<Windows>,
    /// Channels psm opened toward the user that are relaying now.
    pub(super) reverse_open: AtomicUsize,
    /// True once the session is over: its channels' relaying tasks stop, whatever they were
    /// waiting for (room in a window that will never open, a queue no one drains).
    pub(super) over: watch::Sender<bool>,
    pub(super) state: Mutex<SharedState>,
}

impl SessionInfo {
    /// (user, target, account), for audit events.
    pub(super) fn who(&self) -> (String, String, String) {
        (self.user.clone(), self.target.clone(), self.account.clone())
    }
}

impl Shared {
    /// (user, target, account) of the session, once it started.
    pub(crate) fn who(&self) -> Option<(String, String, String)> {
        self.with(|s| s.info.as_ref().map(SessionInfo::who))
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut SharedState) -> R) -> R {
        match self.state.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
    pub(super) fn recording(&self) -> Option<RecordingStream> {
        self.with(|s| s.recording.clone())
    }
    pub(super) fn windows<R>(&self, f: impl FnOnce(&mut Windows) -> R) -> R {
        match self.windows.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// The grant that covers the running session now, decided again under the policy in force
    /// (None: the session has not started, or nothing covers it any more).
    pub(super) fn permit_now<R>(
        &self,
        f: impl FnOnce(&PolicySnapshot, &psm_control_api::Permit<'_>, &str) -> R,
    ) -> Option<R> {
        let snap = self.policy.get();
        let gov = self.with(|s| s.governor.clone())?;
        let permit = decide(
            &snap,
            &Attempt {
                user: &gov.user,
                account: &gov.account,
                target: &gov.target,
                source: gov.source,
                now_ms: now_ms(),
            },
        )
        .ok()?;
        Some(f(&snap, &permit, &gov.user))
    }

    /// Whether the grant that covers the session now allows channels of `kind`.
    pub(crate) fn allows_now(&self, kind: ChannelKind) -> bool {
        self.permit_now(|_, p, _| p.conditions().allows(kind))
            .unwrap_or(false)
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
    /// it (`source`: `exec`, `shell` or `stdin`); waits first while the audit queue holds its
    /// share of command events (`AuditSink::command_room`): a line is never decided unaudited.
    pub(crate) async fn decide_command(
        &self,
        channel: u32,
        line: &str,
        source: &str,
    ) -> psm_control_api::CommandVerdict {
        self.audit.command_room().await;
        let info = self.with(|s| s.info.as_ref().map(SessionInfo::who));
        let verdict = self
            .permit_now(|snap, permit, user| {
                let user = snap.user(user)?;
                Some(
                    psm_control_api::CommandPolicy::for_session(snap, permit.grant, user)
                        .check(line),
                )
            })
            .flatten()
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

    /// Audits a channel request of the running session (nothing before it started).
    pub(crate) fn audit_request(
        &self,
        channel: u32,
        request: &str,
        command: String,
        accepted: bool,
    ) {
        if let Some((user, target, account)) = self.who() {
            self.audit.emit(AuditKind::ChannelRequest {
                session_id: self.session_id.clone(),
                user,
                target,
                account,
                channel,
                request: request.to_string(),
                command,
                accepted,
            });
        }
    }

    /// The client broke the protocol: the connection is closed with `why`.
    pub(crate) fn violated(&self, why: String) {
        warn!(session = %self.session_id, peer = %self.peer, reason = %Escaped(&why), "client protocol violation; disconnecting");
        self.with(|s| s.end = Some(EndReason::ClientViolation(why)));
        self.violation.notify_one();
    }
}
