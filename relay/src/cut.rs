//! A TCP stream the relay can cut from outside the SSH session that owns it.
//!
//! russh runs each connection in a task of its own and offers no way to abort it: a peer that
//! never completes its handshake, or never reads, would keep the task, its buffers and its socket
//! alive. [`Cuttable`] wraps the stream; once its [`Cutter`] fires, every read and write fails
//! with `ConnectionAborted`, so russh's session loop ends at once and frees everything.
//!
//! A socket is also shut down at the cut, both ways: the peer learns at once that the
//! connection is over (a target's sshd then hangs up the session's terminal), whether or not the
//! task that owns the stream is polling it just then.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::uring::Shutter;

#[derive(Default)]
struct CutState {
    cut: AtomicBool,
    /// Cut because the peer took nothing for too long ([`Cutter::cut_stalled`]).
    stalled: AtomicBool,
    /// Since when (ms on [`clock_ms`], 0: not) a write or flush has waited on the peer.
    write_waiting_since: AtomicU64,
    /// The stream was dropped.
    gone: AtomicBool,
    reader: AtomicWaker,
    writer: AtomicWaker,
    /// Shuts the socket down while its stream lives (the stream clears it, under the lock,
    /// before its descriptor is closed: a cut never reaches a number reused since).
    socket: Mutex<Option<Shutter>>,
}

/// A socket stream whose socket can be shut down from outside the task that owns it.
pub trait Socket {
    /// What shuts the socket down; valid while the stream lives.
    fn shutter(&self) -> Shutter;
}

impl Socket for tokio::net::TcpStream {
    fn shutter(&self) -> Shutter {
        Shutter::fd(self.as_raw_fd())
    }
}

/// Cuts the stream it was made with. Cheap to clone.
#[derive(Clone)]
pub struct Cutter(Arc<CutState>);

impl Cutter {
    /// From now on every read and write of the stream fails.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::Release);
        if let Ok(socket) = self.0.socket.lock() {
            if let Some(shutter) = &*socket {
                shutter.shut();
            }
        }
        self.0.reader.wake();
        self.0.writer.wake();
    }

    /// Whether [`Cutter::cut`] was called.
    pub fn is_cut(&self) -> bool {
        self.0.cut.load(Ordering::Acquire)
    }

    /// How long the stream's writer has waited for the peer to take bytes (zero when it is
    /// not waiting).
    pub fn write_waiting(&self) -> Duration {
        match self.0.write_waiting_since.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            since => Duration::from_millis(clock_ms().saturating_sub(since)),
        }
    }

    /// Cuts the stream because its peer took nothing for too long: reads and writes then fail
    /// with `TimedOut`, which tells the owner the peer was unresponsive.
    pub fn cut_stalled(&self) {
        self.0.stalled.store(true, Ordering::Release);
        self.cut();
    }

    /// Whether the stream was dropped (nothing is left to cut).
    pub fn is_gone(&self) -> bool {
        self.0.gone.load(Ordering::Acquire)
    }

    /// Cuts the stream once its writer has waited `limit` on a peer that takes nothing: a
    /// task whose peer stopped reading its socket blocks in that write, where its own timers
    /// (keepalives) never run. One task per thread checks every stream watched on it, at a
    /// quarter of the shortest limit among them, so a cut comes between `limit` and `limit` and
    /// a quarter later (as with a timer per stream, at far less memory); a stream that is gone, or cut, is
    /// dropped from the watch. Needs a tokio runtime (outside one, nothing is watched).
    pub fn watch_writes(&self, limit: Duration) {
        WATCHES.with(|w| {
            let mut w = w.borrow_mut();
            if !matches!(&*w, Some((_, task)) if !task.is_finished()) {
                // a watcher that ended (its runtime gone, in tests) is started again on this
                // thread's runtime, with the streams it watched
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let watches = w.take().map(|(w, _)| w).unwrap_or_default();
                let task = rt.spawn(watch(watches.clone()));
                *w = Some((watches, task));
            }
            let Some((watches, _)) = &*w else { return };
            lock(&watches.legs).push((Arc::downgrade(&self.0), limit));
            let tick = tick_for(limit).as_millis() as u64;
            if watches.tick_ms.fetch_min(tick, Ordering::AcqRel) > tick {
                // the watcher sleeps for a longer tick: it starts the shorter one now
                watches.shorter.notify_one();
            }
        });
    }
}

