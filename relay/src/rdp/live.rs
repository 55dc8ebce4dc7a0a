//! A running RDP session: registration (live sessions, `session_start`), the relay loop that
//! feeds every frame of both legs to the [`Engine`] and carries out its steps (recording first,
//! then the bytes), the watch over it (policy, kill, recorder, shutdown) and the end
//! (`session_end`, the recording's close).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ironrdp_core::encode_vec;
use ironrdp_pdu::mcs::{DisconnectProviderUltimatum, DisconnectReason};
use ironrdp_pdu::nego::SecurityProtocol;
use ironrdp_pdu::x224::X224;
use psm_control_api::{
    escape, now_ms, AuditKind, Escaped, Governor, LiveSession, PolicyStop, Secret, Verdict,
};
use psm_recorder_format::wire::rdp::{RDP_EVENTS_CHANNEL, RDP_KEYS_CHANNEL, RDP_PDU_CHANNEL};
use psm_recorder_format::{CloseSummary, Direction};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tracing::{info, warn};

use super::engine::{EndNotice, Engine, EngineConfig, EngineError, Out, RdpEvent, TargetLogin};
use super::frame::next_frame;
use super::session::{Admitted, SessionInfo};
use super::wire::Framed;
use crate::control_link::{Counters, KillSwitch, SessionBytes};
use crate::end::EndReason;
use crate::recording::{RecordingStream, StreamStatus};
use crate::session::WorkerCtx;

/// How long a session being ended may take to say so to the client.
const CLOSE_GRACE: Duration = Duration::from_millis(300);
/// How long the end waits for psm-recorder to confirm the last bytes.
const SETTLE: Duration = Duration::from_secs(2);

/// The MCS Disconnect Provider Ultimatum psm sends the client when it ends a session.
pub fn disconnect_ultimatum() -> Vec<u8> {
    encode_vec(&X224(DisconnectProviderUltimatum::from_reason(
        DisconnectReason::ProviderInitiated,
    )))
    .unwrap_or_default()
}

/// One event line of the recording's events channel (client-chosen names escaped).
pub fn event_line(e: &RdpEvent) -> String {
    match e {
        RdpEvent::Channels { offered, refused } => {
            let list = |v: &[String]| v.iter().map(|c| escape(c)).collect::<Vec<_>>().join(",");
            format!(
                "channels offered {} refused {}\n",
                list(offered),
                list(refused)
            )
        }
        RdpEvent::Refused {
            channel,
            what,
            reason,
        } => format!(
            "channel refused {} {what}: {}\n",
            escape(channel),
            escape(reason)
        ),
        RdpEvent::Desktop { width, height } => format!("desktop {width}x{height}\n"),
        RdpEvent::Keyboard { layout } => format!("keyboard {layout:#06x}\n"),
        RdpEvent::Disconnect { by_client: true } => "disconnect by client\n".into(),
        RdpEvent::Disconnect { by_client: false } => "disconnect by target\n".into(),
    }
}

struct Running<'a> {
    ctx: &'a WorkerCtx,
    a: &'a SessionInfo,
    recording: Option<RecordingStream>,
    bytes: Arc<SessionBytes>,
    /// The target said it disconnects (so its EOF is a normal end).
    target_ended: bool,
    /// Refusals seen per channel and kind: the first [`REFUSALS_AUDITED`] of each are audited,
    /// the rest counted in one event at the end (a peer that repeats one refused thing cannot
    /// fill the relay's audit queue).
    refusals: std::collections::BTreeMap<(String, &'static str), u64>,
}

/// Refusal events audited per channel and kind of a session before the rest are only counted.
const REFUSALS_AUDITED: u64 = 8;
/// Channel and kind pairs counted apart in a session; later ones share one count.
const REFUSAL_KEYS: usize = 16;

