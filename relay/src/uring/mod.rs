//! io_uring socket I/O for a worker's connections.
//!
//! russh drives each SSH leg through `AsyncRead`/`AsyncWrite` and needs the stream to be `Send`.
//! tokio-uring's streams are `!Send` (and that crate has no maintainer today), so the relay drives
//! a ring of its own with the `io-uring` crate: one [`Ring`] per worker thread, its completions
//! noticed through the ring's file descriptor, which the worker's tokio runtime watches like any
//! socket, and one [`UringStream`] per leg whose reads and writes are `IORING_OP_RECV` and
//! `IORING_OP_SEND`.
//!
//! The kernel writes into (and reads from) memory it owns until the completion, so the buffers
//! live in the ring's table of operations, not in the stream: a stream dropped with an operation
//! in flight leaves its buffer there until the completion comes, and shuts its socket down so that
//! the completion does come. Each operation also holds the socket it names, so the descriptor
//! stays open until its completion is reaped: an entry the kernel has not taken yet (the driver
//! submits it later) can never name a number the process has since given to another connection.
//!
//! Buffers follow the traffic: a leg's receive buffer starts at [`MIN_READ`], doubles each time a
//! receive fills it (up to [`MAX_READ`]: one submission then carries several SSH packets), and
//! shrinks back when receives come small, so an idle session holds [`MIN_READ`] per leg in
//! flight rather than a bulk-sized buffer. Writes are copied into a buffer of the stream's own
//! and sent while the caller goes on; `poll_flush` waits for the send, which on a socket with room
//! completes within the submitting system call.

// io_uring hands the kernel pointers into our buffers: the one module of the relay with `unsafe`
#![allow(unsafe_code)]

mod stream;
pub use stream::{Leg, UringStream};

