//! A worker's link to psm-recorder: the thread that ships the worker's frames over its own
//! connection to `recorder.sock` and hands psm-recorder's replies to the streams they name.

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use psm_recorder_format::{Frame, Reply};
use tokio::sync::watch;
use tracing::{info, warn};

use super::batch::Batch;
use super::durable::{Durable, Window};
use super::{LinkState, StreamStatus};

/// How long the link thread sleeps when its queues are empty.
pub(super) const LINK_IDLE: Duration = Duration::from_millis(50);

/// What the link keeps about one open stream.
pub(super) struct StreamEntry {
    pub(super) status: watch::Sender<StreamStatus>,
    pub(super) durable: Arc<Durable>,
}

pub(super) struct LinkShared {
    pub(super) queues: Mutex<Vec<Arc<ArrayQueue<Frame>>>>,
    pub(super) state_tx: watch::Sender<LinkState>,
    pub(super) sleeping: AtomicBool,
    /// Wakes the link thread out of its `poll` (written by a worker when the link sleeps).
    pub(super) wake: EventFd,
    pub(super) next_stream: AtomicU64,
    /// Open streams and what psm-recorder last said about each.
    pub(super) streams: Mutex<HashMap<u64, StreamEntry>>,
    /// Each session's durable window.
    pub(super) window: Window,
}

impl LinkShared {
    /// The age of the oldest relayed byte of this link's open recordings psm-recorder has not
    /// confirmed durable (zero when all is confirmed). The windows are read outside the lock.
    pub(super) fn lag(&self, now: Instant) -> Duration {
        let durables: Vec<Arc<Durable>> = match self.streams.lock() {
            Ok(m) => m.values().map(|e| e.durable.clone()).collect(),
            Err(_) => Vec::new(),
        };
        durables
            .iter()
            .filter_map(|d| d.lag(now))
            .max()
            .unwrap_or_default()
    }

    pub(super) fn report(&self, stream: u64, status: StreamStatus) {
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

    pub(super) fn forget(&self, stream: u64) {
        if let Ok(mut m) = self.streams.lock() {
            m.remove(&stream);
        }
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

pub(super) fn link_thread(socket: PathBuf, shared: Arc<LinkShared>) {
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
                shared.lose_all(&format!("the link to psm-recorder dropped: {err}"));
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
pub(super) struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    /// Reads what arrived and hands each whole reply to its stream; `Err` says why the link is
    /// over (psm-recorder closed it, or sent a reply that does not parse).
    pub(super) fn take(&mut self, r: &mut UnixStream, shared: &LinkShared) -> Result<(), String> {
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
/// socket has no room for frames. Returns why the link ended: also when psm-recorder takes
/// nothing of a batch for twice the stall limit (its thread stuck with the connection open;
/// twice, so that a session paused on its durable window meets its own limit first and ends
/// with that reason), which
/// would otherwise leave the worker's queue full, and every recorded session of the worker
/// waiting to queue a frame, for as long as psm-recorder stays stuck: dropping the link fails
/// their recordings, and the reconnect empties the queue.
fn pump(mut stream: UnixStream, shared: &LinkShared) -> String {
    if let Err(e) = stream.set_nonblocking(true) {
        return format!("setting up the connection to psm-recorder: {e}");
    }
    let mut batch = Batch::new(true);
    let mut open = HashSet::new();
    let mut replies = Replies::default();
    // since when the socket has taken nothing of the batch, and how much of it was written then
    let mut stuck: Option<(Instant, usize)> = None;
    loop {
        if let Err(why) = replies.take(&mut stream, shared) {
            return why;
        }
        // a batch the socket took only part of goes on before anything new
        let any = if batch.is_empty() {
            let any = drain_queues(shared, Some((&mut batch, &mut open)));
            batch.end_run();
            any
        } else {
            true
        };
        if !batch.is_empty() {
            match batch.write_some(&mut stream) {
                Ok(true) => {
                    batch.clear();
                    stuck = None;
                }
                Ok(false) => {
                    let now = Instant::now();
                    match stuck {
                        Some((since, at)) if at == batch.written() => {
                            let limit = shared.window.stall * 2;
                            if now.duration_since(since) >= limit {
                                return format!(
                                    "psm-recorder took nothing for {} s (stalled recorder)",
                                    limit.as_secs_f64()
                                );
                            }
                        }
                        _ => stuck = Some((now, batch.written())),
                    }
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
