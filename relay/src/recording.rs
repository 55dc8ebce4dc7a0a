//! Recording frames: per-core lock-free queues and the link that ships them to psm-recorder.
//!
//! Each worker owns one bounded [`ArrayQueue`]; its sessions push [`Frame`]s there without locks
//! and without blocking the core (a full queue makes only that session wait, asynchronously).
//! Each worker has its own link: a thread that drains the worker's queue, writes the frames to
//! its own connection to `recorder.sock` and reads psm-recorder's replies from it, sleeping in
//! `poll` on that connection and on an eventfd the worker writes when it wakes the link.
//!
//! Fail closed: a session starts only once psm-recorder has answered that its recording file
//! exists ([`Reply::Opened`]), before the relay logs in to the target. Every recorded session
//! watches its stream's [`StreamStatus`]: when psm-recorder reports that one recording cannot be
//! written ([`Reply::Failed`]) only that session ends; when the whole link drops, every session
//! recorded on it ends.
//!
//! Nothing is relayed unrecorded, within a stated bound: psm-recorder acknowledges what it has
//! made durable ([`Reply::Durable`]: the chunk is written and flushed to the file), and each
//! session keeps a [`Window`] of relayed-but-unacknowledged bytes (1 MiB or 1 s by default,
//! whichever is reached first). [`RecordingStream::data`] is called before a byte is relayed
//! and waits while the window is full, so a session stops reading from its user and its
//! target until psm-recorder catches up: a slow recorder slows the sessions it records, it
//! never lets them run ahead. When the link drops, the session ends and
//! [`RecordingStream::unconfirmed`] says how many relayed bytes were never confirmed durable.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::queue::ArrayQueue;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use psm_recorder_format::{CloseSummary, Direction, Frame, RecordingMeta, Reply};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Frames each worker's queue holds before its sessions wait.
pub const QUEUE_FRAMES: usize = 4096;
/// Bytes the link writes to the socket in one go, at most.
const BATCH_BYTES: usize = 1 << 20;
/// Session bytes a worker queues before a push wakes the link thread. Smaller DATA and RESIZE
/// frames (a keystroke, its echo) wait for the link's own round, at most [`LINK_IDLE`] later:
/// waking another thread for each of them put a context switch on every keystroke's path (echo
/// +35 µs p50, +120 µs p99 with recording on, perf/BENCHMARKS.md). Far below the durable window
/// (1 MiB by default), so a bulk transfer never waits on the link's round; every other frame
/// (open, close, discard) wakes it at once, and so does a session that finds its durable window
/// full (whatever size an operator gave the window).
const WAKE_BYTES: usize = 64 * 1024;
/// How long the link thread sleeps when its queues are empty.
const LINK_IDLE: Duration = Duration::from_millis(50);
/// How long a session waits for psm-recorder to confirm that its recording is open.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where one recording stands, as psm-recorder reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamStatus {
    /// OPEN sent, no answer yet.
    Opening,
    /// The recording file exists and is being written.
    Open,
    /// psm-recorder could not create the recording.
    Refused(String),
    /// psm-recorder can no longer write the recording (or the link dropped): the session must
    /// end.
    Failed(String),
}

impl StreamStatus {
    /// Whether the recording can no longer be written.
    pub fn is_lost(&self) -> bool {
        matches!(self, StreamStatus::Refused(_) | StreamStatus::Failed(_))
    }
}

/// Why a recording could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The link to psm-recorder is down.
    #[error("psm-recorder is not connected")]
    NotConnected,
    /// psm-recorder refused the stream (its reason).
    #[error("psm-recorder refused the recording: {0}")]
    Refused(String),
    /// psm-recorder did not answer in time.
    #[error("psm-recorder did not confirm the recording within {OPEN_TIMEOUT:?}")]
    Timeout,
}

/// How far a session may run ahead of what psm-recorder confirmed durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Relayed bytes not yet confirmed durable at which the session stops reading.
    pub bytes: u64,
    /// Age of the oldest unconfirmed byte at which the session stops reading.
    pub time: Duration,
    /// How long a session may stay stopped (psm-recorder confirming nothing that would let it
    /// go on) before its recording counts as failed and the session ends.
    pub stall: Duration,
}

impl Default for Window {
    /// 1 MiB or 1 s, whichever is reached first; 30 s stopped at most.
    fn default() -> Self {
        Window {
            bytes: 1 << 20,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        }
    }
}

/// A worker's recording figures, for the metrics endpoint.
#[derive(Default)]
pub struct RecordStats {
    /// Times a session stopped reading because its durable window was full.
    pub pauses: AtomicU64,
    /// Sessions stopped now.
    pub paused_now: AtomicU64,
    /// Recordings failed because psm-recorder confirmed nothing for the stall limit.
    pub stalls: AtomicU64,
}

/// Marks closer together than this share one entry (a flood of tiny packets stays bounded, and
/// a session's marks are touched at most about once per grain).
const MARK_GRAIN: Duration = Duration::from_millis(10);
/// No time yet (`Durable::last_mark` before the first mark).
const NEVER: u64 = u64::MAX;