use std::cell::RefCell;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use io_uring::{squeue, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A leg's receive buffer at its smallest (and at the start).
pub const MIN_READ: usize = 1024;
/// A leg's receive buffer at its largest.
pub const MAX_READ: usize = 256 * 1024;
/// The send buffer a stream keeps for its next send is at most four times the last send, or
/// four times this (so a few keystrokes' packets reuse one buffer).
pub(crate) const SPARE_MIN: usize = 256;
/// Bytes a stream accepts from its writer before it waits for the send in flight.
pub(crate) const WRITE_CAP: usize = 256 * 1024;
/// Submission queue entries; the completion queue gets [`CQ_ENTRIES`] (each idle leg keeps one
/// receive in flight, and the kernel keeps completions that overflow the queue).
const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 4096;

/// One operation the kernel has not finished with, or whose result its stream has not read.
struct Op {
    /// The completion's result, once it came.
    result: Option<i32>,
    waker: Option<Waker>,
    /// The memory the operation reads or writes. Kept here until the completion, whatever
    /// becomes of the stream (moving the `Op` does not move the heap memory).
    buf: Vec<u8>,
    /// The stream is gone: drop the operation at its completion.
    orphan: bool,
    /// The socket the operation names, kept open until the completion is reaped (dropping the
    /// stream does not close it while this lives).
    _sock: Arc<TcpStream>,
}

struct Inner {
    ring: IoUring,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
}

impl Inner {
    /// Hands every completion to its operation and wakes whoever waits on it, also those the
    /// completion queue had no room for: the kernel keeps them aside (its overflow list) until a
    /// system call asks for them, and the ring's descriptor does not say they are there.
    fn reap(&mut self) {
        let Inner { ring, ops, free } = self;
        for _ in 0..8 {
            for cqe in ring.completion() {
                let id = cqe.user_data() as usize;
                let Some(slot) = ops.get_mut(id) else {
                    continue;
                };
                let Some(op) = slot.as_mut() else { continue };
                if op.orphan {
                    *slot = None;
                    free.push(id);
                    continue;
                }
                op.result = Some(cqe.result());
                if let Some(w) = op.waker.take() {
                    w.wake();
                }
            }
            if !ring.submission().cq_overflow() {
                return;
            }
            // entering the kernel with the overflow flag set brings them into the queue (the
            // crate asks for completions then); what the queue still cannot take waits for the
            // next round of the driver
            if ring.submit().is_err() {
                return;
            }
        }
    }

    /// Submits what the submission queue holds. A busy kernel (`EBUSY`: completions not yet
    /// reaped, `EAGAIN`: no memory for the requests just now) or an interrupted call gets the
    /// completions reaped and a few more tries; entries still queued after that (or left by a
    /// short submission) are sent by the driver, which retries while the queue holds any.
    fn submit(&mut self) -> io::Result<()> {
        for _ in 0..4 {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EBUSY | nix::libc::EAGAIN | nix::libc::EINTR)
                    ) =>
                {
                    self.reap();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Entries queued and not yet taken by the kernel.
    fn unsubmitted(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }
}

/// How soon the driver tries again to submit entries the kernel did not take.
const RESUBMIT: std::time::Duration = std::time::Duration::from_millis(1);

/// A descriptor of the ring (a duplicate of its own), which the worker's runtime watches.
struct RingFd(OwnedFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A worker's io_uring instance. Made on the worker's thread, inside its runtime.
pub struct Ring {
    fd: AsyncFd<RingFd>,
    /// Wakes the driver when a submission left entries queued.
    kick: tokio::sync::Notify,
    inner: Mutex<Inner>,
}

impl Ring {
    /// Sets up a ring; fails where io_uring is not allowed (`kernel.io_uring_disabled`, a
    /// seccomp filter) or outside a tokio runtime.
    pub fn new() -> io::Result<Arc<Ring>> {
        Ring::with_queues(SQ_ENTRIES, CQ_ENTRIES)
    }

    /// A ring with `sq` submission and `cq` completion queue entries.
    fn with_queues(sq: u32, cq: u32) -> io::Result<Arc<Ring>> {
        let ring = IoUring::builder().setup_cqsize(cq).build(sq)?;
        // SAFETY: the registered descriptor is owned by the `RingFd` the `AsyncFd` owns, so it
        // stays open, on the same ring, and the same number, until the `AsyncFd` drops.
        let dup = ring.as_fd().try_clone_to_owned()?;
        let fd = unsafe { AsyncFd::register_with_interest(RingFd(dup), Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Arc::new(Ring {
            fd,
            kick: tokio::sync::Notify::new(),
            inner: Mutex::new(Inner {
                ring,
                ops: Vec::new(),
                free: Vec::new(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the lock leaves the table consistent (every step is one
        // assignment): go on with it
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs on the worker for as long as the worker: each time the kernel posts completions,
    /// hands them to their operations.
    pub async fn drive(self: Arc<Self>) {
        // entries the kernel did not take in the last round
        let mut queued = false;
        loop {
            let readable = async {
                if queued {
                    tokio::time::timeout(RESUBMIT, self.fd.readable())
                        .await
                        .ok()
                } else {
                    tokio::select! {
                        r = self.fd.readable() => Some(r),
                        () = self.kick.notified() => None,
                    }
                }
            };
            match readable.await {
                Some(Ok(mut ready)) => ready.clear_ready(),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "io_uring completions can no longer be watched");
                    return;
                }
                None => {} // entries wait in the queue: try them again
            }
            let mut g = self.lock();
            g.reap();
            if g.unsubmitted() {
                let _ = g.submit();
            }
            // (completions still aside in the kernel are fetched on the same timer)
            queued = g.unsubmitted() || g.ring.submission().cq_overflow();
        }
    }

    /// Queues one operation on `sock` over `buf` and submits it; returns its id. `entry` builds
    /// the submission from the buffer's final place.
    fn start(
        &self,
        sock: &Arc<TcpStream>,
        buf: Vec<u8>,
        entry: impl FnOnce(&mut Vec<u8>) -> squeue::Entry,
    ) -> io::Result<usize> {
        let mut g = self.lock();
        let id = match g.free.pop() {
            Some(id) => id,
            None => {
                g.ops.push(None);
                g.ops.len() - 1
            }
        };
        let op = g.ops[id].insert(Op {
            result: None,
            waker: None,
            buf,
            orphan: false,
            _sock: sock.clone(),
        });
        let sqe = entry(&mut op.buf).user_data(id as u64);
        let mut tries = 0;
        loop {
            // SAFETY: the entry points into `op.buf` (or at nothing), which stays in `ops[id]`
            // until the completion of this entry is reaped (`reap` keeps the slot while the
            // operation is in flight, `forget` only marks it orphan); the descriptor it names is
            // kept open by `ops[id]._sock` until then too, so the number names this socket
            // whenever the kernel takes the entry (`UringStream`'s `Drop` submits nothing new,
            // and shuts the socket down so that what is in flight completes).
            let pushed = unsafe { g.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                break;
            }
            // the submission queue is full: send what it holds, then queue again
            tries += 1;
            let failed = match g.submit() {
                Err(e) => Some(e),
                Ok(()) if tries >= 4 => Some(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the io_uring submission queue stays full",
                )),
                Ok(()) => None,
            };
            if let Some(e) = failed {
                g.ops[id] = None;
                g.free.push(id);
                return Err(e);
            }
        }
        if let Err(e) = g.submit() {
            // the entry stays queued (the driver submits it later) with its buffer and socket;
            // nobody waits for its completion now, and the socket is shut down so that it does
            // complete (the stream has no operation to end when it drops)
            if let Some(op) = g.ops[id].as_mut() {
                op.orphan = true;
            }
            let _ = sock.shutdown(std::net::Shutdown::Both);
            drop(g);
            self.kick.notify_one();
            return Err(e);
        }
        // a socket with data (or room) completes within the submission: take it now
        g.reap();
        if g.unsubmitted() {
            self.kick.notify_one();
        }
        Ok(id)
    }

    /// The result of operation `id` and its buffer, once it completed; until then the task is
    /// woken at the completion.
    fn poll_op(&self, id: usize, cx: &mut Context<'_>) -> Poll<(i32, Vec<u8>)> {
        let mut g = self.lock();
        g.reap();
        let Some(op) = g.ops.get_mut(id).and_then(Option::as_mut) else {
            return Poll::Ready((-nix::libc::ECANCELED, Vec::new()));
        };
        if op.result.is_none() {
            match &op.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => op.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let op = g.ops[id].take().expect("the slot was just read");
        g.free.push(id);
        Poll::Ready((op.result.unwrap_or(0), op.buf))
    }

    /// The stream of operation `id` is gone: its buffer goes when the completion comes.
    fn forget(&self, id: usize) {
        let mut g = self.lock();
        let done = match g.ops.get_mut(id).and_then(Option::as_mut) {
            Some(op) if op.result.is_some() => true,
            Some(op) => {
                op.orphan = true;
                op.waker = None;
                false
            }
            None => return,
        };
        if done {
            g.ops[id] = None;
            g.free.push(id);
        }
    }

    /// Operations whose completion has not been taken yet (in flight, or done and unread).
    pub fn in_flight(&self) -> usize {
        let g = self.lock();
        g.ops.len() - g.free.len()
    }
}

thread_local! {
    static RING: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
}

/// Makes `ring` the one this thread's streams use ([`Leg::new`]).
pub fn install(ring: Arc<Ring>) {
    RING.with(|r| *r.borrow_mut() = Some(ring));
}

/// The ring of this thread's worker, when it runs on io_uring.
pub fn current() -> Option<Arc<Ring>> {
    RING.with(|r| r.borrow().clone())
}