impl Running<'_> {
    /// Records bytes; `Err` once the recording is lost (nothing more may be relayed).
    async fn record(
        &self,
        channel: u32,
        direction: Direction,
        data: Bytes,
    ) -> Result<(), EndReason> {
        match &self.recording {
            Some(rec) if !rec.data(channel, direction, data).await => {
                let why = match &*rec.status().borrow() {
                    StreamStatus::Failed(w) | StreamStatus::Refused(w) => w.clone(),
                    _ => String::new(),
                };
                Err(EndReason::RecordingFailed(why))
            }
            _ => Ok(()),
        }
    }

    fn refused(&self, channel: String, what: &str, reason: String) {
        self.ctx.audit.emit(AuditKind::RdpChannel {
            session_id: self.a.session_id.clone(),
            user: self.a.user.clone(),
            target: self.a.target.name.clone(),
            account: self.a.account.username.clone(),
            channel,
            what: what.to_string(),
            reason,
        });
    }

    /// One event per channel and kind whose refusals went past [`REFUSALS_AUDITED`], with
    /// how many were not audited one by one.
    fn refusals_summary(&mut self) {
        for ((channel, what), n) in std::mem::take(&mut self.refusals) {
            if n > REFUSALS_AUDITED {
                let more = n - REFUSALS_AUDITED;
                self.refused(
                    channel,
                    what,
                    format!(
                        "{more} more refusals of this kind in the session, not audited one by one"
                    ),
                );
            }
        }
    }

    async fn event(&mut self, e: RdpEvent) {
        if let RdpEvent::Refused {
            channel,
            what,
            reason,
        } = &e
        {
            let mut channel = crate::escape_short(channel);
            // a dynamic channel's name is the peer's to choose: past a handful of names, the
            // rest share one count
            if self.refusals.len() >= REFUSAL_KEYS
                && !self.refusals.contains_key(&(channel.clone(), *what))
            {
                channel = "(other channels)".into();
            }
            let seen = self.refusals.entry((channel.clone(), *what)).or_default();
            *seen += 1;
            if *seen <= REFUSALS_AUDITED {
                info!(session = %self.a.session_id, %channel, what, reason = %Escaped(reason), "rdp channel refused");
                self.refused(channel, what, reason.clone());
            }
        }
        if matches!(e, RdpEvent::Disconnect { by_client: false }) {
            self.target_ended = true;
        }
        let _ = self
            .record(
                RDP_EVENTS_CHANNEL,
                Direction::Output,
                Bytes::from(event_line(&e)),
            )
            .await;
    }

    /// Carries out the engine's steps: what is recorded first, then the bytes.
    async fn carry_out<C, T>(
        &mut self,
        outs: &mut Vec<Out>,
        client: &mut C,
        target: &mut T,
    ) -> Result<(), EndReason>
    where
        C: AsyncWrite + Unpin,
        T: AsyncWrite + Unpin,
    {
        let mut sends = Vec::new();
        for o in outs.drain(..) {
            match o {
                Out::Record { direction, pdu } => {
                    self.record(RDP_PDU_CHANNEL, direction, Bytes::from(pdu))
                        .await?
                }
                Out::Typed(text) => {
                    self.record(RDP_KEYS_CHANNEL, Direction::Input, Bytes::from(text))
                        .await?
                }
                Out::Event(e) => self.event(e).await,
                other => sends.push(other),
            }
        }
        for o in sends {
            match o {
                Out::ToTarget(b) => target
                    .write_all(&b)
                    .await
                    .map_err(|e| EndReason::TargetClosed(e.to_string()))?,
                Out::ToClient(b) => {
                    self.bytes.output(b.len());
                    client
                        .write_all(&b)
                        .await
                        .map_err(|e| EndReason::ClientError(e.to_string()))?
                }
                _ => {}
            }
        }
        client
            .flush()
            .await
            .map_err(|e| EndReason::ClientError(e.to_string()))?;
        target
            .flush()
            .await
            .map_err(|e| EndReason::TargetClosed(e.to_string()))
    }

    /// Relays until one side ends or breaks the protocol.
    async fn pump<C, T>(
        &mut self,
        engine: &mut Engine,
        client: &mut Framed<C>,
        target: &mut Framed<T>,
    ) -> EndReason
    where
        C: AsyncRead + AsyncWrite + Unpin,
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut outs = Vec::new();
        let mut cbuf = vec![0u8; 16 * 1024];
        let mut tbuf = vec![0u8; 16 * 1024];
        // bytes read past the connection phase are frames too
        let (mut from_client, mut from_target) = (true, true);
        loop {
            if from_client {
                loop {
                    let (kind, len) = match next_frame(&client.buf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return EndReason::ClientViolation(e.to_string()),
                    };
                    if client.buf.len() < len {
                        break;
                    }
                    let frame: Vec<u8> = client.buf.drain(..len).collect();
                    if let Err(e) = engine.client_frame(kind, &frame, &mut outs) {
                        return engine_end(e);
                    }
                    if engine.take_input_seen() {
                        self.bytes
                            .last_input_ms
                            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Err(r) = self
                        .carry_out(&mut outs, &mut client.io, &mut target.io)
                        .await
                    {
                        return r;
                    }
                }
            }
            if from_target {
                loop {
                    let (kind, len) = match next_frame(&target.buf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return EndReason::TargetViolation(e.to_string()),
                    };
                    if target.buf.len() < len {
                        break;
                    }
                    let frame: Vec<u8> = target.buf.drain(..len).collect();
                    if let Err(e) = engine.target_frame(kind, &frame, &mut outs) {
                        return engine_end(e);
                    }
                    if let Err(r) = self
                        .carry_out(&mut outs, &mut client.io, &mut target.io)
                        .await
                    {
                        return r;
                    }
                }
            }
            tokio::select! {
                r = client.io.read(&mut cbuf) => match r {
                    Ok(0) => return EndReason::ClientClosed,
                    Ok(n) => {
                        self.bytes.received(n);
                        client.buf.extend_from_slice(&cbuf[..n]);
                        (from_client, from_target) = (true, false);
                    }
                    // RDP clients often just close the socket (no TLS close_notify)
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return EndReason::ClientClosed
                    }
                    Err(e) => return EndReason::ClientError(e.to_string()),
                },
                r = target.io.read(&mut tbuf) => match r {
                    Ok(0) if self.target_ended => return EndReason::TargetEnded,
                    Ok(0) => return EndReason::TargetClosed(String::new()),
                    Ok(n) => {
                        target.buf.extend_from_slice(&tbuf[..n]);
                        (from_client, from_target) = (false, true);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && self.target_ended => {
                        return EndReason::TargetEnded
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return EndReason::TargetClosed(String::new())
                    }
                    Err(e) => return EndReason::TargetClosed(e.to_string()),
                },
            }
        }
    }
}

