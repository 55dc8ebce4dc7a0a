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
//! A leg's socket moves into the ring's table of registered files (`Ring::adopt`) and its
//! descriptor is closed: the operations name the socket by its place in the table
//! (`IOSQE_FIXED_FILE`), the kernel looks nothing up in the process's descriptor table for
//! them, and a session holds no descriptor in the relay. So the relay's `RLIMIT_NOFILE` bounds
//! each worker's table, not the relay's descriptors: a relay of N workers holds N times that
//! many legs in its tables, and more on descriptors once a table is full. A full table, or a
//! kernel that has none or closes what leaves it late (before Linux 6.13,
//! [`table_closes_at_once`]), leaves the socket on its descriptor, which works the same. A place
//! in the table is given to another socket only once every operation that named it was reaped,
//! as a descriptor is closed only then.
//!
//! Buffers follow the traffic: a leg's receive buffer starts at [`MIN_READ`], doubles each time a
//! receive fills it (up to [`MAX_READ`]: one submission then carries several SSH packets), and
//! shrinks back when receives come small, so an idle session holds [`MIN_READ`] per leg in
//! flight rather than a bulk-sized buffer. A write that finds no send of the stream's in flight
//! or queued goes straight from the caller's buffer: the entry carries `MSG_DONTWAIT`, so the
//! kernel completes it within the submission and holds no pointer into that buffer afterwards
//! (`Ring::send_now`). What the socket has no room for is copied into a buffer of the stream's
//! own and sent while the caller goes on (and later writes join it until that send completes);
//! `poll_flush` waits for that send.
//!
//! A receive armed again once its data was read is queued without a system call of its own
//! (`Ring::start_lazy`): the bytes just read are about to be relayed, and that send's
//! `io_uring_enter` takes the receive into the kernel with it; what no send took is submitted
//! as the worker's thread goes idle ([`before_park`], its runtime's `on_thread_park`), or by
//! the driver after `LAZY_BACKSTOP` where the thread never parks. A
//! keystroke's echo through psm took four `io_uring_enter` on the relay, two sends and two
//! receives; it takes two (perf/BENCHMARKS.md).

//! A pass-through connection moves its bytes with splice(2) of its own and waits for its
//! sockets on the ring instead ([`Polled`]: one `IORING_OP_POLL_ADD` per wait, cancelled when
//! the waiter goes).

// io_uring hands the kernel pointers into our buffers: the one module of the relay with `unsafe`
#![allow(unsafe_code)]

mod accept;
mod ready;
mod stream;
pub use accept::{Incoming, Listener};
pub use ready::{Polled, Wait};
pub use stream::{Leg, UringStream};

use std::cell::RefCell;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A leg's receive buffer at its smallest (and at the start).
pub const MIN_READ: usize = 256;
/// A leg's receive buffer at its largest.
pub const MAX_READ: usize = 256 * 1024;
/// The send buffer a stream keeps for its next send is at most four times the last send, or
/// four times this (so a few keystrokes' packets reuse one buffer).
pub(crate) const SPARE_MIN: usize = 64;
/// Bytes a stream accepts from its writer before it waits for the send in flight.
pub(crate) const WRITE_CAP: usize = 256 * 1024;
/// Submission queue entries; the completion queue gets [`CQ_ENTRIES`] (each idle leg keeps one
/// receive in flight, and the kernel keeps completions that overflow the queue).
const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 4096;
/// psm gives a ring's table at most this many places (and no more than the process's soft
/// `RLIMIT_NOFILE`, the kernel's own bound): 512 KiB of kernel memory per worker.
const MAX_SLOTS: u32 = 65_536;

/// The socket an operation names.
#[derive(Clone)]
pub(crate) enum Sock {
    /// By its descriptor.
    Fd(Arc<TcpStream>),
    /// By its place in the ring's table of registered files; the process holds no descriptor.
    Fixed(Arc<Slot>),
    /// A listening socket, by its descriptor: its operations are accepts, whose result is a
    /// new descriptor.
    Listener(Arc<TcpListener>),
}

