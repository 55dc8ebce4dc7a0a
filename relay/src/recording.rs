//! Recording frames: per-core lock-free queues and the link that ships them to psm-recorder.
//!
//! Each worker owns one bounded [`ArrayQueue`]; its sessions push [`Frame`]s there without locks
//! and without blocking the core (a full queue makes only that session wait, asynchronously).
//! One link thread drains every queue and writes the frames to `recorder.sock`.
//!
//! Fail closed: a session starts only while the link is connected, and every recorded session
//! watches the link's generation; when the link drops, the generation changes and the sessions
//! that were being recorded on it are ended.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::queue::ArrayQueue;
use psm_recorder_format::{CloseSummary, Direction, Frame, RecordingMeta};
use tokio::sync::watch;
use tracing::{info, warn};

/// Frames each worker's queue holds before its sessions wait.
pub const QUEUE_FRAMES: usize = 4096;
/// Bytes the link writes to the socket in one go, at most.
const BATCH_BYTES: usize = 1 << 20;

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
    thread: Mutex<Option<Thread>>,
    next_stream: AtomicU64,
}

/// The relay's side of the recorder link. Clone it into each worker with [`RecorderLink::worker`].
#[derive(Clone)]
pub struct RecorderLink {
    shared: Arc<LinkShared>,
}

/// One worker's handle: its own queue plus the shared link state.
#[derive(Clone)]
pub struct WorkerRecorder {
    queue: Arc<ArrayQueue<Frame>>,
    shared: Arc<LinkShared>,
}

impl RecorderLink {
    /// Starts the link thread toward `socket`.
    pub fn start(socket: PathBuf) -> std::io::Result<RecorderLink> {
        let (state_tx, _) = watch::channel(LinkState {
            connected: false,
            generation: 0,
        });
        let shared = Arc::new(LinkShared {
            queues: Mutex::new(Vec::new()),
            state_tx,
            sleeping: AtomicBool::new(false),
            thread: Mutex::new(None),
            next_stream: AtomicU64::new(1),
        });
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("psm-recorder-link".into())
            .spawn(move || link_thread(socket, s2))?;
        if let Ok(mut t) = shared.thread.lock() {
            *t = Some(handle.thread().clone());
        }
        Ok(RecorderLink { shared })
    }

    /// Registers a worker and returns its private queue handle.
    pub fn worker(&self) -> WorkerRecorder {
        let queue = Arc::new(ArrayQueue::new(QUEUE_FRAMES));
        if let Ok(mut q) = self.shared.queues.lock() {
            q.push(queue.clone());
        }
        WorkerRecorder {
            queue,
            shared: self.shared.clone(),
        }
    }
}

impl WorkerRecorder {
    /// The link state now.
    pub fn state(&self) -> LinkState {
        *self.shared.state_tx.borrow()
    }

    /// A receiver that sees every link state change.
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.shared.state_tx.subscribe()
    }

    /// Opens a recording stream if the link is up; `None` means recording is unavailable.
    pub async fn open(&self, meta: RecordingMeta) -> Option<RecordingStream> {
        let state = self.state();
        if !state.connected {
            return None;
        }
        let stream = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let rs = RecordingStream {
            rec: self.clone(),
            stream,
            t0: Instant::now(),
            generation: state.generation,
        };
        self.push(Frame::Open { stream, meta }).await;
        Some(rs)
    }

    async fn push(&self, mut frame: Frame) {
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
        self.wake();
    }

    fn wake(&self) {
        if self.shared.sleeping.swap(false, Ordering::AcqRel) {
            if let Ok(t) = self.shared.thread.lock() {
                if let Some(t) = t.as_ref() {
                    t.unpark();
                }
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
}

impl RecordingStream {
    /// The link generation this recording lives on.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn ts(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// Records bytes seen on a channel.
    pub async fn data(&self, channel: u32, direction: Direction, data: Bytes) {
        let f = Frame::Data {
            stream: self.stream,
            ts_us: self.ts(),
            channel,
            direction,
            data,
        };
        self.rec.push(f).await;
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

    /// Ends the recording.
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
                let dead = Arc::new(AtomicBool::new(false));
                if let Ok(mut r) = stream.try_clone() {
                    let dead2 = dead.clone();
                    let t = std::thread::current();
                    let _ = std::thread::Builder::new()
                        .name("psm-recorder-eof".into())
                        .spawn(move || {
                            let mut b = [0u8; 64];
                            while matches!(r.read(&mut b), Ok(n) if n > 0) {}
                            dead2.store(true, Ordering::Release);
                            t.unpark();
                        });
                }
                drain_queues(&shared, None);
                set_state(&shared, true);
                let err = pump(stream, &shared, &dead);
                set_state(&shared, false);
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
        std::thread::park_timeout(Duration::from_millis(200));
    }
}

/// Pops every queued frame; encodes those of known streams into `out` when given.
fn drain_queues(shared: &LinkShared, mut out: Option<(&mut Vec<u8>, &mut HashSet<u64>)>) -> bool {
    let queues: Vec<_> = match shared.queues.lock() {
        Ok(q) => q.clone(),
        Err(_) => return false,
    };
    let mut any = false;
    for q in &queues {
        while let Some(f) = q.pop() {
            any = true;
            if let Some((buf, open)) = out.as_mut() {
                match &f {
                    Frame::Open { stream, .. } => {
                        open.insert(*stream);
                    }
                    Frame::Close { stream, .. } => {
                        if !open.remove(stream) {
                            continue;
                        }
                        f.encode(buf);
                        continue;
                    }
                    other => {
                        if !open.contains(&other.stream()) {
                            continue;
                        }
                    }
                }
                f.encode(buf);
                if buf.len() >= BATCH_BYTES {
                    return true;
                }
            }
        }
    }
    any
}

fn pump(mut stream: UnixStream, shared: &LinkShared, dead: &AtomicBool) -> String {
    let mut buf = Vec::with_capacity(BATCH_BYTES + 64 * 1024);
    let mut open = HashSet::new();
    loop {
        if dead.load(Ordering::Acquire) {
            return "psm-recorder closed the connection".into();
        }
        buf.clear();
        let any = drain_queues(shared, Some((&mut buf, &mut open)));
        if !buf.is_empty() {
            if let Err(e) = stream.write_all(&buf) {
                return format!("writing to psm-recorder: {e}");
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
            if !pending {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            shared.sleeping.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn frames_reach_the_socket_and_loss_is_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let link = RecorderLink::start(path).expect("start");
        let w = link.worker();
        let (mut conn, _) = listener.accept().expect("accept");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let mut rx = w.subscribe();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !w.state().connected && Instant::now() < deadline {
                let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
            }
            let s = w
                .open(RecordingMeta {
                    recording_id: "x1".into(),
                    ..Default::default()
                })
                .await
                .expect("link is up");
            s.data(0, Direction::Output, Bytes::from_static(b"hello"))
                .await;
            s.close(CloseSummary::default()).await;
        });
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = Vec::new();
        let mut frames = Vec::new();
        let mut b = [0u8; 4096];
        while frames.len() < 3 {
            let n = conn.read(&mut b).expect("read");
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
            while let Some((f, used)) = Frame::decode(&got).expect("valid") {
                frames.push(f);
                got.drain(..used);
            }
        }
        assert!(matches!(frames[0], Frame::Open { .. }));
        assert!(matches!(&frames[1], Frame::Data { data, .. } if &data[..] == b"hello"));
        assert!(matches!(frames[2], Frame::Close { .. }));
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
}