/// One stream's durable window: what was sent, what psm-recorder confirmed, and since when the
/// oldest unconfirmed byte waits.
///
/// A frame's admission reads and adds atomics only. `sent` has one writer, the session's worker
/// (every task of a session runs there); `acked` has one, the link's thread as it reads
/// psm-recorder's replies, which takes no lock of the session's. The age of the oldest
/// unconfirmed byte comes from marks (where a grain of sent bytes starts, and when), kept by the
/// worker alone: it adds one at most once per [`MARK_GRAIN`] and drops the confirmed ones when
/// `acked` passes the next mark's start, so their lock is taken about once per grain, never per
/// frame, and never by another thread.
struct Durable {
    /// DATA bytes handed to the link (and so relayed, or about to be).
    sent: AtomicU64,
    /// DATA bytes psm-recorder confirmed durable (never more than `sent`).
    acked: AtomicU64,
    /// (start offset, µs since `epoch`) of each grain of sent bytes not wholly confirmed, oldest
    /// first; the first one holds offset `acked`.
    marks: Mutex<VecDeque<(u64, u64)>>,
    /// When the first mark's grain started (µs since `epoch`): the oldest unconfirmed byte was
    /// sent then or after, within one grain.
    oldest: AtomicU64,
    /// The second mark's start ([`NEVER`] when there is one mark): `acked` past it means the
    /// first mark is confirmed.
    next_start: AtomicU64,
    /// When the newest mark was made ([`NEVER`] before the first).
    last_mark: AtomicU64,
    epoch: Instant,
    moved: Notify,
}

impl Default for Durable {
    fn default() -> Self {
        Durable {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            marks: Mutex::new(VecDeque::new()),
            oldest: AtomicU64::new(0),
            next_start: AtomicU64::new(NEVER),
            last_mark: AtomicU64::new(NEVER),
            epoch: Instant::now(),
            moved: Notify::new(),
        }
    }
}

impl Durable {
    fn marks<R>(&self, f: impl FnOnce(&mut VecDeque<(u64, u64)>) -> R) -> R {
        match self.marks.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// psm-recorder confirmed `bytes` (cumulative). Called by the link's thread.
    fn ack(&self, bytes: u64) {
        let sent = self.sent.load(Ordering::Acquire);
        self.acked.fetch_max(bytes.min(sent), Ordering::AcqRel);
        self.moved.notify_waiters();
    }

    /// Drops the marks `acked` has passed (the worker, when `acked` reached `next_start`).
    fn advance(&self, acked: u64) {
        self.marks(|m| {
            while m.get(1).is_some_and(|(start, _)| *start <= acked) {
                m.pop_front();
            }
            if let Some((_, t)) = m.front() {
                self.oldest.store(*t, Ordering::Relaxed);
            }
            let next = m.get(1).map_or(NEVER, |(start, _)| *start);
            self.next_start.store(next, Ordering::Relaxed);
        });
    }

    /// Takes `len` more bytes into the window if it has room now; otherwise how long to wait
    /// at most before looking again. Called by the session's worker only.
    fn try_admit(&self, len: u64, w: Window, now: Instant) -> Result<(), Duration> {
        let now_us = self.micros(now);
        let acked = self.acked.load(Ordering::Acquire);
        if acked >= self.next_start.load(Ordering::Relaxed) {
            self.advance(acked);
        }
        let sent = self.sent.load(Ordering::Relaxed);
        let unacked = sent.saturating_sub(acked);
        if unacked > 0 {
            let age =
                Duration::from_micros(now_us.saturating_sub(self.oldest.load(Ordering::Relaxed)));
            if unacked + len > w.bytes || age >= w.time {
                let left = w.time.saturating_sub(age);
                return Err(if left.is_zero() {
                    Duration::from_millis(50)
                } else {
                    left
                });
            }
        }
        let last = self.last_mark.load(Ordering::Relaxed);
        if last == NEVER || now_us.saturating_sub(last) >= MARK_GRAIN.as_micros() as u64 {
            self.marks(|m| {
                m.push_back((sent, now_us));
                match m.len() {
                    1 => self.oldest.store(now_us, Ordering::Relaxed),
                    2 => self.next_start.store(sent, Ordering::Relaxed),
                    _ => {}
                }
            });
            self.last_mark.store(now_us, Ordering::Relaxed);
        }
        self.sent.fetch_add(len, Ordering::Release);
        Ok(())
    }

    fn unconfirmed(&self) -> u64 {
        let acked = self.acked.load(Ordering::Acquire);
        self.sent.load(Ordering::Acquire).saturating_sub(acked)
    }

    /// How long the oldest unconfirmed byte has waited, when one does (for the metrics: the
    /// worker drops confirmed marks on its next frame, so until then this can be up to that
    /// long older than the truth).
    fn lag(&self, now: Instant) -> Option<Duration> {
        (self.unconfirmed() > 0).then(|| {
            Duration::from_micros(
                self.micros(now)
                    .saturating_sub(self.oldest.load(Ordering::Relaxed)),
            )
        })
    }

    #[cfg(test)]
    fn mark_count(&self) -> usize {
        self.marks(|m| m.len())
    }
}

/// Counts a paused session down again however its wait ends.
struct Resume<'a>(&'a AtomicU64);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the link keeps about one open stream.
struct StreamEntry {
    status: watch::Sender<StreamStatus>,
    durable: Arc<Durable>,
}

/// State of the link, as sessions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Whether frames reach psm-recorder now.
    pub connected: bool,
    /// Bumped on every (re)connection; a session records under one generation only.
    pub generation: u64,
}