fn engine_end(e: EngineError) -> EndReason {
    match e {
        EngineError::Client(m) => EndReason::ClientViolation(m),
        EngineError::Target(m) => EndReason::TargetViolation(m),
    }
}

/// The policy side of the session: returns when it may not go on.
async fn govern(ctx: &WorkerCtx, gov: &Governor, bytes: &SessionBytes) -> PolicyStop {
    let mut watch = ctx.policy.watch();
    loop {
        let now = now_ms();
        let last = bytes
            .last_input_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        match gov.check(&ctx.policy.get(), now, last) {
            Verdict::End(stop) => return stop,
            Verdict::Continue { next_check_ms } => {
                let sleep = async {
                    match next_check_ms {
                        Some(t) => {
                            tokio::time::sleep(Duration::from_millis(t.saturating_sub(now))).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = sleep => {}
                    r = watch.changed() => if r.is_err() { std::future::pending::<()>().await },
                }
            }
        }
    }
}

/// Runs an admitted session to its end and writes the end-of-session records.
pub(super) async fn run(ctx: &WorkerCtx, a: Admitted) {
    let Admitted {
        info: a,
        mut client,
        leg,
        recording,
        user_permit,
    } = a;
    let recording = recording.start();
    let (mut target, target_protocol) = (leg.io, leg.protocol);
    let bytes = Arc::new(SessionBytes::new(ctx.counters.clone()));
    bytes
        .last_input_ms
        .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    let kill = Arc::new(KillSwitch::default());
    let live = LiveSession {
        session_id: a.session_id.clone(),
        user: a.user.clone(),
        source: a.peer.to_string(),
        target: a.target.name.clone(),
        target_address: a.target.address.clone(),
        account: a.account.username.clone(),
        recording_id: a.session_id.clone(),
        recorded: recording.is_some(),
        start_ms: a.start_ms,
        justification: a.justification.clone(),
        worker: Some(ctx.worker),
    };
    ctx.sessions
        .insert(live.clone(), bytes.clone(), kill.clone());
    Counters::bump(&ctx.counters.sessions_started);
    info!(session = %a.session_id, user = %a.user, target = %a.target.name, account = %a.account.username, protocol = "rdp", "session started");
    ctx.audit.emit(AuditKind::SessionStart {
        protocol: psm_control_api::Protocol::Rdp,
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
        recorded: recording.is_some(),
    });
    let gov = Governor {
        user: a.user.clone(),
        account: a.account.username.clone(),
        target: a.target.name.clone(),
        source: a.peer.ip(),
        start_ms: a.start_ms,
        recorded: recording.is_some(),
        satisfied: a.satisfied,
    };
    let nla_target = target_protocol == SecurityProtocol::HYBRID;
    let password = if nla_target {
        Secret::new(String::new())
    } else {
        super::target::password(&a.account).unwrap_or_else(|_| Secret::new(String::new()))
    };
    let mut engine = Engine::new(EngineConfig {
        rules: a.rules.clone(),
        target_protocol,
        login: TargetLogin {
            username: a.account.username.clone(),
            domain: a.account.domain.clone(),
            password,
            autologon: !nla_target,
        },
    });
    let status = recording.as_ref().map(|r| r.status());
    let generation = recording.as_ref().map(|r| r.generation());
    let mut s = Running {
        ctx,
        a: &a,
        recording,
        bytes: bytes.clone(),
        target_ended: false,
        refusals: Default::default(),
    };
    let _ = s
        .record(
            RDP_EVENTS_CHANNEL,
            Direction::Output,
            Bytes::from(format!(
                "connect {} {}@{} from {}\n",
                escape(&a.user),
                escape(&a.account.username),
                escape(&a.target.name),
                a.peer
            )),
        )
        .await;
    let mut link = ctx.recorder.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    let (reason, polite) = {
        let pump = s.pump(&mut engine, &mut client, &mut target);
        tokio::pin!(pump);
        let policy = govern(ctx, &gov, &bytes);
        tokio::pin!(policy);
        let lost = async {
            match status {
                Some(mut st) => match st.wait_for(|s| s.is_lost()).await {
                    Ok(s) => match &*s {
                        StreamStatus::Failed(w) | StreamStatus::Refused(w) => w.clone(),
                        _ => String::new(),
                    },
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lost);
        loop {
            tokio::select! {
                r = &mut pump => break (r, false),
                stop = &mut policy => {
                    info!(session = %a.session_id, reason = %stop, "session ended by policy");
                    break (EndReason::Policy(stop), true);
                }
                k = kill.fired() => {
                    info!(session = %a.session_id, actor = %Escaped(&k.actor), reason = %Escaped(&k.reason), "session killed by an operator");
                    break (EndReason::Operator { reason: k.reason, actor: k.actor }, true);
                }
                _ = shutdown.wait_for(|s| *s) => break (EndReason::Shutdown, true),
                why = &mut lost => {
                    warn!(session = %a.session_id, reason = %why, "recording failed; closing the session");
                    break (EndReason::RecordingFailed(why), true);
                }
                changed = link.changed() => {
                    if changed.is_ok() {
                        let now = link.borrow().generation;
                        if !matches!(generation, Some(g) if g != now) {
                            continue;
                        }
                    }
                    warn!(session = %a.session_id, "recording lost; closing the session");
                    break (EndReason::RecordingLost, true);
                }
            }
        }
    };
    if polite {
        // the client shows why (where it shows an error info) and "disconnected by the server";
        // the target sees the client go
        let notice = engine.end_notice(end_notice(&reason));
        if let Some(frame) = &notice {
            let _ = s
                .record(
                    RDP_PDU_CHANNEL,
                    Direction::Output,
                    Bytes::from(frame.clone()),
                )
                .await;
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if let Some(frame) = notice {
                let _ = client.io.write_all(&frame).await;
            }
            let _ = client.io.write_all(&disconnect_ultimatum()).await;
            let _ = client.io.flush().await;
        })
        .await;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = target.io.write_all(&disconnect_ultimatum_user()).await;
        let _ = target.io.shutdown().await;
    })
    .await;
    let _ = tokio::time::timeout(CLOSE_GRACE, client.io.shutdown()).await;
    drop((client, target));
    s.refusals_summary();
    let recording = s.recording.take();
    if let Some(rec) = &recording {
        let line = format!("end {}\n", reason.code());
        let _ = rec
            .data(RDP_EVENTS_CHANNEL, Direction::Output, Bytes::from(line))
            .await;
    }
    finish(ctx, &a, recording, &bytes, reason).await;
    drop(user_permit);
}

/// What the client is told when psm ends the session itself.
fn end_notice(reason: &EndReason) -> EndNotice {
    match reason {
        EndReason::Policy(PolicyStop::IdleTimeout(_)) => EndNotice::IdleTimeout,
        EndReason::Policy(PolicyStop::MaxDuration(_)) => EndNotice::MaxDuration,
        EndReason::Shutdown => EndNotice::Shutdown,
        _ => EndNotice::Administrative,
    }
}

/// The ultimatum toward the target when the user's side goes (a user-requested disconnect).
fn disconnect_ultimatum_user() -> Vec<u8> {
    encode_vec(&X224(DisconnectProviderUltimatum::from_reason(
        DisconnectReason::UserRequested,
    )))
    .unwrap_or_default()
}

/// The end-of-session records: the recording closed and settled, `session_end`.
async fn finish(
    ctx: &WorkerCtx,
    a: &SessionInfo,
    recording: Option<RecordingStream>,
    bytes: &SessionBytes,
    reason: EndReason,
) {
    ctx.sessions.remove(&a.session_id);
    Counters::bump(&ctx.counters.sessions_ended);
    if let Some(side) = reason.fault() {
        ctx.counters.fault(side);
    }
    let end_ms = now_ms().max(a.start_ms);
    let mut unconfirmed = None;
    if let Some(rec) = recording {
        rec.close(CloseSummary {
            end_ms,
            exit_status: None,
            exit_signal: None,
            reason: reason.to_string(),
        })
        .await;
        unconfirmed = Some(rec.settle(SETTLE).await);
        rec.forget();
    }
    let bytes_up = bytes.up.load(std::sync::atomic::Ordering::Relaxed);
    let bytes_down = bytes.down.load(std::sync::atomic::Ordering::Relaxed);
    info!(session = %a.session_id, user = %a.user, target = %a.target.name, bytes_up, bytes_down, %reason, side = %reason.side(), protocol = "rdp", "session ended");
    ctx.audit.emit(AuditKind::SessionEnd {
        protocol: psm_control_api::Protocol::Rdp,
        session_id: a.session_id.clone(),
        user: a.user.clone(),
        source: a.peer.to_string(),
        target: a.target.name.clone(),
        account: a.account.username.clone(),
        start_ms: a.start_ms,
        end_ms,
        duration_ms: end_ms - a.start_ms,
        bytes_up,
        bytes_down,
        exit_status: None,
        exit_signal: None,
        recording_id: a.session_id.clone(),
        reason: reason.to_string(),
        reason_code: reason.code().into(),
        side: reason.side().to_string(),
        justification: a.justification.clone(),
        unconfirmed_bytes: unconfirmed,
    });
}

#[cfg(test)]
mod tests {
    use super::super::frame::FrameKind;
    use super::*;
    use ironrdp_core::decode;

    #[test]
    fn ultimatum_decodes_and_event_lines_are_escaped() {
        let u = disconnect_ultimatum();
        let d = decode::<X224<DisconnectProviderUltimatum>>(&u).expect("decodes");
        assert_eq!(d.0.reason, DisconnectReason::ProviderInitiated);
        assert!(matches!(next_frame(&u), Ok(Some((FrameKind::X224, n))) if n == u.len()));
        let line = event_line(&RdpEvent::Refused {
            channel: "clip\nrdr".into(),
            what: "channel",
            reason: "grant allows clipboard none".into(),
        });
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert_eq!(
            event_line(&RdpEvent::Desktop {
                width: 1024,
                height: 768
            }),
            "desktop 1024x768\n"
        );
    }
}
