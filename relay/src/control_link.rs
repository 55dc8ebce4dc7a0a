//! The relay's link to psm-control: receives policy snapshots, sends audit events.
//!
//! The link runs on its own thread, never on a worker core. Workers read the current snapshot
//! through [`PolicyStore`] (one `Arc` clone per decision) and hand audit events to an
//! [`AuditSink`] without waiting. While control is down the relay keeps serving on its last
//! snapshot, buffers audit events (bounded), and resyncs when control returns. Every
//! [`STATS_INTERVAL`] it reports its counters and how many bytes each running session has moved,
//! so that control can account for the sessions of a relay that dies.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Mutex;

use psm_control_api::{
    decode_line, encode_line, now_ms, AuditEvent, AuditKind, ControlToRelay, LiveSession,
    PolicySnapshot, RelayStats, RelayToControl, SessionProgress, MAX_LINE,
};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zeroize::Zeroize as _;

/// How many audit events the relay keeps while control is unreachable.
pub const AUDIT_BUFFER: usize = 65_536;
/// How often the relay reports its counters and session progress to control.
pub const STATS_INTERVAL: Duration = Duration::from_secs(2);
/// The most sessions one report carries the progress of (about 100 KB of JSON).
pub const PROGRESS_MAX: usize = 1024;
/// `SessionBytes::reported` of a session not yet reported on this connection (no session moves
/// 2^64 bytes).
const UNREPORTED: u64 = u64::MAX;

/// The relay's counters (see [`RelayStats`] for what each counts). Aligned to 128 bytes (two
/// cache lines: Intel's prefetcher pulls lines in pairs), so one worker's counters never share
/// a line with another's, however the allocator places them.
#[derive(Default)]
#[repr(align(128))]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections refused before their handshake.
    pub startups_refused: AtomicU64,
    /// Connections that failed before authenticating.
    pub preauth_failures: AtomicU64,
    /// Failed authentication attempts.
    pub auth_failures: AtomicU64,
    /// Sessions started.
    pub sessions_started: AtomicU64,
    /// Sessions ended (started minus ended: live now).
    pub sessions_ended: AtomicU64,
    /// Session bytes from users toward targets.
    pub bytes_up: AtomicU64,
    /// Session bytes from targets toward users.
    pub bytes_down: AtomicU64,
    /// Relayed channels started (a session's shell or command, a forward, the agent).
    pub channels_opened: AtomicU64,
    /// Relayed channels whose tasks have all ended (opened minus closed: live now).
    pub channels_closed: AtomicU64,
    /// Sessions ended, and logins, channels or connections refused, on the target's fault
    /// ([`Counters::fault`]).
    pub errors_target: AtomicU64,
    /// The same on psm-recorder's fault.
    pub errors_recorder: AtomicU64,
    /// The same on psm-control's fault.
    pub errors_control: AtomicU64,
    /// The same on psm's own fault.
    pub errors_internal: AtomicU64,
}

impl Counters {
    /// Adds one to `c`.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A session ended on `side`'s failure ([`EndReason::fault`](crate::end::EndReason::fault)),
    /// or something was refused on `side`'s account: counted as an error where that side is
    /// the target, psm-recorder, psm-control or psm itself (the user's, the policy's and an
    /// operator's refusals are what they asked for, not errors).
    pub fn fault(&self, side: crate::end::Side) {
        use crate::end::Side;
        match side {
            Side::Target => Counters::bump(&self.errors_target),
            Side::Recorder => Counters::bump(&self.errors_recorder),
            Side::Control => Counters::bump(&self.errors_control),
            Side::Internal => Counters::bump(&self.errors_internal),
            Side::Client | Side::Policy | Side::Operator => {}
        }
    }
}

/// Each worker's counters: a worker writes only its own, on cache lines of their own
/// ([`Counters`] is aligned to 128 bytes), so no line moves between cores on the data path;
/// readers sum them.
#[derive(Clone)]
pub struct WorkerCounters(pub Arc<Vec<Arc<Counters>>>);