/// The streams whose writes one thread's watcher checks, each with its limit.
struct Watches {
    legs: Mutex<Vec<(std::sync::Weak<CutState>, Duration)>>,
    /// How often the watcher checks: a quarter of the shortest limit, in ms.
    tick_ms: AtomicU64,
    /// A stream with a shorter tick than the watcher sleeps for came.
    shorter: tokio::sync::Notify,
}

impl Default for Watches {
    fn default() -> Self {
        Watches {
            legs: Mutex::new(Vec::new()),
            tick_ms: AtomicU64::new(MAX_TICK.as_millis() as u64),
            shorter: tokio::sync::Notify::new(),
        }
    }
}

/// Streams the watcher checks before it lets the worker's other tasks run.
const SCAN_CHUNK: usize = 512;

/// The watcher checks at least this often (with nothing to watch, or only long limits).
const MAX_TICK: Duration = Duration::from_secs(30);

/// How often a stream with `limit` is to be checked.
fn tick_for(limit: Duration) -> Duration {
    (limit / 4).clamp(Duration::from_millis(5), MAX_TICK)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// This thread's watcher, and the task that runs it on the thread's runtime. A worker's
    /// legs stay on its thread, so one task watches them all (a task per leg cost a timer and
    /// about half a KiB each).
    static WATCHES: std::cell::RefCell<Option<(Arc<Watches>, tokio::task::JoinHandle<()>)>> =
        const { std::cell::RefCell::new(None) };
}

/// How many streams this thread's watcher checks now (for tests).
#[cfg(test)]
fn watched_here() -> usize {
    WATCHES.with(|w| w.borrow().as_ref().map_or(0, |(w, _)| lock(&w.legs).len()))
}

/// Checks `w`'s streams each tick: cuts those whose writer has waited past its limit, and
/// forgets those cut or gone.
async fn watch(w: Arc<Watches>) {
    let mut last = tokio::time::Instant::now();
    loop {
        // counted from the last round, also when a shorter tick came meanwhile
        let tick = Duration::from_millis(w.tick_ms.load(Ordering::Acquire));
        tokio::select! {
            () = tokio::time::sleep_until(last + tick) => {}
            () = w.shorter.notified() => continue,
        }
        last = tokio::time::Instant::now();
        let mut stalled = Vec::new();
        let mut shortest = MAX_TICK;
        // a chunk at a time, giving the worker back between chunks: ten thousand sessions'
        // legs in one go would hold their echoes for milliseconds (streams watched meanwhile
        // join at the end, and are checked in this round)
        let mut i = 0;
        loop {
            let done = {
                let mut legs = lock(&w.legs);
                let mut left = SCAN_CHUNK;
                while i < legs.len() && left > 0 {
                    left -= 1;
                    let (state, limit) = &legs[i];
                    let limit = *limit;
                    let keep = match state.upgrade().map(Cutter) {
                        Some(c) if c.is_cut() || c.is_gone() => false,
                        Some(c) if c.write_waiting() >= limit => {
                            stalled.push(c);
                            false
                        }
                        Some(_) => true,
                        None => false,
                    };
                    if keep {
                        shortest = shortest.min(tick_for(limit));
                        i += 1;
                    } else {
                        legs.swap_remove(i);
                    }
                }
                i >= legs.len()
            };
            if done {
                break;
            }
            tokio::task::yield_now().await;
        }
        // (a later, shorter limit lowers it again between two rounds)
        w.tick_ms
            .store(shortest.as_millis() as u64, Ordering::Release);
        for cutter in stalled {
            cutter.cut_stalled();
        }
    }
}

/// Tells a [`Cuttable`] that the write it waits on moved bytes: for a stream that finishes one
/// write in several sends (the io_uring leg), which the stall clock would otherwise count as
/// no progress until the whole write is out.
#[derive(Clone)]
pub struct Progress(Arc<CutState>);

