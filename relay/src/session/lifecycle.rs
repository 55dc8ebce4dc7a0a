//! A connection's life: the handshake under the login grace time, the loop that watches the
//! session (policy, kill, violations, recorder, shutdown), the polite close and the
//! end-of-session records.

use super::*;

/// Serves one accepted TCP connection to its end, then writes the end-of-session records.
pub async fn handle_connection(
    ctx: Arc<WorkerCtx>,
    stream: crate::uring::Incoming,
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
    let _ = stream.set_nodelay();
    let stream = match crate::uring::Leg::accepted(stream) {
        Ok(s) => s,
        Err(e) => {
            ctx.preauth_failure(peer, &format_args!("cannot set the connection up: {e}"));
            return;
        }
    };
    let (mut stream, cutter) = Cuttable::socket(stream);
    let progress = stream.progress();
    stream.get_mut().report_progress(progress);
    // a client that takes no bytes at all blocks the connection's task in a write, where the
    // keepalives that would notice it never run: cut it after as long as they would take
    cutter.watch_writes(crate::USER_WRITE_STALL);
    let session_id = new_id();
    let shared = Arc::new(Shared {
        notices: Arc::new(Notices::new(ctx.audit.clone(), session_id.clone())),
        session_id,
        peer,
        start_ms: now_ms(),
        bytes: Arc::new(SessionBytes::new(ctx.counters.clone())),
        authenticated: AtomicBool::new(false),
        recording_lost: Notify::new(),
        violation: Notify::new(),
        finished: Mutex::new(Vec::new()),
        kill: Arc::new(KillSwitch::default()),
        stopped: Notify::new(),
        awaiting_until: AtomicU64::new(0),
        policy: ctx.policy.clone(),
        audit: ctx.audit.clone(),
        governed: Notify::new(),
        windows: Mutex::new(Windows {
            mirror: WindowMirror::new(WINDOW),
            flows: HashMap::new(),
        }),
        reverse_open: AtomicUsize::new(0),
        over: watch::channel(false).0,
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
        pending: None,
        reason: None,
        approval_watch: None,
        told: Default::default(),
        mfa_tries: 0,
        satisfied: psm_control_api::Satisfied::default(),
        remote_forwards: HashMap::new(),
        conditions: Default::default(),
        channels: HashMap::new(),
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
                if shared.awaiting_until.load(Ordering::Acquire) > psm_control_api::now_ms() {
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
    // a lease ends with its session at once: its pass-through connections are cut now, not
    // after the polite close below
    drop(shared.with(|s| {
        s.closing = true;
        s.lease.take()
    }));
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
pub(super) async fn govern(ctx: &WorkerCtx, shared: &Shared) -> EndReason {
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

/// How long the end of a session waits for psm-recorder to confirm the last bytes.
const SETTLE: Duration = Duration::from_secs(2);

pub(super) async fn finish(ctx: &WorkerCtx, shared: &Shared, reason: Option<EndReason>) {
    // The user's connection is over: the channels' tasks end now. One parked on a window of
    // the user's that will never open again would otherwise hold its channel's queue, so the
    // target leg's SSH task would wait on it for good, with its socket.
    shared.over.send_replace(true);
    let (info, recording, targets, exit_status, exit_signal, end) = shared.with(|s| {
        s.closing = true;
        drop(s.lease.take());
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
    Counters::bump(&ctx.counters.sessions_ended);
    let end_ms = now_ms().max(shared.start_ms);
    let reason = reason.or(end).unwrap_or(EndReason::ClientClosed);
    if let Some(side) = reason.fault() {
        ctx.counters.fault(side);
    }
    // psm-recorder finishes the recording (its last chunk flushed, the trailer written) and
    // confirms what it holds; a lost recorder never does, and that count is kept
    let mut unconfirmed = None;
    if let Some(rec) = recording {
        rec.close(CloseSummary {
            end_ms,
            exit_status,
            exit_signal: exit_signal.clone(),
            reason: reason.to_string(),
        })
        .await;
        unconfirmed = Some(rec.settle(SETTLE).await);
        rec.forget();
    }
    let bytes_up = shared.bytes.up.load(Ordering::Relaxed);
    let bytes_down = shared.bytes.down.load(Ordering::Relaxed);
    info!(session = %shared.session_id, user = %info.user, target = %info.target, bytes_up, bytes_down, %reason, side = %reason.side(), "session ended");
    ctx.audit.emit(AuditKind::SessionEnd {
        protocol: psm_control_api::Protocol::Ssh,
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
        unconfirmed_bytes: unconfirmed,
    });
}