impl WorkerCounters {
    /// `n` workers' counters, all zero.
    pub fn new(n: usize) -> WorkerCounters {
        WorkerCounters(Arc::new(
            (0..n).map(|_| Arc::new(Counters::default())).collect(),
        ))
    }

    /// One counter summed over the workers.
    pub fn sum(&self, f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.0.iter().map(|c| f(c).load(Ordering::Relaxed)).sum()
    }
}

/// What the control link reports besides audit events.
pub struct Reporter {
    /// The relay's counters.
    pub counters: WorkerCounters,
    /// Unauthenticated connections and the recorder link.
    pub levels: Arc<crate::metrics::Levels>,
}

impl Reporter {
    fn stats(&self) -> RelayStats {
        let c = &self.counters;
        RelayStats {
            connections: c.sum(|c| &c.connections),
            startups_refused: c.sum(|c| &c.startups_refused),
            preauth_failures: c.sum(|c| &c.preauth_failures),
            auth_failures: c.sum(|c| &c.auth_failures),
            sessions_started: c.sum(|c| &c.sessions_started),
            unauthenticated: (self.levels.unauthenticated)(),
            recorder_connected: (self.levels.recorder_connected)(),
            policy_version: 0,
        }
    }
}

/// Bytes a session has moved each way, and when the user last sent anything; the worker's
/// counters follow.
pub struct SessionBytes {
    /// User to target.
    pub up: AtomicU64,
    /// Target to user.
    pub down: AtomicU64,
    /// Last input from the user, ms since the epoch (for the idle timeout).
    pub last_input_ms: AtomicU64,
    /// `up + down` when control was last told of this session's progress ([`UNREPORTED`] when
    /// it is due whether or not it moved).
    reported: AtomicU64,
    worker: Arc<Counters>,
}

impl SessionBytes {
    /// The counters of the worker the session runs on.
    pub fn worker(&self) -> &Arc<Counters> {
        &self.worker
    }

    /// A session's counts, on the worker whose counters these are.
    pub fn new(worker: Arc<Counters>) -> SessionBytes {
        SessionBytes {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            last_input_ms: AtomicU64::new(0),
            reported: AtomicU64::new(UNREPORTED),
            worker,
        }
    }