impl Progress {
    /// Bytes moved just now: a waiting write's stall clock starts again.
    pub fn moved(&self) {
        let since = &self.0.write_waiting_since;
        if since.load(Ordering::Relaxed) != 0 {
            since.store(clock_ms(), Ordering::Release);
        }
    }
}

/// Milliseconds on a monotonic clock (never 0), for how long a write has waited.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// A stream that fails once its [`Cutter`] fires.
pub struct Cuttable<S> {
    inner: S,
    state: Arc<CutState>,
}

impl<S> Cuttable<S> {
    /// Wraps `inner`; the returned [`Cutter`] cuts it.
    pub fn new(inner: S) -> (Cuttable<S>, Cutter) {
        let state = Arc::new(CutState::default());
        (
            Cuttable {
                inner,
                state: state.clone(),
            },
            Cutter(state),
        )
    }

    /// The handle through which the wrapped stream reports bytes moved within one write.
    pub fn progress(&self) -> Progress {
        Progress(self.state.clone())
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Wraps the socket stream `inner`, which the [`Cutter`] also shuts down.
    pub fn socket(inner: S) -> (Cuttable<S>, Cutter)
    where
        S: Socket,
    {
        let shutter = inner.shutter();
        let (me, cutter) = Cuttable::new(inner);
        if let Ok(mut socket) = me.state.socket.lock() {
            *socket = Some(shutter);
        }
        (me, cutter)
    }

    fn aborted(&self) -> io::Error {
        if self.state.stalled.load(Ordering::Acquire) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took no data for too long; connection cut by psm",
            )
        } else {
            io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut by psm")
        }
    }

    /// Notes whether a write or flush now waits on the peer.
    fn waiting<T>(&self, poll: Poll<T>) -> Poll<T> {
        let since = &self.state.write_waiting_since;
        if poll.is_pending() {
            if since.load(Ordering::Relaxed) == 0 {
                since.store(clock_ms(), Ordering::Release);
            }
        } else if since.load(Ordering::Relaxed) != 0 {
            since.store(0, Ordering::Release);
        }
        poll
    }
}

