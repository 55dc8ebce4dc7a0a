//! Recording frames: per-core lock-free queues and the link that ships them to psm-recorder.
//!
//! Each worker owns one bounded [`ArrayQueue`]; its sessions push [`Frame`]s there without locks
//! and without blocking the core (a full queue makes only that session wait, asynchronously).
//! Each worker has its own link: a thread that drains the worker's queue, writes the frames to
//! its own connection to `recorder.sock` and reads psm-recorder's replies from it, sleeping in
//! `poll` on that connection and on an eventfd the worker writes when it wakes the link.
//!
//! Fail closed: a session starts only once psm-recorder has answered that its recording file
//! exists ([`Reply::Opened`](psm_recorder_format::Reply::Opened)), before the relay logs in to the target. Every recorded session
//! watches its stream's [`StreamStatus`]: when psm-recorder reports that one recording cannot be
//! written ([`Reply::Failed`](psm_recorder_format::Reply::Failed)) only that session ends; when the whole link drops, every session
//! recorded on it ends.
//!
//! Nothing is relayed unrecorded, within a stated bound: psm-recorder acknowledges what it has
//! made durable ([`Reply::Durable`](psm_recorder_format::Reply::Durable): the chunk is written and flushed to the file), and each
//! session keeps a [`Window`] of relayed-but-unacknowledged bytes (1 MiB or 1 s by default,
//! whichever is reached first). [`RecordingStream::data`] is called before a byte is relayed
//! and waits while the window is full, so a session stops reading from its user and its
//! target until psm-recorder catches up: a slow recorder slows the sessions it records, it
//! never lets them run ahead. When the link drops, the session ends and
//! [`RecordingStream::unconfirmed`] says how many relayed bytes were never confirmed durable.
//!
//! The parts: `durable` keeps each session's window of unconfirmed bytes; `link` is the
//! thread that carries one worker's frames to psm-recorder and its replies back. This module
//! holds what the sessions use: [`RecorderLink`], [`WorkerRecorder`] and [`RecordingStream`].

mod batch;
mod durable;
mod link;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::queue::ArrayQueue;
use nix::sys::eventfd::{EfdFlags, EventFd};
use psm_recorder_format::{CloseSummary, Direction, Frame, RecordingMeta};
use tokio::sync::watch;

use durable::{Durable, Resume};
pub use durable::{RecordStats, Window};
use link::{link_thread, LinkShared, StreamEntry};

/// Frames each worker's queue holds before its sessions wait.
pub const QUEUE_FRAMES: usize = 4096;
/// Session bytes a worker queues before a push wakes the link thread. Smaller DATA and RESIZE
/// frames (a keystroke, its echo) wait for the link's own round, at most [`LINK_IDLE`](link::LINK_IDLE) later:
/// waking another thread for each of them put a context switch on every keystroke's path (echo
/// +35 µs p50, +120 µs p99 with recording on, perf/BENCHMARKS.md). Far below the durable window
/// (1 MiB by default), so a bulk transfer never waits on the link's round; every other frame
/// (open, close, discard) wakes it at once, and so does a session that finds its durable window
/// full (whatever size an operator gave the window).
const WAKE_BYTES: usize = 64 * 1024;
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

/// State of the link, as sessions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Whether frames reach psm-recorder now.
    pub connected: bool,
    /// Bumped on every (re)connection; a session records under one generation only.
    pub generation: u64,
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
        let now = Instant::now();
        self.each(|s| s.lag(now))
            .into_iter()
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

    /// This worker's recording lag now ([`RecorderLink::lag`], over its own sessions).
    pub fn lag(&self) -> Duration {
        self.shared.lag(Instant::now())
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
        if let Err(back) = self.queue.push(frame) {
            // the worker's queue is full: this session pauses (its reader waits here) until
            // the link makes room, counted as a pause like a full durable window
            frame = back;
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
            self.stats.paused_now.fetch_add(1, Ordering::Relaxed);
            let _resume = Resume(&self.stats.paused_now);
            loop {
                self.wake();
                tokio::time::sleep(Duration::from_micros(250)).await;
                match self.queue.push(frame) {
                    Ok(()) => break,
                    Err(back) => frame = back,
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

/// A recording opened for a session that has not started yet. Dropped before
/// [`Unstarted::start`] takes it (a connection phase abandoned, timed out or shut down), it is
/// discarded, so that psm-recorder does not keep the stream and its open file for good.
pub struct Unstarted(Option<RecordingStream>);

impl Unstarted {
    /// Holds `rec` (none: the session is unrecorded).
    pub fn new(rec: Option<RecordingStream>) -> Unstarted {
        Unstarted(rec)
    }

    /// The session starts: the recording is its own from here.
    pub fn start(mut self) -> Option<RecordingStream> {
        self.0.take()
    }

    /// The session will not start: the recording is discarded now.
    pub async fn discard(mut self) {
        if let Some(rec) = self.0.take() {
            rec.discard().await;
        }
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(rec) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { rec.discard().await });
            }
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
        // a frame queued after its recording was lost (its link dropped while the frame
        // waited for room in the queue) is thrown away by the link: not relayed either
        !self.status.borrow().is_lost()
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

#[cfg(test)]
mod tests {
    use super::link::Replies;
    use super::*;
    use psm_recorder_format::Reply;
    use std::io::{Read as _, Write as _};
    use std::os::unix::net::{UnixListener, UnixStream};

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

    /// A link to a fake psm-recorder that answers each OPEN with `answer(stream)`: the
    /// folder, the listener and the link (kept alive by the caller), the worker's recorder,
    /// the fake.
    #[allow(clippy::type_complexity)]
    fn linked(
        answer: impl Fn(u64) -> Vec<Reply> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        UnixListener,
        RecorderLink,
        WorkerRecorder,
        std::thread::JoinHandle<(Vec<Frame>, UnixStream)>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let link = RecorderLink::start(path, Window::default());
        let w = link.worker().expect("start");
        let (conn, _) = listener.accept().expect("accept");
        let fake = fake_recorder(conn, answer);
        (dir, listener, link, w, fake)
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

    /// A recording held for a session that never starts (its connection phase dropped) is
    /// discarded when its holder goes, so psm-recorder does not keep the stream open for good.
    #[test]
    fn an_unstarted_recording_dropped_is_discarded() {
        let (_dir, _listener, _link, w, fake) = linked(|stream| vec![Reply::Opened { stream }]);
        let frames = runtime().block_on(async {
            until_connected(&w).await;
            let s = w
                .open(RecordingMeta {
                    recording_id: "x2".into(),
                    ..Default::default()
                })
                .await
                .expect("opened");
            drop(Unstarted::new(Some(s)));
            // the discard runs on this runtime while the fake recorder waits for it
            tokio::task::spawn_blocking(move || fake.join().expect("fake recorder").0)
                .await
                .expect("join")
        });
        assert!(
            matches!(frames.last(), Some(Frame::Discard { .. })),
            "{frames:?}"
        );
    }

    #[test]
    fn frames_reach_the_socket_and_loss_is_signalled() {
        let (_dir, listener, _link, w, fake) = linked(|stream| vec![Reply::Opened { stream }]);
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
        let (_dir, _listener, _link, w, fake) = linked(|stream| {
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