impl Sock {
    /// What a submission names the socket by, and the flag that says which kind it is.
    fn target(&self) -> (types::Fd, squeue::Flags) {
        match self {
            Sock::Fd(s) => (types::Fd(s.as_raw_fd()), squeue::Flags::empty()),
            // a fixed file's index travels in the descriptor's field, as the crate's
            // `types::Fixed` puts it
            Sock::Fixed(s) => (types::Fd(s.index as RawFd), squeue::Flags::FIXED_FILE),
            Sock::Listener(l) => (types::Fd(l.as_raw_fd()), squeue::Flags::empty()),
        }
    }
}

/// Closes what an operation nobody waits for any more leaves behind: the connection an accept
/// took (its result is then the new descriptor, which nobody else knows of).
fn drop_result(sock: &Sock, result: i32) {
    if matches!(sock, Sock::Listener(_)) && result >= 0 {
        // SAFETY: the kernel made this descriptor for the accept's completion and handed it to
        // nobody else: the process owns it, and this is its only use
        drop(unsafe { OwnedFd::from_raw_fd(result) });
    }
}

/// A socket's place in a ring's table. The socket stays there (open) while anything holds the
/// `Slot`: its stream, each operation in flight that names it, and a [`Shutter`]; the last one
/// gives the place back, and the ring then takes the socket out of the table (closing it)
/// before the place names another.
pub(crate) struct Slot {
    index: u32,
    ring: Weak<Ring>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // may run under the ring's lock (an operation dropped in `reap`): the place is only
        // noted here, on a lock of its own, and emptied by the driver
        if let Some(ring) = self.ring.upgrade() {
            ring.released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(self.index);
            ring.kick.notify_one();
        }
    }
}

/// Shuts a leg's socket down both ways from outside the task that owns it (a
/// [`Cutter`](crate::cut::Cutter)), whichever way the leg names its socket.
pub struct Shutter(ShutterKind);

enum ShutterKind {
    /// A descriptor, which the owner keeps open while the shutter may be used.
    Fd(RawFd),
    /// A socket in a ring's table, kept there while the shutter lives.
    Ring(Arc<Ring>, Sock),
}

impl Shutter {
    /// The socket of descriptor `fd`, which its owner keeps open while this lives.
    pub fn fd(fd: RawFd) -> Shutter {
        Shutter(ShutterKind::Fd(fd))
    }

    /// Shuts the socket down both ways (a socket already shut down or reset has nothing left
    /// to do).
    pub fn shut(&self) {
        match &self.0 {
            ShutterKind::Fd(fd) => {
                let _ = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Both);
            }
            ShutterKind::Ring(ring, sock) => ring.shut(sock, Shutdown::Both),
        }
    }
}

/// Armed while the kernel may read memory that `Ring::send_now` only borrows: dropped by an
/// unwind, it ends the process, since returning would free memory the kernel may still read.
struct Pinned;

impl Drop for Pinned {
    fn drop(&mut self) {
        std::process::abort();
    }
}

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
    /// The socket the operation names, kept open (and in its place in the table) until the
    /// completion is reaped: dropping the stream does not close it while this lives.
    _sock: Sock,
}

struct Inner {
    ring: IoUring,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Places in the table of registered files: `slots` in all, `next_slot` and above never
    /// used yet, `free_slots` empty again.
    slots: u32,
    next_slot: u32,
    free_slots: Vec<u32>,
    /// The last submission left entries the kernel did not take (busy, or an error): until
    /// one empties the queue, `send_now` leaves the socket to a buffered send rather than wait
    /// behind them.
    backlog: bool,
}

