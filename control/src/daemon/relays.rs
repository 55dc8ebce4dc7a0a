//! Relays on `policy.sock`: the connection, their audit events and reports, and the table of
//! live sessions (with the grace a relay whose link dropped gets to come back).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use psm_control_api::{
    decode_line, encode_line, AuditEvent, AuditKind, ControlToRelay, Protocol, RelayToControl,
    MAX_LINE,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{debug, error, info, warn};

use super::{lock, read_line, Line, Shared, HELLO_TIMEOUT, REASON_RELAY_LOST};
use crate::protocol::{RelayInfo, SessionInfo};

pub(super) struct LiveSession {
    conn: u64,
    pub(super) info: SessionInfo,
    /// Last byte counts its relay reported.
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    /// When its relay's link dropped (ms since the epoch, and for the grace period).
    pub(super) lost: Option<(u64, std::time::Instant)>,
    /// The kill an operator asked for, encoded, until the session ends: sent again to a relay
    /// that may have missed it (one that lagged behind the broadcast, or reconnected).
    pub(super) kill: Option<Arc<Vec<u8>>>,
}

impl LiveSession {
    fn new(conn: u64, info: SessionInfo) -> LiveSession {
        LiveSession {
            conn,
            info,
            bytes_up: 0,
            bytes_down: 0,
            lost: None,
            kill: None,
        }
    }
}

impl Shared {
    /// Records an audit event from a relay: live-session table, then the log.
    fn relay_event(&self, conn: u64, relay_id: &str, mut event: AuditEvent) {
        // a relay's events carry its own name: it cannot pass them off as psm-control's
        // (`control`) or another relay's
        let prefix = format!("relay-{relay_id}");
        if event.origin != prefix {
            event.origin = prefix;
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
                protocol,
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
                            protocol: *protocol,
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

    /// What relay connection `conn` may have missed of the broadcast, to send it again: the
    /// kills still pending for its sessions, then the state of every request it may be waiting
    /// on. Each is safe to receive twice (a kill ends a session once; an update replaces).
    pub(super) fn catch_up(&self, conn: u64) -> Vec<Arc<Vec<u8>>> {
        let mut lines: Vec<_> = lock(&self.sessions)
            .values()
            .filter(|s| s.conn == conn)
            .filter_map(|s| s.kill.clone())
            .collect();
        lines.extend(
            self.approvals_list()
                .into_iter()
                .map(|r| Arc::new(encode_line(&ControlToRelay::ApprovalUpdate(r)))),
        );
        lines
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
    pub(super) fn sweep(&self, grace: Duration) {
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
                protocol: s.info.protocol,
            });
            if let Err(e) = ended {
                error!(error = %e, "cannot write session_end for a lost relay's session");
            }
        }
    }
}

pub(super) async fn serve_policy(shared: Arc<Shared>, stream: UnixStream, conn: u64) {
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
        // The protocol of a session control did not know (its session_start went to a control
        // that restarted since): RDP for an RDP target, SSH otherwise, from the store (read
        // before the sessions' lock is taken, as the sessions list does).
        let protocols = if live.is_empty() {
            Default::default()
        } else {
            shared.target_protocols()
        };
        // The relay's running sessions: what a restarted control would otherwise not know.
        let mut sessions = lock(&shared.sessions);
        for session in live {
            // A session of a relay that came back: it is this connection's now, no longer lost,
            // and keeps the byte counts seen so far.
            let id = session.session_id.clone();
            // (a session to a `tcp` target is its SSH login that holds the lease)
            let protocol = match protocols.get(&session.target) {
                Some(Protocol::Rdp) => Protocol::Rdp,
                _ => Protocol::Ssh,
            };
            let info = SessionInfo {
                session,
                relay: relay_id.clone(),
                bytes_up: 0,
                bytes_down: 0,
                protocol,
            };
            match sessions.get_mut(&id) {
                Some(s) => {
                    // the protocol its session_start named stays
                    let protocol = s.info.protocol;
                    s.conn = conn;
                    s.info = SessionInfo { protocol, ..info };
                    s.lost = None;
                }
                None => {
                    sessions.insert(id, LiveSession::new(conn, info));
                }
            }
        }
    }
    let mut rx = shared.snapshot.subscribe();
    // subscribed before the catch-up below is read, so nothing falls between the two
    let mut kills = shared.kills.subscribe();
    let writer = async {
        let line = rx.borrow_and_update().clone();
        w.write_all(&line.line).await?;
        drop(line);
        // what a relay that comes back may have missed while away
        for line in shared.catch_up(conn) {
            w.write_all(&line).await?;
        }
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
                        // The missed messages are gone from the channel: the kills still
                        // pending and every request's state are sent again instead (a missed
                        // approval reply fails closed at the relay: its call times out).
                        warn!(%relay_id, missed = n, "relay fell behind the broadcast; sending its pending kills and the requests' state again");
                        for line in shared.catch_up(conn) {
                            w.write_all(&line).await?;
                        }
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
