//! Readiness through the ring, for a socket whose bytes psm moves with system calls of its own:
//! a pass-through connection's, which splice(2) moves socket → pipe → socket
//! (`passthrough::splice`). io_uring's own `IORING_OP_SPLICE` is no use there: the kernel runs
//! each one as a blocking splice in an io-wq thread of its own, so an idle connection would
//! hold a kernel thread. Instead the splice is tried without blocking, and when the socket has
//! nothing (or no room) the worker waits for it with one `IORING_OP_POLL_ADD` on its ring: a
//! worker on io_uring registers no socket of its with the runtime's epoll, pass-through's
//! included.
//!
//! The wait is queued like a receive armed again (`Ring::start_lazy`): it reaches the kernel
//! with the worker's next submission or as its thread goes idle. A wait dropped before it
//! completed (its connection cut or ended) is cancelled (`IORING_OP_ASYNC_CANCEL`), so it does
//! not keep its socket open until the peer next sends.

use std::future::Future;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use io_uring::opcode;

use super::{Ring, Sock};

/// The `user_data` of a cancellation's own entry: no operation has it, so `reap` skips its
/// completion.
const CANCEL: u64 = u64::MAX;

/// What a socket is waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Bytes to read, or the peer's end.
    Readable,
    /// Room to write.
    Writable,
}

impl Wait {
    fn mask(self) -> u32 {
        // errors and hang-ups are reported whatever the mask
        match self {
            Wait::Readable => nix::libc::POLLIN as u32,
            Wait::Writable => nix::libc::POLLOUT as u32,
        }
    }
}

/// A connected socket on its descriptor (non-blocking), whose readiness comes from a ring.
pub struct Polled {
    tcp: Arc<TcpStream>,
    ring: Arc<Ring>,
}

impl Polled {
    /// `tcp`, its readiness from `ring` (it is set non-blocking: the caller's own system calls
    /// must not wait).
    pub fn new(tcp: TcpStream, ring: Arc<Ring>) -> io::Result<Polled> {
        tcp.set_nonblocking(true)?;
        Ok(Polled {
            tcp: Arc::new(tcp),
            ring,
        })
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Waits until the socket is ready for `wait` (or has an error, or hung up): one
    /// `IORING_OP_POLL_ADD`. A socket ready already completes as its entry is submitted.
    pub async fn ready(&self, wait: Wait) -> io::Result<()> {
        let sock = Sock::Fd(self.tcp.clone());
        let (fd, flags) = sock.target();
        let id = self.ring.start_lazy(&sock, Vec::new(), |_| {
            opcode::PollAdd::new(fd, wait.mask()).build().flags(flags)
        })?;
        Ready {
            ring: &self.ring,
            id: Some(id),
        }
        .await
    }
}

/// One poll in flight on the ring.
struct Ready<'a> {
    ring: &'a Ring,
    id: Option<usize>,
}

impl Future for Ready<'_> {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(id) = self.id else {
            return Poll::Ready(Err(io::Error::other("polled after it completed")));
        };
        let (res, _) = ready!(self.ring.poll_op(id, cx));
        self.id = None;
        Poll::Ready(if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(())
        })
    }
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.ring.cancel(id);
        }
    }
}

impl Ring {
    /// Nobody waits for operation `id` any more, and it may never complete on its own (a poll
    /// on a quiet socket): the kernel is asked to cancel it, and its completion then frees it
    /// (and lets its socket close). Where the ring cannot take the cancellation (another
    /// thread, a queue that stays full), the socket is shut down instead, which completes it.
    fn cancel(&self, id: usize) {
        let mut g = self.lock();
        let sock = match g.ops.get_mut(id).and_then(Option::as_mut) {
            Some(op) if op.result.is_none() => {
                op.orphan = true;
                op.waker = None;
                op._sock.clone()
            }
            Some(_) => {
                // completed, never read
                g.ops[id] = None;
                g.free.push(id);
                return;
            }
            None => return,
        };
        if std::thread::current().id() == self.owner {
            let sqe = opcode::AsyncCancel::new(id as u64)
                .build()
                .user_data(CANCEL);
            // SAFETY: the entry points at no memory; it names the operation by its
            // `user_data`, which stays reserved to it until its completion is reaped
            let mut pushed = unsafe { g.ring.submission().push(&sqe) }.is_ok();
            if !pushed && g.submit().is_ok() {
                // SAFETY: as above
                pushed = unsafe { g.ring.submission().push(&sqe) }.is_ok();
            }
            if pushed {
                let _ = g.submit();
                if g.unsubmitted() {
                    drop(g);
                    self.kick.notify_one();
                }
                return;
            }
        }
        drop(g);
        self.shut(&sock, Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::stream::tests::{ring, runtime};
    use std::io::{Read, Write};
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("test io");
        let a = TcpStream::connect(l.local_addr().expect("test io")).expect("test io");
        let (b, _) = l.accept().expect("test io");
        (a, b)
    }

    async fn until_nothing_in_flight(ring: &Ring) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while ring.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("every operation completed and was freed");
    }

    /// A wait completes when the peer sends, and at once for a socket with room.
    #[test]
    fn a_wait_ends_when_the_socket_is_ready() {
        runtime().block_on(async {
            let ring = ring();
            let (ours, mut peer) = pair();
            let p = Polled::new(ours, ring.clone()).expect("polled");
            tokio::time::timeout(Duration::from_secs(5), p.ready(Wait::Writable))
                .await
                .expect("an empty socket has room")
                .expect("poll");
            let waiting = p.ready(Wait::Readable);
            tokio::pin!(waiting);
            assert!(
                tokio::time::timeout(Duration::from_millis(50), waiting.as_mut())
                    .await
                    .is_err(),
                "nothing was sent yet"
            );
            peer.write_all(b"x").expect("test io");
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("the byte makes it readable")
                .expect("poll");
            let mut b = [0u8; 1];
            let mut r = p.tcp();
            r.read_exact(&mut b).expect("the byte is there");
            until_nothing_in_flight(&ring).await;
        });
    }

    /// A wait dropped on a quiet socket is cancelled: nothing stays in flight, and the socket
    /// closes with its owner (the peer sees the end) although its peer never sent a byte.
    #[test]
    fn a_dropped_wait_is_cancelled_and_lets_its_socket_close() {
        runtime().block_on(async {
            let ring = ring();
            let (ours, mut peer) = pair();
            let p = Polled::new(ours, ring.clone()).expect("polled");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), p.ready(Wait::Readable))
                    .await
                    .is_err(),
                "nothing was sent"
            );
            until_nothing_in_flight(&ring).await;
            drop(p);
            peer.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("test io");
            let mut b = [0u8; 1];
            let n = tokio::task::spawn_blocking(move || peer.read(&mut b))
                .await
                .expect("join")
                .expect("the peer sees the end, not a timeout");
            assert_eq!(n, 0);
        });
    }
}