struct LinkShared {
    queues: Mutex<Vec<Arc<ArrayQueue<Frame>>>>,
    state_tx: watch::Sender<LinkState>,
    sleeping: AtomicBool,
    /// Wakes the link thread out of its `poll` (written by a worker when the link sleeps).
    wake: EventFd,
    next_stream: AtomicU64,
    /// Open streams and what psm-recorder last said about each.
    streams: Mutex<HashMap<u64, StreamEntry>>,
    /// Each session's durable window.
    window: Window,
}

impl LinkShared {
    fn report(&self, stream: u64, status: StreamStatus) {
        let Ok(mut m) = self.streams.lock() else {
            return;
        };
        let done = status.is_lost();
        if let Some(e) = m.get(&stream) {
            e.status.send_replace(status);
            e.durable.moved.notify_waiters();
        }
        if done {
            m.remove(&stream);
        }
    }

    /// The link dropped: every stream on it is lost.
    fn lose_all(&self, why: &str) {
        if let Ok(mut m) = self.streams.lock() {
            for (_, e) in m.drain() {
                e.status.send_replace(StreamStatus::Failed(why.to_string()));
                e.durable.moved.notify_waiters();
            }
        }
    }

    /// psm-recorder confirmed `bytes` of `stream` durable.
    fn ack(&self, stream: u64, bytes: u64) {
        let durable = match self.streams.lock() {
            Ok(m) => m.get(&stream).map(|e| e.durable.clone()),
            Err(_) => None,
        };
        if let Some(d) = durable {
            d.ack(bytes);
        }
    }

    fn forget(&self, stream: u64) {
        if let Ok(mut m) = self.streams.lock() {
            m.remove(&stream);
        }
    }
}

/// The relay's side of the recorder links: one link (a thread and a connection to psm-recorder,
/// which serves each connection on a thread of its own) per worker, so that recording scales
/// with the workers instead of funnelling every worker's frames through one thread on each side.
/// Clone it into each worker with [`RecorderLink::worker`].
#[derive(Clone)]
pub struct RecorderLink {
    socket: PathBuf,
    window: Window,
    links: Arc<Mutex<Vec<Arc<LinkShared>>>>,
}

/// One worker's handle: its own queue plus the shared link state.
#[derive(Clone)]
pub struct WorkerRecorder {
    queue: Arc<ArrayQueue<Frame>>,
    /// DATA bytes pushed since the last wake ([`WAKE_BYTES`]).
    unwoken: Arc<AtomicU64>,
    shared: Arc<LinkShared>,
    stats: Arc<RecordStats>,
}