impl Inner {
    /// Hands every completion to its operation and wakes whoever waits on it, also those the
    /// completion queue had no room for: the kernel keeps them aside (its overflow list) until a
    /// system call asks for them, and the ring's descriptor does not say they are there.
    fn reap(&mut self) {
        let Inner {
            ring,
            ops,
            free,
            backlog,
            ..
        } = self;
        for _ in 0..8 {
            for cqe in ring.completion() {
                let id = cqe.user_data() as usize;
                let Some(slot) = ops.get_mut(id) else {
                    continue;
                };
                let Some(op) = slot.as_mut() else { continue };
                if op.orphan {
                    drop_result(&op._sock, cqe.result());
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
            let entered = ring.submit();
            // (that enter also took whatever the submission queue held)
            *backlog = !ring.submission().is_empty();
            if entered.is_err() {
                return;
            }
        }
    }

    /// Submits what the submission queue holds. A busy kernel (`EBUSY`: completions not yet
    /// reaped, `EAGAIN`: no memory for the requests just now) or an interrupted call gets the
    /// completions reaped and a few more tries; entries still queued after that (or left by a
    /// short submission) are sent by the driver, which retries while the queue holds any.
    fn submit(&mut self) -> io::Result<()> {
        let r = self.try_submit();
        self.backlog = self.unsubmitted();
        r
    }

    fn try_submit(&mut self) -> io::Result<()> {
        for _ in 0..4 {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if busy(&e) => self.reap(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A new operation on `sock` over `buf`, in a free slot of the table; returns its id.
    fn new_op(&mut self, sock: &Sock, buf: Vec<u8>) -> usize {
        let op = Op {
            result: None,
            waker: None,
            buf,
            orphan: false,
            _sock: sock.clone(),
        };
        match self.free.pop() {
            Some(id) => {
                self.ops[id] = Some(op);
                id
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    /// A new operation on `sock` over `buf`, its entry (built by `entry` from the buffer's final
    /// place) in the submission queue, not yet submitted; returns its id. A full queue is
    /// submitted first (a few tries); an error leaves nothing behind.
    fn queue_op(
        &mut self,
        sock: &Sock,
        buf: Vec<u8>,
        entry: impl FnOnce(&mut Vec<u8>) -> squeue::Entry,
    ) -> io::Result<usize> {
        let id = self.new_op(sock, buf);
        let op = self.ops[id].as_mut().expect("the slot was just filled");
        let sqe = entry(&mut op.buf).user_data(id as u64);
        let mut tries = 0;
        loop {
            // SAFETY: the entry points into `op.buf` (or at nothing), which stays in `ops[id]`
            // until the completion of this entry is reaped (`reap` keeps the slot while the
            // operation is in flight, `forget` only marks it orphan); the descriptor or place in
            // the table it names is kept by `ops[id]._sock` until then too, so the number names
            // this socket whenever the kernel takes the entry, however late (`UringStream`'s
            // `Drop` submits nothing new, and shuts the socket down so that what is in flight
            // completes).
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                return Ok(id);
            }
            // the submission queue is full: send what it holds, then queue again
            tries += 1;
            let failed = match self.submit() {
                Err(e) => Some(e),
                Ok(()) if tries >= 4 => Some(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the io_uring submission queue stays full",
                )),
                Ok(()) => None,
            };
            if let Some(e) = failed {
                self.ops[id] = None;
                self.free.push(id);
                return Err(e);
            }
        }
    }

    /// Entries queued and not yet taken by the kernel.
    fn unsubmitted(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Takes the sockets of the places in `released` out of the table (which closes them, as
    /// dropping a descriptor would), and makes the places free for other sockets. Nothing
    /// names them any more: each operation held its place until its completion was reaped.
    fn release(&mut self, released: &Mutex<Vec<u32>>) {
        let places = std::mem::take(&mut *released.lock().unwrap_or_else(|p| p.into_inner()));
        for index in places {
            match self.ring.submitter().register_files_update(index, &[-1]) {
                Ok(_) => self.free_slots.push(index),
                // not reused: the place may still hold its socket
                Err(e) => {
                    tracing::error!(index, error = %e, "io_uring: a registered socket could not be taken out of the table")
                }
            }
        }
    }

    /// A free place in the table, if any is left.
    fn free_slot(&mut self) -> Option<u32> {
        self.free_slots.pop().or_else(|| {
            (self.next_slot < self.slots).then(|| {
                self.next_slot += 1;
                self.next_slot - 1
            })
        })
    }
}

/// Whether `io_uring_enter` failed for now only (`EBUSY`: completions not yet reaped, `EAGAIN`:
/// no memory for the requests just now, `EINTR`): the same call may succeed a moment later.
fn busy(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EBUSY | nix::libc::EAGAIN | nix::libc::EINTR)
    )
}

/// How soon the driver tries again to submit entries the kernel did not take.
const RESUBMIT: std::time::Duration = std::time::Duration::from_millis(1);
/// How long a receive `Ring::start_lazy` queued may wait for a send or the thread going idle
/// to take it into the kernel before the driver does (a worker its tasks keep busy without
/// parking, a saturated pass-through splice say, where `before_park` does not run). While a
/// worker relays, a send takes the receive in long before this.
const LAZY_BACKSTOP: std::time::Duration = std::time::Duration::from_millis(2);

/// The ring's own descriptor, which the worker's runtime watches. Not a duplicate: each ring is
/// one descriptor of the relay, so `psm-perf check` counts the workers on io_uring by the
/// relay's `[io_uring]` descriptors.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A worker's io_uring instance. Made on the worker's thread, inside its runtime.
pub struct Ring {
    /// Watches `inner`'s ring: declared first, so it drops first (see `with_queues`).
    fd: AsyncFd<RingFd>,
    /// Wakes the driver when a submission left entries queued, or a place in the table was
    /// given back.
    kick: tokio::sync::Notify,
    /// Told by `Ring::start_lazy`: the driver submits what is still queued after
    /// [`LAZY_BACKSTOP`], should neither a send nor the thread going idle have taken it (a worker
    /// its tasks keep busy, whose runtime then polls for events without parking).
    lazy: tokio::sync::Notify,
    /// The worker's thread: only it submits (a request completes through the thread that
    /// submitted it, and is cancelled should that thread exit).
    owner: std::thread::ThreadId,
    /// Places in the table whose last holder went, for the driver to empty ([`Slot`]'s `Drop`
    /// may run under `inner`'s lock, so they wait here).
    released: Mutex<Vec<u32>>,
    /// Shutdowns of sockets in the table that the ring could not take when asked (its queue
    /// full, or the kernel busy); the driver sends them. Taken without `inner`'s lock held.
    deferred: Mutex<Vec<(Sock, Shutdown)>>,
    inner: Mutex<Inner>,
}

impl Ring {
    /// Sets up a ring; fails where io_uring is not allowed (`kernel.io_uring_disabled`, a
    /// seccomp filter) or outside a tokio runtime.
    pub fn new() -> io::Result<Arc<Ring>> {
        // the kernel takes a table no larger than the soft limit on descriptors
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(0);
        let slots = if table_closes_at_once() {
            u32::try_from(soft).unwrap_or(u32::MAX).min(MAX_SLOTS)
        } else {
            0
        };
        Ring::with_queues(SQ_ENTRIES, CQ_ENTRIES, slots)
    }

    /// A ring with `sq` submission and `cq` completion queue entries, and a table for up to
    /// `slots` registered sockets (none where the kernel refuses one).
    fn with_queues(sq: u32, cq: u32, slots: u32) -> io::Result<Arc<Ring>> {
        let ring = IoUring::builder().setup_cqsize(cq).build(sq)?;
        let slots = if slots > 0 && ring.submitter().register_files_sparse(slots).is_ok() {
            slots
        } else {
            0
        };
        // SAFETY: the registered descriptor is the ring's own, which `inner` (the `IoUring`)
        // owns and closes when it drops; `fd` is declared before `inner` in `Ring`, so it drops
        // (and deregisters) first: the descriptor stays open, on the same ring and the same
        // number, for the whole life of the `AsyncFd`.
        let fd = unsafe {
            AsyncFd::register_with_interest(RingFd(ring.as_raw_fd()), Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        let made = Arc::new(Ring {
            fd,
            kick: tokio::sync::Notify::new(),
            lazy: tokio::sync::Notify::new(),
            owner: std::thread::current().id(),
            released: Mutex::new(Vec::new()),
            deferred: Mutex::new(Vec::new()),
            inner: Mutex::new(Inner {
                ring,
                ops: Vec::new(),
                free: Vec::new(),
                slots,
                next_slot: 0,
                free_slots: Vec::new(),
                backlog: false,
            }),
        });
        MADE.with(|m| m.borrow_mut().push(Arc::downgrade(&made)));
        Ok(made)
    }

    /// How many sockets the ring's table may hold (0: none, every socket keeps its descriptor).
    pub fn slots(&self) -> u32 {
        self.lock().slots
    }

    /// Takes `sock` over for a stream on this ring: into a free place in the table, closing its
    /// descriptor, or (the table full, or none) on its descriptor.
    pub(crate) fn adopt(self: &Arc<Self>, sock: TcpStream) -> Sock {
        let mut g = self.lock();
        g.release(&self.released);
        let Some(index) = g.free_slot() else {
            return Sock::Fd(Arc::new(sock));
        };
        match g
            .ring
            .submitter()
            .register_files_update(index, &[sock.as_raw_fd()])
        {
            Ok(1) => {
                // the table holds the socket now; the descriptor goes
                drop(sock);
                Sock::Fixed(Arc::new(Slot {
                    index,
                    ring: Arc::downgrade(self),
                }))
            }
            _ => {
                g.free_slots.push(index);
                Sock::Fd(Arc::new(sock))
            }
        }
    }

    /// Shuts `sock` down (`how`): at once on a descriptor, through the ring for a socket in
    /// the table (whatever happens to the stream, the entry holds the socket until it is done).
    pub(crate) fn shut(&self, sock: &Sock, how: Shutdown) {
        match sock {
            Sock::Fd(s) => {
                let _ = s.shutdown(how);
            }
            // a listener leaves the `SO_REUSEPORT` group and its accept in flight ends
            // (`-EINVAL`); only a dropped `UringListener` asks for this
            Sock::Listener(l) => {
                let _ = socket2::SockRef::from(&**l).shutdown(how);
            }
            // from another thread (a cut): the worker's driver submits it, so that nothing
            // queued on the ring is submitted by a thread that may exit before it completes
            Sock::Fixed(_) if std::thread::current().id() != self.owner => {
                self.defer_shut(sock, how)
            }
            Sock::Fixed(_) => {
                match self.try_start(sock, Vec::new(), |_| shutdown_entry(sock, how), true) {
                    Ok(id) => self.forget(id),
                    // queued, orphaned: the driver submits it
                    Err((_, true)) => {}
                    // the ring takes no entry just now: the driver tries again until it does
                    Err((_, false)) => self.defer_shut(sock, how),
                }
            }
        }
    }

    /// Leaves the shutdown of `sock` to the driver, which sends it on its next round.
    fn defer_shut(&self, sock: &Sock, how: Shutdown) {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((sock.clone(), how));
        self.kick.notify_one();
    }

    /// Sends the shutdowns left to the driver; whether any is still left.
    fn send_deferred(&self) -> bool {
        let pending = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
        for (sock, how) in pending {
            self.shut(&sock, how);
        }
        !self
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// A [`Shutter`] for `sock`, which keeps it in the table while it lives.
    pub(crate) fn shutter(self: &Arc<Self>, sock: &Sock) -> Shutter {
        match sock {
            Sock::Fd(s) => Shutter::fd(s.as_raw_fd()),
            Sock::Listener(l) => Shutter::fd(l.as_raw_fd()),
            Sock::Fixed(_) => Shutter(ShutterKind::Ring(self.clone(), sock.clone())),
        }
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
                        () = self.lazy.notified() => {
                            // a send usually takes a lazy entry in before this runs; one still
                            // queued goes in at the next completion or after LAZY_BACKSTOP
                            if self.lock().unsubmitted() {
                                tokio::time::timeout(LAZY_BACKSTOP, self.fd.readable())
                                    .await
                                    .ok()
                            } else {
                                None
                            }
                        }
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
            let deferred = self.send_deferred();
            let mut g = self.lock();
            g.release(&self.released);
            g.reap();
            if g.unsubmitted() {
                let _ = g.submit();
            }
            // (completions still aside in the kernel, and shutdowns the ring could not take,
            // are tried again on the same timer)
            queued = deferred || g.unsubmitted() || g.ring.submission().cq_overflow();
        }
    }

    /// Queues one operation on `sock` over `buf` and submits it; returns its id. `entry` builds
    /// the submission from the buffer's final place.
    fn start(
        &self,
        sock: &Sock,
        buf: Vec<u8>,
        entry: impl FnOnce(&mut Vec<u8>) -> squeue::Entry,
    ) -> io::Result<usize> {
        self.try_start(sock, buf, entry, false).map_err(|(e, _)| e)
    }

    /// Queues one operation on `sock` over `buf` without entering the kernel for it: the next
    /// submission on this worker takes it along (a send's, `send_now`, which then costs one
    /// `io_uring_enter` for both), or [`before_park`] as the thread goes idle, or, where the
    /// worker never parks, the driver after [`LAZY_BACKSTOP`]. For a
    /// receive armed again after its data was read: where its data is already there it
    /// completes at that submission, where not it waits in the kernel as it would have. Returns
    /// its id.
    fn start_lazy(
        &self,
        sock: &Sock,
        buf: Vec<u8>,
        entry: impl FnOnce(&mut Vec<u8>) -> squeue::Entry,
    ) -> io::Result<usize> {
        let id = self.lock().queue_op(sock, buf, entry)?;
        self.lazy.notify_one();
        Ok(id)
    }

    /// Submits what `Ring::start_lazy` left queued: [`before_park`] calls this as the
    /// worker's thread is about to wait for events, so an entry no send took along reaches the
    /// kernel before the thread sleeps. Entries the kernel would not take are left
    /// to the driver's retries.
    pub fn flush_lazy(&self) {
        let mut g = self.lock();
        if !g.unsubmitted() {
            g.backlog = false;
            return;
        }
        let _ = g.submit();
        if g.backlog {
            // the driver tries again on its timer
            drop(g);
            self.kick.notify_one();
        }
    }

    /// [`Ring::start`], whose error also says whether the entry stayed queued (orphaned: the
    /// driver submits it later) or was not queued at all. `shutdown`: the entry is itself the
    /// socket's shutdown (an orphaned one needs no other to end it).
    fn try_start(
        &self,
        sock: &Sock,
        buf: Vec<u8>,
        entry: impl FnOnce(&mut Vec<u8>) -> squeue::Entry,
        shutdown: bool,
    ) -> Result<usize, (io::Error, bool)> {
        let mut g = self.lock();
        let id = g.queue_op(sock, buf, entry).map_err(|e| (e, false))?;
        if let Err(e) = g.submit() {
            if matches!(sock, Sock::Listener(_)) {
                // an accept stays its listener's: the driver submits it, and the connection it
                // takes is the listener's next (an orphan would take one and close it)
                tracing::warn!(error = %e, "io_uring: an accept waits for the ring to take it");
                drop(g);
                self.kick.notify_one();
                return Ok(id);
            }
            // the entry stays queued (the driver submits it later) with its buffer and socket;
            // nobody waits for its completion now, and the socket is shut down so that it does
            // complete (the stream has no operation to end when it drops)
            if let Some(op) = g.ops[id].as_mut() {
                op.orphan = true;
            }
            match sock {
                Sock::Fd(s) => {
                    let _ = s.shutdown(Shutdown::Both);
                }
                // (an accept is not orphaned: returned above)
                Sock::Listener(_) => {}
                // the driver sends the shutdown when the ring takes entries again
                Sock::Fixed(_) if !shutdown => self.defer_shut(sock, Shutdown::Both),
                Sock::Fixed(_) => {}
            }
            drop(g);
            self.kick.notify_one();
            return Err((e, true));
        }
        // a socket with data (or room) completes within the submission: take it now
        g.reap();
        if g.unsubmitted() {
            self.kick.notify_one();
        }
        Ok(id)
    }

    /// Sends what of `data` the socket has room for now, straight from `data`, and returns the
    /// completion's result: the bytes sent, or `-EAGAIN` where the socket had no room. Entries
    /// queued before it (`Ring::start_lazy`'s receives) go into the kernel with it, in the same
    /// `io_uring_enter`. None, with nothing submitted, when the queue holds entries the kernel
    /// would not take (the caller then goes through a buffer of its own). The entry carries `MSG_DONTWAIT`,
    /// so the kernel completes it within the submission (`REQ_F_NOWAIT`: `EAGAIN` instead of
    /// waiting for room) rather than keeping it to try again, and this returns only once that
    /// completion is reaped: the kernel holds no pointer into `data` afterwards. This saves the
    /// copy through the stream's own buffer when the socket has room.
    pub(crate) fn send_now(&self, sock: &Sock, data: &[u8]) -> Option<i32> {
        let mut g = self.lock();
        if !g.unsubmitted() {
            g.backlog = false;
        } else if g.backlog {
            return None;
        }
        let id = g.new_op(sock, Vec::new());
        let (fd, flags) = sock.target();
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Send::new(fd, data.as_ptr(), len)
            .flags(nix::libc::MSG_NOSIGNAL | nix::libc::MSG_DONTWAIT)
            .build()
            .flags(flags)
            .user_data(id as u64);
        // SAFETY: the entry reads `data`, which is borrowed for this whole call, and this
        // returns only once the entry's completion is reaped (below); should anything between
        // the push and that point unwind, `Pinned` ends the process rather than let `data` go
        // while the kernel may still read it. The socket is held by `ops[id]._sock` until the
        // completion, as for every operation.
        if unsafe { g.ring.submission().push(&sqe) }.is_err() {
            g.ops[id] = None;
            g.free.push(id);
            return None;
        }
        let pinned = Pinned;
        let mut hard_failures = 0u32;
        let mut tries = 0u32;
        let res = loop {
            // the entry first; once the kernel took it, its completion (posted within the
            // submission for a non-waiting send; waited for should it not be)
            let entered = if g.unsubmitted() {
                g.ring.submit()
            } else {
                g.ring.submit_and_wait(1)
            };
            g.reap();
            if let Some(res) = g.ops[id].as_ref().and_then(|op| op.result) {
                break res;
            }
            match entered {
                Ok(_) => {}
                Err(e) if busy(&e) => {
                    // the kernel is short of memory or completions just now
                    tries += 1;
                    if tries.is_multiple_of(16) {
                        std::thread::yield_now();
                    }
                }
                Err(e) => {
                    hard_failures += 1;
                    if hard_failures > 100 {
                        // the kernel may still read `data`: going on would risk it
                        tracing::error!(error = %e, "io_uring: a send from a caller's buffer cannot be completed; aborting");
                        std::process::abort();
                    }
                }
            }
        };
        std::mem::forget(pinned);
        g.ops[id] = None;
        g.free.push(id);
        Some(res)
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
            Some(op) if op.result.is_some() => {
                drop_result(&op._sock, op.result.unwrap_or(-1));
                true
            }
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

/// Whether this kernel closes a socket as soon as it leaves a ring's table and no operation
/// uses it: from Linux 6.13 each registered file has its own reference. Before, a socket taken
/// out waited until every operation issued before on the ring had completed (the table's
/// references were retired in order), so one idle leg's receive could hold every later socket
/// open: the relay gives such kernels no table.
pub fn table_closes_at_once() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 13)
}

/// The entry that shuts `sock` down (`how`).
fn shutdown_entry(sock: &Sock, how: Shutdown) -> squeue::Entry {
    let how = match how {
        Shutdown::Read => nix::libc::SHUT_RD,
        Shutdown::Write => nix::libc::SHUT_WR,
        Shutdown::Both => nix::libc::SHUT_RDWR,
    };
    let (fd, flags) = sock.target();
    opcode::Shutdown::new(fd, how).build().flags(flags)
}

thread_local! {
    static RING: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
    /// Every ring made on this thread (a worker makes one), for [`before_park`].
    static MADE: RefCell<Vec<Weak<Ring>>> = const { RefCell::new(Vec::new()) };
}

/// For `on_thread_park` of a runtime whose tasks use rings (each worker's): as the thread is
/// about to wait for events, every ring made on it submits what `Ring::start_lazy` left
/// queued (receives armed again that no send took into the kernel).
pub fn before_park() {
    let rings: Vec<Arc<Ring>> = MADE.with(|m| {
        let mut m = m.borrow_mut();
        m.retain(|w| w.strong_count() > 0);
        m.iter().filter_map(Weak::upgrade).collect()
    });
    for ring in &rings {
        ring.flush_lazy();
    }
}

/// Makes `ring` the one this thread's streams use ([`Leg::new`]).
pub fn install(ring: Arc<Ring>) {
    RING.with(|r| *r.borrow_mut() = Some(ring));
}

/// The ring of this thread's worker, when it runs on io_uring.
pub fn current() -> Option<Arc<Ring>> {
    RING.with(|r| r.borrow().clone())
}