    /// `n` bytes came from the user now.
    pub fn input(&self, n: usize) {
        self.up.fetch_add(n as u64, Ordering::Relaxed);
        self.worker.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        self.last_input_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `n` bytes came from the user that may not be user input (protocol traffic: the idle
    /// timer is left to the caller).
    pub fn received(&self, n: usize) {
        self.up.fetch_add(n as u64, Ordering::Relaxed);
        self.worker.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` bytes went to the user.
    pub fn output(&self, n: usize) {
        self.down.fetch_add(n as u64, Ordering::Relaxed);
        self.worker
            .bytes_down
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// An operator's kill of one session, as the session's own task receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kill {
    /// What the user and the audit log are told.
    pub reason: String,
    /// Who asked.
    pub actor: String,
}

/// Where a session is told it must end: set once, then its task is woken.
#[derive(Default)]
pub struct KillSwitch {
    kill: Mutex<Option<Kill>>,
    notify: tokio::sync::Notify,
}

impl KillSwitch {
    /// Ends the session (the first kill wins).
    pub fn fire(&self, k: Kill) {
        if let Ok(mut g) = self.kill.lock() {
            g.get_or_insert(k);
        }
        self.notify.notify_one();
    }
    /// Waits for a kill.
    pub async fn fired(&self) -> Kill {
        loop {
            if let Some(k) = self.kill.lock().ok().and_then(|g| g.clone()) {
                return k;
            }
            self.notify.notified().await;
        }
    }
}

/// Dual-control calls to psm-control: each [`ApprovalOp`](psm_control_api::ApprovalOp) gets
/// its reply by correlation number; sessions waiting on a request watch its updates.
#[derive(Default)]
pub struct ApprovalRpc {
    next: AtomicU64,
    replies: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<psm_control_api::ApprovalReply>>>,
    updates:
        Mutex<HashMap<u64, tokio::sync::watch::Sender<Option<psm_control_api::ApprovalRequest>>>>,
}

/// How long past a request's expiry a login still waits for its decision (psm-control expires
/// requests itself, and its word may be on the way), ms.
pub const APPROVAL_DECIDED_SLACK_MS: u64 = 5_000;

/// How long a relay waits for psm-control to answer an approval call.
pub const APPROVAL_CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl ApprovalRpc {
    /// Sends `op` and waits for the answer (fails closed when control does not answer).
    pub async fn call(
        &self,
        sink: &AuditSink,
        op: psm_control_api::ApprovalOp,
    ) -> Result<psm_control_api::ApprovalReply, String> {
        let corr = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut m) = self.replies.lock() {
            m.insert(corr, tx);
        }
        sink.report(RelayToControl::Approval { corr, op });
        let r = tokio::time::timeout(APPROVAL_CALL_TIMEOUT, rx).await;
        if let Ok(mut m) = self.replies.lock() {
            m.remove(&corr);
        }
        match r {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err("psm-control did not answer".into()),
        }
    }

    /// Watches request `id` (its updates from psm-control).
    pub fn watch(
        &self,
        id: u64,
    ) -> tokio::sync::watch::Receiver<Option<psm_control_api::ApprovalRequest>> {
        let mut m = match self.updates.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(id)
            .or_insert_with(|| tokio::sync::watch::channel(None).0)
            .subscribe()
    }

    /// Stops watching request `id`.
    pub fn unwatch(&self, id: u64) {
        if let Ok(mut m) = self.updates.lock() {
            m.remove(&id);
        }
    }

    /// Waits on `watch` until request `id` is decided, or until `expires_ms` and
    /// [`APPROVAL_DECIDED_SLACK_MS`] more
    /// have passed (psm-control expires requests itself, and may be gone); then stops watching
    /// it. `None`: no decision came.
    pub async fn decided(
        &self,
        id: u64,
        mut watch: tokio::sync::watch::Receiver<Option<psm_control_api::ApprovalRequest>>,
        expires_ms: u64,
    ) -> Option<psm_control_api::ApprovalRequest> {
        // stops watching however this ends, also when the waiting connection goes away and
        // this future is dropped
        struct Unwatch<'a>(&'a ApprovalRpc, u64);
        impl Drop for Unwatch<'_> {
            fn drop(&mut self) {
                self.0.unwatch(self.1);
            }
        }
        let _unwatch = Unwatch(self, id);
        let wait =
            Duration::from_millis(expires_ms.saturating_sub(now_ms()) + APPROVAL_DECIDED_SLACK_MS);
        let decided = tokio::time::timeout(
            wait,
            watch.wait_for(|r| r.as_ref().is_some_and(|r| r.state.is_final())),
        )
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|r| r.clone()));
        decided
    }

    fn reply(&self, corr: u64, reply: psm_control_api::ApprovalReply) {
        let tx = self.replies.lock().ok().and_then(|mut m| m.remove(&corr));
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }

    fn update(&self, r: psm_control_api::ApprovalRequest) {
        if let Ok(m) = self.updates.lock() {
            if let Some(tx) = m.get(&r.id) {
                tx.send_replace(Some(r));
            }
        }
    }
}

/// The policy snapshot the relay currently enforces.
#[derive(Default)]
pub struct PolicyStore {
    current: RwLock<Arc<PolicySnapshot>>,
    loaded: AtomicU64,
    /// The version in force, for the sessions that re-check their policy on every change.
    version: tokio::sync::watch::Sender<u64>,
}

impl PolicyStore {
    /// The snapshot in force now.
    pub fn get(&self) -> Arc<PolicySnapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the snapshot: always when `authoritative` (the first snapshot on a fresh
    /// connection: control is the source of truth even if its version went back), otherwise only
    /// with a version at least as new as the current one.
    pub fn set(&self, snap: PolicySnapshot, authoritative: bool) -> bool {
        let mut g = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let first = self.loaded.load(Ordering::Acquire) == 0;
        if !first && !authoritative && snap.version < g.version {
            return false;
        }
        let v = snap.version;
        *g = Arc::new(snap);
        self.loaded.fetch_add(1, Ordering::AcqRel);
        drop(g);
        // every replacement wakes the watchers, even to the same version number
        self.version.send_modify(|x| *x = v);
        true
    }

    /// Wakes on every snapshot applied.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Whether any snapshot has been received yet.
    pub fn has_snapshot(&self) -> bool {
        self.loaded.load(Ordering::Acquire) > 0
    }
}

/// Sessions running on this relay, announced to control in every `Hello` so a restarted control
/// knows them.
#[derive(Default)]
pub struct LiveSessions(Mutex<HashMap<String, LiveEntry>>);

/// One running session: what is announced, its counters, where its kill goes.
type LiveEntry = (LiveSession, Arc<SessionBytes>, Arc<KillSwitch>);

impl LiveSessions {
    /// A session started; `bytes` are its counters, `kill` where an operator's kill goes.
    pub fn insert(&self, s: LiveSession, bytes: Arc<SessionBytes>, kill: Arc<KillSwitch>) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(s.session_id.clone(), (s, bytes, kill));
        }
    }

    /// Delivers an operator's kill; false when the session does not run here.
    pub fn kill(&self, session_id: &str, k: Kill) -> bool {
        let switch = self
            .0
            .lock()
            .ok()
            .and_then(|m| m.get(session_id).map(|(_, _, k)| k.clone()));
        match switch {
            Some(s) => {
                s.fire(k);
                true
            }
            None => false,
        }
    }

    /// How far the running sessions have got, for one report: every session when `all` (a
    /// connection's first report: a restarted control learns every figure at once), else those
    /// that moved bytes since they were last reported, at most [`PROGRESS_MAX`], taken round the
    /// table from where the last report stopped (`from`) so that none waits behind sessions
    /// that keep moving. Control keeps the last figures of the rest, so ten thousand idle
    /// sessions cost nothing every [`STATS_INTERVAL`], and ten thousand busy ones a bounded
    /// report (each reported about every `⌈sessions / PROGRESS_MAX⌉` reports; a session
    /// removed ahead of the cursor can make one it passes wait a round more) instead of a line
    /// of a megabyte.
    pub fn progress(&self, all: bool, from: &mut usize) -> Vec<SessionProgress> {
        self.progress_at_most(all, from, if all { usize::MAX } else { PROGRESS_MAX })
    }

    fn progress_at_most(&self, all: bool, from: &mut usize, max: usize) -> Vec<SessionProgress> {
        let Ok(m) = self.0.lock() else {
            return Vec::new();
        };
        if all {
            // due whether or not they moved; what the cap leaves out goes in the next reports
            for (_, b, _) in m.values() {
                b.reported.store(UNREPORTED, Ordering::Relaxed);
            }
        }
        let n = m.len();
        if n == 0 {
            *from = 0;
            return Vec::new();
        }
        let start = *from % n;
        let mut out = Vec::new();
        let mut scanned = 0;
        for (s, b, _) in m.values().skip(start).chain(m.values().take(start)) {
            if out.len() == max {
                break;
            }
            scanned += 1;
            let (up, down) = (b.up.load(Ordering::Relaxed), b.down.load(Ordering::Relaxed));
            let total = up.wrapping_add(down);
            if b.reported.swap(total, Ordering::Relaxed) != total {
                out.push(SessionProgress {
                    session_id: s.session_id.clone(),
                    bytes_up: up,
                    bytes_down: down,
                });
            }
        }
        *from = (start + scanned) % n;
        out
    }

    /// A session ended.
    pub fn remove(&self, session_id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(session_id);
        }
    }

    /// All running sessions.
    pub fn list(&self) -> Vec<LiveSession> {
        self.0
            .lock()
            .map(|m| m.values().map(|(s, _, _)| s.clone()).collect())
            .unwrap_or_default()
    }

    /// Sessions running now.
    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no session runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Command events in the audit queue at most: a session that submits lines faster than
/// psm-control takes their events waits for room ([`AuditSink::command_room`]), so the rest of
/// the queue stays for every other event (session starts and ends, reports), never dropped for
/// one user's flood.
pub const COMMAND_EVENTS_QUEUED: usize = AUDIT_BUFFER * 3 / 4;

/// Where relay code sends audit events. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<RelayToControl>,
    origin: Arc<str>,
    dropped: Arc<AtomicU64>,
    commands: Arc<CommandRoom>,
}

/// The receiving end of an [`AuditSink`], which the control link drains.
pub struct AuditQueue {
    rx: mpsc::Receiver<RelayToControl>,
    commands: Arc<CommandRoom>,
}

impl AuditQueue {
    /// The next message to send to psm-control.
    pub async fn recv(&mut self) -> Option<RelayToControl> {
        let msg = self.rx.recv().await;
        self.taken(msg.as_ref());
        msg
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<RelayToControl> {
        let msg = self.rx.try_recv().ok();
        self.taken(msg.as_ref());
        msg
    }

    fn taken(&self, msg: Option<&RelayToControl>) {
        if let Some(RelayToControl::Audit(AuditEvent {
            kind: AuditKind::Command { .. },
            ..
        })) = msg
        {
            self.commands.queued.fetch_sub(1, Ordering::AcqRel);
            self.commands.freed.notify_waiters();
        }
    }
}

/// Command events queued and not yet sent, and the wake of those waiting for room.
#[derive(Default)]
struct CommandRoom {
    queued: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl AuditSink {
    /// A sink and the receiving end the control link drains.
    pub fn new(origin: &str) -> (AuditSink, AuditQueue) {
        let (tx, rx) = mpsc::channel(AUDIT_BUFFER);
        let commands = Arc::new(CommandRoom::default());
        (
            AuditSink {
                tx,
                origin: Arc::from(origin),
                dropped: Arc::new(AtomicU64::new(0)),
                commands: commands.clone(),
            },
            AuditQueue { rx, commands },
        )
    }

    /// Waits until a command event fits under [`COMMAND_EVENTS_QUEUED`] (at once, but under a
    /// flood of command lines or while psm-control is away).
    pub async fn command_room(&self) {
        loop {
            let freed = self.commands.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.commands.queued.load(Ordering::Acquire) < COMMAND_EVENTS_QUEUED {
                return;
            }
            freed.await;
        }
    }

    /// Events not yet handed to psm-control.
    pub fn pending(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Records an event. If the buffer is full (control down for very long) the event is counted
    /// as dropped and logged locally; the relay never stalls a session on audit.
    pub fn emit(&self, kind: AuditKind) {
        let ev = AuditEvent {
            seq: 0,
            ts_ms: now_ms(),
            origin: self.origin.to_string(),
            kind,
        };
        let command = matches!(ev.kind, AuditKind::Command { .. });
        if command {
            self.commands.queued.fetch_add(1, Ordering::AcqRel);
        }
        if let Err(e) = self.tx.try_send(RelayToControl::Audit(ev)) {
            if command {
                self.commands.queued.fetch_sub(1, Ordering::AcqRel);
            }
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(dropped = n, error = %e, "audit buffer full; event dropped");
        }
    }

    /// Sends a report that is not an audit event (a TOTP step used, a rehashed password) the
    /// same way: queued, never blocking.
    pub fn report(&self, msg: RelayToControl) {
        if self.tx.try_send(msg).is_err() {
            warn!("control buffer full; report dropped");
        }
    }
}

/// Runs the control link forever on the current thread's runtime.
pub async fn run(
    socket: PathBuf,
    relay_id: String,
    store: Arc<PolicyStore>,
    live: Arc<LiveSessions>,
    reporter: Reporter,
    mut audit_rx: AuditQueue,
    approvals: Arc<ApprovalRpc>,
) {
    let mut pending: Option<Vec<u8>> = None;
    let mut warned = false;
    loop {
        match UnixStream::connect(&socket).await {
            Ok(stream) => {
                warned = false;
                info!(socket = %socket.display(), "connected to psm-control");
                let err = serve(
                    stream,
                    &relay_id,
                    &store,
                    &live,
                    &reporter,
                    &mut audit_rx,
                    &mut pending,
                    &approvals,
                )
                .await;
                warn!(error = %err, "link to psm-control lost; serving on the last snapshot");
            }
            Err(e) => {
                if !warned {
                    warn!(socket = %socket.display(), error = %e, "psm-control unreachable; retrying");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    stream: UnixStream,
    relay_id: &str,
    store: &PolicyStore,
    live: &LiveSessions,
    reporter: &Reporter,
    audit_rx: &mut AuditQueue,
    pending: &mut Option<Vec<u8>>,
    approvals: &ApprovalRpc,
) -> String {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let hello = RelayToControl::Hello {
        relay_id: relay_id.to_string(),
        have_version: store.has_snapshot().then(|| store.get().version),
        live: live.list(),
    };
    if let Err(e) = w.write_all(&encode_line(&hello)).await {
        return format!("sending hello: {e}");
    }
    if let Some(line) = pending.take() {
        if let Err(e) = w.write_all(&line).await {
            *pending = Some(line);
            return format!("sending audit event: {e}");
        }
    }
    let mut line = Vec::with_capacity(1 << 20);
    let mut first = true;
    let mut stats_tick = tokio::time::interval(STATS_INTERVAL);
    let mut all_progress = true;
    let mut progress_from = 0;
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stats_tick.tick() => {
                let mut stats = reporter.stats();
                stats.policy_version = store.get().version;
                // every session in a connection's first report, then those that moved, at
                // most PROGRESS_MAX a report, round the table
                let msg = RelayToControl::Stats {
                    stats,
                    sessions: live.progress(std::mem::take(&mut all_progress), &mut progress_from),
                };
                if let Err(e) = w.write_all(&encode_line(&msg)).await {
                    return format!("sending stats: {e}");
                }
            }
            n = read_line(&mut r, &mut line) => {
                match n {
                    Ok(0) => return "psm-control closed the connection".into(),
                    Ok(_) => match decode_line::<ControlToRelay>(&line) {
                        Ok(ControlToRelay::Snapshot(s)) => {
                            let v = s.version;
                            if store.set(s, std::mem::take(&mut first)) {
                                info!(version = v, "policy snapshot applied");
                            } else {
                                debug!(version = v, "stale policy snapshot ignored");
                            }
                        }
                        Ok(ControlToRelay::ApprovalReply { relay_id: to, corr, reply }) => {
                            if to == relay_id {
                                approvals.reply(corr, reply);
                            }
                        }
                        Ok(ControlToRelay::ApprovalUpdate(r)) => approvals.update(r),
                        Ok(ControlToRelay::Kill { session_id, reason, actor }) => {
                            let here = live.kill(&session_id, Kill { reason, actor });
                            debug!(session = %session_id, here, "kill request");
                        }
                        Err(e) => return format!("bad message from psm-control: {e}"),
                    },
                    Err(e) => return format!("reading from psm-control: {e}"),
                }
                // The line held decrypted credentials: wipe it, not just truncate it.
                line.zeroize();
            }
            ev = audit_rx.recv() => {
                let Some(ev) = ev else { return "audit channel closed".into() };
                let bytes = encode_line(&ev);
                if let Err(e) = w.write_all(&bytes).await {
                    *pending = Some(bytes);
                    return format!("sending audit event: {e}");
                }
            }
        }
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    // `read_until` is cancel-safe only between calls; a partial line stays in `line`.
    let n = r.read_until(b'\n', line).await?;
    if line.len() > MAX_LINE {
        return Err(std::io::Error::other("line too long"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_sessions(ids: &[&str]) -> (LiveSessions, Vec<Arc<SessionBytes>>) {
        let live = LiveSessions::default();
        let worker = Arc::new(Counters::default());
        let mut bytes = Vec::new();
        for id in ids {
            let s: LiveSession = serde_json::from_value(serde_json::json!({
                "session_id": id, "user": "u", "source": "127.0.0.1:1", "target": "t",
                "target_address": "127.0.0.1:22", "account": "x", "recording_id": id,
                "start_ms": 1,
            }))
            .expect("session");
            let b = Arc::new(SessionBytes::new(worker.clone()));
            live.insert(s, b.clone(), Arc::new(KillSwitch::default()));
            bytes.push(b);
        }
        (live, bytes)
    }

    /// No two workers' counters share a 128-byte block, wherever the allocator puts them.
    #[test]
    fn workers_counters_share_no_cache_line() {
        let w = WorkerCounters::new(4);
        let mut blocks: Vec<usize> =
            w.0.iter()
                .flat_map(|c| {
                    let start = Arc::as_ptr(c) as usize;
                    let end = start + std::mem::size_of::<Counters>() - 1;
                    assert_eq!(start % 128, 0, "a worker's counters start a block");
                    start / 128..=end / 128
                })
                .collect();
        let n = blocks.len();
        blocks.sort_unstable();
        blocks.dedup();
        assert_eq!(blocks.len(), n, "two workers' counters share a block");
    }

    fn ids(p: Vec<SessionProgress>) -> Vec<String> {
        let mut v: Vec<String> = p.into_iter().map(|p| p.session_id).collect();
        v.sort();
        v
    }

    /// After a connection's first report, which holds every session, a report holds only the
    /// sessions that moved bytes since the last one.
    #[test]
    fn progress_reports_only_the_sessions_that_moved() {
        let (live, bytes) = live_sessions(&["a", "b", "c"]);
        let from = &mut 0;
        assert_eq!(ids(live.progress(true, from)), ["a", "b", "c"]);
        assert!(live.progress(false, from).is_empty(), "nothing moved");
        bytes[1].input(5);
        bytes[2].output(7);
        let p = live.progress(false, from);
        assert_eq!(ids(p.clone()), ["b", "c"]);
        assert!(p.iter().any(|p| p.session_id == "b" && p.bytes_up == 5));
        assert!(p.iter().any(|p| p.session_id == "c" && p.bytes_down == 7));
        assert!(live.progress(false, from).is_empty());
        assert_eq!(
            ids(live.progress(true, from)),
            ["a", "b", "c"],
            "a new connection gets all"
        );
    }

    /// A connection's first report carries every session however many (a restarted control
    /// learns every figure at once); later ones at most [`PROGRESS_MAX`].
    #[test]
    fn the_first_report_carries_every_session_and_later_ones_their_bound() {
        let names: Vec<String> = (0..PROGRESS_MAX + 6).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (live, bytes) = live_sessions(&refs);
        let from = &mut 0;
        assert_eq!(live.progress(true, from).len(), PROGRESS_MAX + 6);
        for b in &bytes {
            b.output(1);
        }
        assert_eq!(live.progress(false, from).len(), PROGRESS_MAX);
        assert_eq!(live.progress(false, from).len(), 6, "the rest in the next");
    }

    /// A report carries at most its bound of sessions; the rest come in the next reports, and
    /// sessions that move all the time do not keep the others out.
    #[test]
    fn progress_is_bounded_and_reaches_every_session() {
        let names = ["a", "b", "c", "d", "e", "f", "g"];
        let (live, bytes) = live_sessions(&names);
        let from = &mut 0;
        // a new connection: every session is due, three a report
        let mut seen = Vec::new();
        for i in 0..3 {
            let p = live.progress_at_most(i == 0, from, 3);
            assert!(p.len() <= 3, "{} in one report", p.len());
            seen.extend(ids(p));
        }
        seen.sort();
        assert_eq!(seen, names, "every session within three reports of three");
        assert!(live.progress_at_most(false, from, 3).is_empty());
        // every session moves before every report: each is still reported at least every
        // third report (seven sessions, three a report)
        let mut last = vec![0; names.len()];
        for report in 1..=12 {
            for b in &bytes {
                b.input(1);
            }
            let p = live.progress_at_most(false, from, 3);
            assert_eq!(p.len(), 3);
            for s in p {
                let i = names
                    .iter()
                    .position(|n| *n == s.session_id)
                    .expect("known");
                last[i] = report;
            }
            if report >= 3 {
                for (i, l) in last.iter().enumerate() {
                    assert!(
                        report - l <= 3,
                        "{} last reported in report {l}, now {report}",
                        names[i]
                    );
                }
            }
        }
    }

    /// A login that stops waiting on its access request (its connection went away, and the
    /// wait was dropped) stops watching it: the table of watched requests does not grow.
    #[tokio::test]
    async fn a_dropped_wait_on_a_request_stops_watching_it() {
        let rpc = ApprovalRpc::default();
        let watch = rpc.watch(7);
        let far = now_ms() + 600_000;
        let waited =
            tokio::time::timeout(Duration::from_millis(20), rpc.decided(7, watch, far)).await;
        assert!(waited.is_err(), "no decision came");
        assert!(rpc.updates.lock().expect("lock").is_empty());
    }

    /// A flood of command lines fills its share of the audit queue and then waits for room,
    /// while every other event still fits: none is dropped for it.
    #[tokio::test]
    async fn command_events_wait_for_room_and_leave_the_rest_of_the_queue() {
        use futures_util::FutureExt as _;
        let (sink, mut queue) = AuditSink::new("relay-test");
        let command = || AuditKind::Command {
            session_id: "s1".into(),
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            channel: 0,
            line: "true".into(),
            decision: "allow".into(),
            rule: None,
            source: "stdin".into(),
        };
        for _ in 0..COMMAND_EVENTS_QUEUED {
            assert!(sink.command_room().now_or_never().is_some());
            sink.emit(command());
        }
        let mut waiting = Box::pin(sink.command_room());
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "the share is full"
        );
        // the other events still go in
        for _ in 0..AUDIT_BUFFER - COMMAND_EVENTS_QUEUED {
            sink.emit(AuditKind::Notice {
                message: "another event".into(),
                session_id: None,
                kind: None,
                count: None,
            });
        }
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 0);
        // the link takes one: the wait ends
        assert!(queue.recv().await.is_some());
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room once the link took a command event");
    }

    #[test]
    fn store_keeps_newest() {
        let s = PolicyStore::default();
        assert!(!s.has_snapshot());
        let v = |version| PolicySnapshot {
            version,
            ..Default::default()
        };
        assert!(s.set(v(5), false));
        assert!(!s.set(v(4), false));
        assert_eq!(s.get().version, 5);
        assert!(s.set(v(6), false));
        assert_eq!(s.get().version, 6);
        assert!(
            s.set(v(2), true),
            "a fresh connection's first snapshot wins"
        );
        assert_eq!(s.get().version, 2);
    }
}