impl RecorderLink {
    /// The links toward `socket`; each session recorded keeps `window`. Each
    /// [`RecorderLink::worker`] starts its worker's link.
    pub fn start(socket: PathBuf, window: Window) -> RecorderLink {
        RecorderLink {
            socket,
            window,
            links: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn each<R>(&self, f: impl Fn(&LinkShared) -> R) -> Vec<R> {
        match self.links.lock() {
            Ok(l) => l.iter().map(|s| f(s)).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether every worker's link reaches psm-recorder now (false before the first worker).
    pub fn connected(&self) -> bool {
        let states = self.each(|s| s.state_tx.borrow().connected);
        !states.is_empty() && states.into_iter().all(|c| c)
    }

    /// The recording lag now: the age of the oldest relayed byte psm-recorder has not yet
    /// confirmed durable, over every open recording (zero when all is confirmed).
    pub fn lag(&self) -> Duration {
        let durables: Vec<Arc<Durable>> = self
            .each(|s| match s.streams.lock() {
                Ok(m) => m.values().map(|e| e.durable.clone()).collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            })
            .into_iter()
            .flatten()
            .collect();
        let now = Instant::now();
        durables
            .iter()
            .filter_map(|d| d.lag(now))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Starts a worker's link (its thread connects, and reconnects, to psm-recorder) and
    /// returns the worker's private queue handle.
    pub fn worker(&self) -> std::io::Result<WorkerRecorder> {
        let (state_tx, _) = watch::channel(LinkState {
            connected: false,
            generation: 0,
        });
        let queue = Arc::new(ArrayQueue::new(QUEUE_FRAMES));
        let shared = Arc::new(LinkShared {
            queues: Mutex::new(vec![queue.clone()]),
            state_tx,
            sleeping: AtomicBool::new(false),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(std::io::Error::from)?,
            next_stream: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            window: self.window,
        });
        let (socket, s2) = (self.socket.clone(), shared.clone());
        let index = self.each(|_| ()).len();
        std::thread::Builder::new()
            .name(format!("psm-recorder-link-{index}"))
            .spawn(move || link_thread(socket, s2))?;
        if let Ok(mut l) = self.links.lock() {
            l.push(shared.clone());
        }
        Ok(WorkerRecorder {
            queue,
            unwoken: Arc::new(AtomicU64::new(0)),
            shared,
            stats: Arc::new(RecordStats::default()),
        })
    }
}

impl WorkerRecorder {
    /// This worker's pauses and stalls.
    pub fn stats(&self) -> &Arc<RecordStats> {
        &self.stats
    }

    /// Frames waiting in this worker's queue for the link thread.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// The link state now.
    pub fn state(&self) -> LinkState {
        *self.shared.state_tx.borrow()
    }

    /// A receiver that sees every link state change.
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.shared.state_tx.subscribe()
    }

    /// Opens a recording stream and waits (at most [`OPEN_TIMEOUT`]) until psm-recorder confirms
    /// that the recording file exists.
    pub async fn open(&self, meta: RecordingMeta) -> Result<RecordingStream, OpenError> {
        let state = self.state();
        if !state.connected {
            return Err(OpenError::NotConnected);
        }
        let stream = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, mut status) = watch::channel(StreamStatus::Opening);
        let durable = Arc::new(Durable::default());
        if let Ok(mut m) = self.shared.streams.lock() {
            m.insert(
                stream,
                StreamEntry {
                    status: tx,
                    durable: durable.clone(),
                },
            );
        }
        let rs = RecordingStream {
            rec: self.clone(),
            stream,
            t0: Instant::now(),
            generation: state.generation,
            status: status.clone(),
            durable,
        };
        self.push(Frame::Open { stream, meta }).await;
        let answer = tokio::time::timeout(
            OPEN_TIMEOUT,
            status.wait_for(|s| *s != StreamStatus::Opening),
        )
        .await
        .map(|r| r.map(|s| s.clone()));
        let result = match answer {
            Err(_) => Err(OpenError::Timeout),
            // the sender is gone only when the link forgot the stream: it dropped
            Ok(Err(_)) => Err(OpenError::NotConnected),
            Ok(Ok(s)) => match s {
                StreamStatus::Open => Ok(()),
                StreamStatus::Refused(why) => Err(OpenError::Refused(why)),
                StreamStatus::Failed(_) => Err(OpenError::NotConnected),
                StreamStatus::Opening => Err(OpenError::Timeout),
            },
        };
        match result {
            Ok(()) => Ok(rs),
            Err(e) => {
                // whatever psm-recorder made of it, nothing of this session is kept
                rs.discard().await;
                Err(e)
            }
        }
    }

    async fn push(&self, mut frame: Frame) {
        let lazy = match &frame {
            Frame::Data { data, .. } => Some(data.len() as u64 + 16),
            Frame::Resize { .. } => Some(16),
            _ => None,
        };
        loop {
            match self.queue.push(frame) {
                Ok(()) => break,
                Err(back) => {
                    frame = back;
                    self.wake();
                    tokio::time::sleep(Duration::from_micros(250)).await;
                }
            }
        }
        if let Some(n) = lazy {
            if self.unwoken.fetch_add(n, Ordering::Relaxed) + n < WAKE_BYTES as u64 {
                return;
            }
        }
        self.wake_now();
    }

    /// Wakes the link thread (when it sleeps) to ship what this worker queued.
    fn wake_now(&self) {
        self.unwoken.store(0, Ordering::Relaxed);
        self.wake();
    }

    fn wake(&self) {
        if self.shared.sleeping.swap(false, Ordering::AcqRel) {
            // (the counter only grows: a failed write means it is already far from zero)
            let _ = self.shared.wake.write(1);
        }
    }
}

/// One session's recording.
#[derive(Clone)]
pub struct RecordingStream {
    rec: WorkerRecorder,
    stream: u64,
    t0: Instant,
    generation: u64,
    status: watch::Receiver<StreamStatus>,
    durable: Arc<Durable>,
}

impl RecordingStream {
    /// The link generation this recording lives on.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What psm-recorder says about this recording; changes when it is lost.
    pub fn status(&self) -> watch::Receiver<StreamStatus> {
        self.status.clone()
    }

    /// Drops the recording of a session that never started: psm-recorder removes the file.
    pub async fn discard(&self) {
        self.rec.shared.forget(self.stream);
        self.rec
            .push(Frame::Discard {
                stream: self.stream,
            })
            .await;
    }

    fn ts(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// Records bytes seen on a channel; called before they are relayed. Waits while the
    /// session's durable window is full (psm-recorder has not confirmed enough of what was
    /// relayed), so the caller stops relaying until it has. Returns whether the bytes may be
    /// relayed: `false` once the recording is lost (stalled, failed or its link gone), and
    /// then the caller drops them and stops relaying; the session is ending.
    #[must_use = "bytes whose recording failed must not be relayed"]
    pub async fn data(&self, channel: u32, direction: Direction, data: Bytes) -> bool {
        if !self.admit(data.len() as u64).await {
            return false;
        }
        let f = Frame::Data {
            stream: self.stream,
            ts_us: self.ts(),
            channel,
            direction,
            data,
        };
        self.rec.push(f).await;
        true
    }

    /// Takes `len` bytes into the durable window, waiting while it is full; `false` when the
    /// recording is lost (or stalls past the limit) instead.
    async fn admit(&self, len: u64) -> bool {
        let window = self.rec.shared.window;
        // the common case: room in the window, a few atomics and nothing else
        // (a lost recording is noticed once the window is full: at most one window more)
        if self.durable.try_admit(len, window, Instant::now()).is_ok() {
            return true;
        }
        // what this session queued must reach psm-recorder for the window to move: frames of
        // data do not wake the link one by one ([`WAKE_BYTES`]), so a full window does
        self.rec.wake_now();
        let stats = &self.rec.stats;
        stats.pauses.fetch_add(1, Ordering::Relaxed);
        stats.paused_now.fetch_add(1, Ordering::Relaxed);
        let _resume = Resume(&stats.paused_now);
        let give_up = tokio::time::Instant::now() + window.stall;
        loop {
            // registered before the second look, so an ack in between is not missed
            let moved = self.durable.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let wait = match self.durable.try_admit(len, window, Instant::now()) {
                Ok(()) => return true,
                Err(wait) => wait,
            };
            if self.status.borrow().is_lost() {
                // no confirmation will come: the session ends without relaying these
                return false;
            }
            if tokio::time::Instant::now() >= give_up {
                stats.stalls.fetch_add(1, Ordering::Relaxed);
                self.rec.shared.report(
                    self.stream,
                    StreamStatus::Failed(format!(
                        "psm-recorder confirmed nothing for {} s while the session waited \
                         (stalled recorder)",
                        window.stall.as_secs_f64()
                    )),
                );
                return false;
            }
            tokio::select! {
                _ = &mut moved => {}
                _ = tokio::time::sleep(wait) => {}
                _ = tokio::time::sleep_until(give_up) => {}
            }
        }
    }

    /// The link stops tracking this (closed) recording.
    pub fn forget(&self) {
        self.rec.shared.forget(self.stream);
    }

    /// Relayed bytes psm-recorder has not confirmed durable.
    pub fn unconfirmed(&self) -> u64 {
        self.durable.unconfirmed()
    }

    /// Waits (at most `timeout`, less when the recording is lost) until psm-recorder has
    /// confirmed everything relayed; returns what is still unconfirmed.
    pub async fn settle(&self, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let moved = self.durable.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let left = self.unconfirmed();
            if left == 0 || self.status.borrow().is_lost() {
                return left;
            }
            tokio::select! {
                _ = &mut moved => {}
                _ = tokio::time::sleep_until(deadline) => return self.unconfirmed(),
            }
        }
    }

    /// Records a terminal size.
    pub async fn resize(&self, channel: u32, cols: u32, rows: u32) {
        let f = Frame::Resize {
            stream: self.stream,
            ts_us: self.ts(),
            channel,
            cols,
            rows,
        };
        self.rec.push(f).await;
    }

    /// Ends the recording; psm-recorder confirms the last bytes once the file is finished
    /// ([`RecordingStream::settle`] waits for it), then [`RecordingStream::forget`].
    pub async fn close(&self, summary: CloseSummary) {
        let f = Frame::Close {
            stream: self.stream,
            ts_us: self.ts(),
            summary,
        };
        self.rec.push(f).await;
    }
}

fn set_state(shared: &LinkShared, connected: bool) {
    shared.state_tx.send_modify(|s| {
        if s.connected != connected {
            s.connected = connected;
            s.generation += 1;
        }
    });
}

fn link_thread(socket: PathBuf, shared: Arc<LinkShared>) {
    let mut warned = false;
    loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => {
                warned = false;
                info!(socket = %socket.display(), "connected to psm-recorder");
                drain_queues(&shared, None);
                set_state(&shared, true);
                let err = pump(stream, &shared);
                set_state(&shared, false);
                shared.lose_all("the link to psm-recorder dropped");
                warn!(error = %err, "link to psm-recorder lost; recorded sessions are being closed");
            }
            Err(e) => {
                if !warned {
                    warn!(socket = %socket.display(), error = %e, "psm-recorder unreachable; new sessions are refused until it is back");
                    warned = true;
                }
                drain_queues(&shared, None);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// psm-recorder's replies as they come in on the link's (non-blocking) connection.
#[derive(Default)]
struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    /// Reads what arrived and hands each whole reply to its stream; `Err` says why the link is
    /// over (psm-recorder closed it, or sent a reply that does not parse).
    fn take(&mut self, r: &mut UnixStream, shared: &LinkShared) -> Result<(), String> {
        let mut b = [0u8; 4096];
        // what ended the connection, once the replies that came before it are handled (the
        // last acknowledgements psm-recorder sent before it closed still count)
        let ended = loop {
            match r.read(&mut b) {
                Ok(0) => break Some("psm-recorder closed the connection".to_string()),
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) => break Some(format!("reading from psm-recorder: {e}")),
            }
        };
        let mut used = 0;
        let result = loop {
            match Reply::decode(&self.buf[used..]) {
                Ok(Some((reply, k))) => {
                    used += k;
                    handle_reply(shared, reply);
                }
                Ok(None) => break ended.map_or(Ok(()), Err),
                Err(e) => break Err(format!("bad reply from psm-recorder: {e}")),
            }
        };
        self.buf.drain(..used);
        result
    }
}

fn handle_reply(shared: &LinkShared, reply: Reply) {
    match reply {
        Reply::Opened { stream } => shared.report(stream, StreamStatus::Open),
        Reply::Refused { stream, reason } => {
            warn!(stream, reason = %reason, "psm-recorder refused a recording");
            shared.report(stream, StreamStatus::Refused(reason))
        }
        Reply::Failed { stream, reason } => {
            warn!(stream, reason = %reason, "psm-recorder lost a recording");
            shared.report(stream, StreamStatus::Failed(reason))
        }
        Reply::Durable { stream, bytes } => shared.ack(stream, bytes),
    }
}

/// Sleeps until psm-recorder sends something (or, with `writable`, has room for more), a worker
/// wakes the link, or `timeout` passes.
fn wait(
    stream: &UnixStream,
    wake: &EventFd,
    writable: bool,
    timeout: Duration,
) -> Result<(), String> {
    let mut events = PollFlags::POLLIN;
    if writable {
        events |= PollFlags::POLLOUT;
    }
    let mut fds = [
        PollFd::new(stream.as_fd(), events),
        PollFd::new(wake.as_fd(), PollFlags::POLLIN),
    ];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => return Err(format!("waiting on psm-recorder: {e}")),
    }
    if fds[1]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLIN))
    {
        // back to zero, so that the next wake is seen
        let _ = wake.read();
    }
    Ok(())
}