impl<S> Drop for Cuttable<S> {
    fn drop(&mut self) {
        // before `inner` (and its descriptor) goes
        if let Ok(mut socket) = self.state.socket.lock() {
            *socket = None;
        }
        self.state.gone.store(true, Ordering::Release);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Register first, so that a cut between the check and the inner poll still wakes us.
        self.state.reader.register(cx.waker());
        if self.state.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(self.aborted()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.state.writer.register(cx.waker());
        if self.state.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(self.aborted()));
        }
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.waiting(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.state.writer.register(cx.waker());
        if self.state.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(self.aborted()));
        }
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.waiting(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.cut.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn a_cut_wakes_a_blocked_reader_and_fails_writes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let (a, mut b) = tokio::io::duplex(64);
            let (mut a, cutter) = Cuttable::new(a);
            b.write_all(b"hi").await.expect("write");
            let mut buf = [0u8; 2];
            a.read_exact(&mut buf).await.expect("read before the cut");
            assert_eq!(&buf, b"hi");
            let reader = tokio::spawn(async move {
                let mut buf = [0u8; 8];
                let r = a.read(&mut buf).await;
                (r.map_err(|e| e.kind()), a)
            });
            tokio::task::yield_now().await;
            assert!(!cutter.is_cut());
            cutter.cut();
            let (r, mut a) = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
                .await
                .expect("the blocked read woke")
                .expect("task");
            assert_eq!(r, Err(io::ErrorKind::ConnectionAborted));
            assert_eq!(
                a.write_all(b"x").await.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionAborted)
            );
            drop(b);
        });
    }

    #[test]
    fn a_write_the_peer_never_takes_is_cut_as_timed_out() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let (a, b) = tokio::io::duplex(64);
            let (mut a, cutter) = Cuttable::new(a);
            assert_eq!(cutter.write_waiting(), Duration::ZERO);
            cutter.watch_writes(Duration::from_millis(200));
            assert_eq!(watched_here(), 1);
            // the peer (b) reads nothing: the write waits until the watch cuts it
            let r = tokio::time::timeout(Duration::from_secs(5), a.write_all(&[0u8; 4096]))
                .await
                .expect("the stalled write was cut");
            assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::TimedOut));
            assert!(cutter.is_cut());
            assert_eq!(watched_here(), 0, "a cut stream is no longer watched");
            // a stream that is gone leaves the watch too, uncut
            let (c, _d) = tokio::io::duplex(64);
            let (c, cutter) = Cuttable::new(c);
            cutter.watch_writes(Duration::from_millis(40));
            assert_eq!(watched_here(), 1);
            drop(c);
            tokio::time::timeout(Duration::from_secs(5), async {
                while watched_here() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the gone stream left the watch");
            assert!(!cutter.is_cut());
            drop(b);
        });
    }

    /// More streams than one chunk of the watcher's round: the gone ones leave, the rest stay,
    /// and a stalled one in the last chunk is cut (the gone ones come after the kept ones, so
    /// the swaps that remove them move it no further forward than the third chunk).
    #[test]
    fn the_watcher_goes_through_every_chunk() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let mut kept = Vec::new();
            for i in 0..3 * SCAN_CHUNK {
                let (a, b) = tokio::io::duplex(64);
                let (a, cutter) = Cuttable::new(a);
                cutter.watch_writes(Duration::from_secs(3600));
                if i < 2 * SCAN_CHUNK {
                    kept.push((a, b, cutter));
                }
            }
            let (stalled, _peer) = tokio::io::duplex(64);
            let (mut stalled, cutter) = Cuttable::new(stalled);
            cutter.watch_writes(Duration::from_millis(100));
            let r = tokio::time::timeout(Duration::from_secs(5), stalled.write_all(&[0u8; 4096]))
                .await
                .expect("the stalled write was cut");
            assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::TimedOut));
            assert_eq!(
                watched_here(),
                kept.len(),
                "the gone and the cut left the watch, the rest stayed"
            );
            assert!(kept.iter().all(|(_, _, c)| !c.is_cut()));
        });
    }

    #[test]
    fn a_slow_peer_that_keeps_reading_is_not_cut() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let (a, mut b) = tokio::io::duplex(64);
            let (mut a, cutter) = Cuttable::new(a);
            cutter.watch_writes(Duration::from_millis(400));
            // 16 bytes every 10 ms: each of the writer's waits is far shorter than the limit,
            // though the whole write takes longer than it
            let reader = tokio::spawn(async move {
                let mut got = 0;
                let mut buf = [0u8; 16];
                while got < 1024 {
                    let n = b.read(&mut buf).await.expect("read");
                    assert!(n > 0);
                    got += n;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                b
            });
            a.write_all(&[7u8; 1024]).await.expect("written, not cut");
            let _b = reader.await.expect("reader");
            assert!(!cutter.is_cut());
            // a moved byte reported from inside the stream restarts a waiting write's clock
            cutter.0.write_waiting_since.store(1, Ordering::Release);
            a.progress().moved();
            assert!(cutter.write_waiting() < Duration::from_millis(100));
            drop(a);
            tokio::time::timeout(Duration::from_secs(5), async {
                while watched_here() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the watch ended with its stream");
        });
    }

    #[test]
    fn a_cut_socket_ends_the_connection_even_when_no_one_polls_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let ours = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
                .await
                .expect("connect");
            let (mut peer, _) = l.accept().await.expect("accept");
            // held, never polled: the stream of a task stuck elsewhere
            let (held, cutter) = Cuttable::socket(ours);
            cutter.cut();
            let mut buf = [0u8; 8];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), peer.read(&mut buf))
                .await
                .expect("the peer learnt of the cut")
                .expect("read");
            assert_eq!(n, 0, "the peer reads the end of the stream");
            drop(held);
            // a cut after the stream is gone touches no descriptor
            cutter.cut();
        });
    }
}