/// DATA payloads this size or larger go to psm-recorder as they are (a slice of the vectored
/// write); smaller ones (a keystroke, its echo) are copied in with their header.
const INLINE_MAX: usize = 1024;
/// Payloads one write carries at most (`writev` takes up to 1024 slices, two per payload).
const BATCH_PAYLOADS: usize = 256;

/// What one vectored write to psm-recorder carries: the frames encoded in `heads`, but for
/// large DATA payloads, which stay where the worker put them (no copy on the link thread).
#[derive(Default)]
struct Batch {
    heads: Vec<u8>,
    /// Each payload, after the heads' bytes up to the offset given with it.
    payloads: Vec<(usize, Bytes)>,
    payload_bytes: usize,
    /// Bytes of the batch already written (the socket took part of it and had no room left).
    written: usize,
}

impl Batch {
    fn push(&mut self, f: &Frame) {
        match f.encode_split(&mut self.heads) {
            Some(data) if data.len() >= INLINE_MAX => {
                self.payload_bytes += data.len();
                self.payloads.push((self.heads.len(), data.clone()));
            }
            Some(data) => self.heads.extend_from_slice(data),
            None => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.heads.is_empty() && self.payloads.is_empty()
    }

    fn full(&self) -> bool {
        self.heads.len() + self.payload_bytes >= BATCH_BYTES
            || self.payloads.len() >= BATCH_PAYLOADS
    }

    fn clear(&mut self) {
        self.heads.clear();
        self.payloads.clear();
        self.payload_bytes = 0;
        self.written = 0;
    }

    /// Writes what is left of the batch: `Ok(true)` once all of it is written, `Ok(false)` when
    /// `w` has no room now (the rest goes on a later call).
    fn write_some(&mut self, w: &mut impl std::io::Write) -> std::io::Result<bool> {
        let mut slices = Vec::with_capacity(2 * self.payloads.len() + 1);
        let mut at = 0;
        for (end, p) in &self.payloads {
            slices.push(std::io::IoSlice::new(&self.heads[at..*end]));
            slices.push(std::io::IoSlice::new(p));
            at = *end;
        }
        slices.push(std::io::IoSlice::new(&self.heads[at..]));
        let mut left = &mut slices[..];
        std::io::IoSlice::advance_slices(&mut left, self.written);
        while !left.is_empty() {
            match w.write_vectored(left) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    std::io::IoSlice::advance_slices(&mut left, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Pops every queued frame; adds those of known streams to `out` when given.
fn drain_queues(shared: &LinkShared, mut out: Option<(&mut Batch, &mut HashSet<u64>)>) -> bool {
    let queues: Vec<_> = match shared.queues.lock() {
        Ok(q) => q.clone(),
        Err(_) => return false,
    };
    let mut any = false;
    for q in &queues {
        while let Some(f) = q.pop() {
            any = true;
            if let Some((batch, open)) = out.as_mut() {
                match &f {
                    Frame::Open { stream, .. } => {
                        open.insert(*stream);
                    }
                    Frame::Close { stream, .. } | Frame::Discard { stream } => {
                        if !open.remove(stream) {
                            continue;
                        }
                        batch.push(&f);
                        continue;
                    }
                    other => {
                        if !open.contains(&other.stream()) {
                            continue;
                        }
                    }
                }
                batch.push(&f);
                if batch.full() {
                    return true;
                }
            }
        }
    }
    any
}

/// Ships the worker's frames to psm-recorder and takes its replies, on one thread: the
/// connection is non-blocking and the thread sleeps in `poll` on it and on the workers' wake, so
/// a reply (an acknowledgement a paused session waits for) is taken as it comes, even while the
/// socket has no room for frames. Returns why the link ended.
fn pump(mut stream: UnixStream, shared: &LinkShared) -> String {
    if let Err(e) = stream.set_nonblocking(true) {
        return format!("setting up the connection to psm-recorder: {e}");
    }
    let mut batch = Batch {
        heads: Vec::with_capacity(64 * 1024),
        ..Batch::default()
    };
    let mut open = HashSet::new();
    let mut replies = Replies::default();
    loop {
        if let Err(why) = replies.take(&mut stream, shared) {
            return why;
        }
        // a batch the socket took only part of goes on before anything new
        let any = if batch.is_empty() {
            drain_queues(shared, Some((&mut batch, &mut open)))
        } else {
            true
        };
        if !batch.is_empty() {
            match batch.write_some(&mut stream) {
                Ok(true) => batch.clear(),
                Ok(false) => {
                    // psm-recorder is behind: wait for room (or a reply, or a wake)
                    if let Err(why) = wait(&stream, &shared.wake, true, LINK_IDLE) {
                        return why;
                    }
                    continue;
                }
                Err(e) => return format!("writing to psm-recorder: {e}"),
            }
        }
        if !any {
            shared.sleeping.store(true, Ordering::Release);
            // Re-check after announcing sleep so a push between the drain and here is not missed.
            let pending = shared
                .queues
                .lock()
                .map(|q| q.iter().any(|q| !q.is_empty()))
                .unwrap_or(false);
            let slept = if pending {
                Ok(())
            } else {
                wait(&stream, &shared.wake, false, LINK_IDLE)
            };
            shared.sleeping.store(false, Ordering::Release);
            if let Err(why) = slept {
                return why;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Takes at most 7 bytes per call, from the first non-empty slice only.
    struct Trickle(Vec<u8>);

    impl std::io::Write for Trickle {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = b.len().min(7);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            match bufs.iter().find(|b| !b.is_empty()) {
                Some(b) => self.write(b),
                None => Ok(0),
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_sends_the_frames_bytes_in_order_with_large_payloads_uncopied() {
        let data = |n: usize, ts_us: u64| Frame::Data {
            stream: 1,
            ts_us,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
        };
        let frames = vec![
            data(5, 1),
            data(40_000, 2),
            Frame::Resize {
                stream: 1,
                ts_us: 3,
                channel: 0,
                cols: 80,
                rows: 24,
            },
            data(INLINE_MAX, 4),
            data(INLINE_MAX - 1, 5),
            data(70_000, 6),
        ];
        let mut batch = Batch::default();
        let mut whole = Vec::new();
        for f in &frames {
            batch.push(f);
            f.encode(&mut whole);
        }
        assert_eq!(
            batch.payloads.len(),
            3,
            "the three payloads of INLINE_MAX or more"
        );
        let mut out = Trickle(Vec::new());
        assert!(batch.write_some(&mut out).expect("written"), "all of it");
        assert_eq!(out.0, whole);

        // a socket that runs out of room part-way: the batch goes on where it stopped
        batch.written = 0;
        let mut choked = Choke {
            took: Vec::new(),
            room: 50_000,
        };
        assert!(!batch.write_some(&mut choked).expect("no error"), "stopped");
        assert_eq!(choked.took.len(), 50_000);
        choked.room = 1_000;
        assert!(
            !batch.write_some(&mut choked).expect("no error"),
            "stopped again"
        );
        choked.room = usize::MAX;
        assert!(batch.write_some(&mut choked).expect("written"), "the rest");
        assert_eq!(choked.took, whole);
    }

    /// Takes `room` bytes in all, then says it would block.
    struct Choke {
        took: Vec<u8>,
        room: usize,
    }

    impl std::io::Write for Choke {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.write_vectored(&[std::io::IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.room - n);
                self.took.extend_from_slice(&b[..k]);
                n += k;
                if n == self.room {
                    break;
                }
            }
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_durable_window_fills_by_bytes_or_by_age_and_moves_on_acks() {
        let w = Window {
            bytes: 1000,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        };
        let d = Durable::default();
        let t0 = Instant::now();
        assert!(d.try_admit(600, w, t0).is_ok());
        assert!(d.try_admit(400, w, t0).is_ok(), "exactly the window");
        assert!(d.try_admit(1, w, t0).is_err(), "full by bytes");
        assert_eq!(d.unconfirmed(), 1000);
        d.ack(600);
        assert_eq!(d.unconfirmed(), 400);
        assert!(d.try_admit(600, w, t0).is_ok());
        // full by age: the oldest unconfirmed byte is a second old
        d.ack(1600);
        assert!(d.try_admit(10, w, t0).is_ok());
        let later = t0 + Duration::from_millis(1000);
        let wait = d.try_admit(10, w, later).expect_err("full by age");
        assert!(wait <= Duration::from_millis(50), "{wait:?}");
        d.ack(1610);
        assert!(d.try_admit(10, w, later).is_ok(), "acked: room again");
        // an empty window takes a chunk larger than itself, so nothing ever waits forever
        d.ack(1620);
        assert!(d.try_admit(5000, w, later).is_ok());
        // acks never run past what was sent
        d.ack(u64::MAX);
        assert_eq!(d.unconfirmed(), 0);
    }

    #[test]
    fn the_age_is_the_oldest_unconfirmed_grains_and_acks_take_no_lock_of_the_session() {
        let w = Window {
            bytes: 1 << 20,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        };
        let d = Arc::new(Durable::default());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert!(d.try_admit(100, w, ms(0)).is_ok());
        assert!(d.try_admit(100, w, ms(5)).is_ok(), "the same grain");
        assert!(d.try_admit(100, w, ms(20)).is_ok(), "a second grain");
        // the link acknowledges while the worker holds the marks: no wait on them
        let other = d.clone();
        let acker = d.marks(|_| std::thread::spawn(move || other.ack(200)).join());
        acker.expect("the ack went through");
        assert_eq!(d.unconfirmed(), 100);
        // the first grain is confirmed: the age counts from the second one (20 ms)
        assert!(d.try_admit(1, w, ms(1010)).is_ok(), "980 ms old");
        assert!(d.try_admit(1, w, ms(1020)).is_err(), "1 s old");
        assert_eq!(d.lag(ms(1020)), Some(Duration::from_secs(1)));
        d.ack(302);
        assert_eq!(d.lag(ms(1020)), None, "all confirmed");
    }

    #[test]
    fn marks_of_a_flood_of_tiny_writes_stay_few() {
        let w = Window {
            bytes: 1 << 20,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        };
        let d = Durable::default();
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            assert!(d
                .try_admit(1, w, t0 + Duration::from_micros(i * 50))
                .is_ok());
        }
        // 10 000 writes over half a second: one mark per 10 ms
        assert!(d.mark_count() <= 51, "{}", d.mark_count());
    }
    use std::os::unix::net::UnixListener;

    /// A fake psm-recorder on `conn`: answers every OPEN with `answer(stream)` and returns the
    /// frames it got once a CLOSE or DISCARD arrived.
    fn fake_recorder(
        mut conn: UnixStream,
        answer: impl Fn(u64) -> Vec<Reply> + Send + 'static,
    ) -> std::thread::JoinHandle<(Vec<Frame>, UnixStream)> {
        std::thread::spawn(move || {
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut got = Vec::new();
            let mut frames = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                let n = conn.read(&mut b).expect("read");
                assert!(n > 0, "relay hung up");
                got.extend_from_slice(&b[..n]);
                while let Some((f, used)) = Frame::decode(&got).expect("valid") {
                    got.drain(..used);
                    if let Frame::Open { stream, .. } = &f {
                        let mut out = Vec::new();
                        for r in answer(*stream) {
                            r.encode(&mut out);
                        }
                        conn.write_all(&out).expect("reply");
                    }
                    let end = matches!(f, Frame::Close { .. } | Frame::Discard { .. });
                    frames.push(f);
                    if end {
                        return (frames, conn);
                    }
                }
            }
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
    }

    async fn until_connected(w: &WorkerRecorder) {
        let mut rx = w.subscribe();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !w.state().connected && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
    }

    #[test]
    fn frames_reach_the_socket_and_loss_is_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let link = RecorderLink::start(path, Window::default());
        let w = link.worker().expect("start");
        let (conn, _) = listener.accept().expect("accept");
        let fake = fake_recorder(conn, |stream| vec![Reply::Opened { stream }]);
        let status = runtime().block_on(async {
            until_connected(&w).await;
            let s = w
                .open(RecordingMeta {
                    recording_id: "x1".into(),
                    ..Default::default()
                })
                .await
                .expect("the recorder confirmed the stream");
            assert_eq!(*s.status().borrow(), StreamStatus::Open);
            assert!(
                s.data(0, Direction::Output, Bytes::from_static(b"hello"))
                    .await
            );
            s.close(CloseSummary::default()).await;
            s.status()
        });
        let (frames, conn) = fake.join().expect("fake recorder");
        assert!(matches!(frames[0], Frame::Open { .. }));
        assert!(matches!(&frames[1], Frame::Data { data, .. } if &data[..] == b"hello"));
        assert!(matches!(frames[2], Frame::Close { .. }));
        assert_eq!(*status.borrow(), StreamStatus::Open);
        let generation = w.state().generation;
        drop(conn);
        drop(listener);
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.state().connected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!w.state().connected);
        assert_ne!(w.state().generation, generation);
    }

    #[test]
    fn acknowledgements_sent_just_before_psm_recorder_closes_still_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        // no recorder listens: the link's own thread only retries; this test reads the replies
        let link = RecorderLink::start(dir.path().join("absent.sock"), Window::default());
        let w = link.worker().expect("start");
        let durable = Arc::new(Durable::default());
        let (status, _) = watch::channel(StreamStatus::Open);
        w.shared.streams.lock().expect("lock").insert(
            7,
            StreamEntry {
                status,
                durable: durable.clone(),
            },
        );
        assert!(durable
            .try_admit(100, Window::default(), Instant::now())
            .is_ok());
        let (mut ours, mut theirs) = UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let mut out = Vec::new();
        Reply::Durable {
            stream: 7,
            bytes: 100,
        }
        .encode(&mut out);
        theirs.write_all(&out).expect("reply");
        drop(theirs);
        let mut replies = Replies::default();
        let ended = replies.take(&mut ours, &w.shared);
        assert_eq!(ended, Err("psm-recorder closed the connection".to_string()));
        assert_eq!(durable.unconfirmed(), 0, "the last acknowledgement counted");
    }

    #[test]
    fn a_refused_stream_is_discarded_and_a_failed_one_is_reported_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let link = RecorderLink::start(path, Window::default());
        let w = link.worker().expect("start");
        let (conn, _) = listener.accept().expect("accept");
        let fake = fake_recorder(conn, |stream| {
            vec![Reply::Refused {
                stream,
                reason: "no space left on device".into(),
            }]
        });
        let refused = runtime().block_on(async {
            until_connected(&w).await;
            w.open(RecordingMeta::default()).await.err()
        });
        assert_eq!(
            refused,
            Some(OpenError::Refused("no space left on device".into()))
        );
        let (frames, conn) = fake.join().expect("fake recorder");
        assert!(
            matches!(frames.last(), Some(Frame::Discard { .. })),
            "{frames:?}"
        );

        // the same link: the next stream opens, then psm-recorder reports it failed
        let mut writer = conn.try_clone().expect("clone");
        let fake = fake_recorder(conn, |stream| vec![Reply::Opened { stream }]);
        runtime().block_on(async {
            let s = w.open(RecordingMeta::default()).await.expect("opened");
            let mut out = Vec::new();
            Reply::Failed {
                stream: s.stream,
                reason: "disk full".into(),
            }
            .encode(&mut out);
            writer.write_all(&out).expect("failure report");
            let mut st = s.status();
            let lost = tokio::time::timeout(Duration::from_secs(5), st.wait_for(|s| s.is_lost()))
                .await
                .expect("failure reported in time")
                .map(|s| s.clone())
                .ok();
            assert_eq!(lost, Some(StreamStatus::Failed("disk full".into())));
            assert!(
                w.state().connected,
                "one failed recording does not drop the link"
            );
            s.close(CloseSummary::default()).await;
        });
        let (frames, _conn) = fake.join().expect("fake recorder");
        assert!(matches!(frames.last(), Some(Frame::Close { .. })));
    }
}
