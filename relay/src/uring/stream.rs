//! A leg's stream on the worker's ring ([`UringStream`]), and [`Leg`]: a connection on whichever
//! back end its worker runs.

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use io_uring::opcode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{current, Ring, Shutter, Sock, MAX_READ, MIN_READ, SPARE_MIN, WRITE_CAP};

/// The receive side: `buf[pos..filled]` is received and not yet read.
struct ReadSide {
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    /// The receive in flight.
    op: Option<usize>,
    /// The size of the next receive.
    size: usize,
}

/// The send side: `pending` waits for the send in flight (`op`), which has sent `off` bytes of
/// its buffer so far; `spare` is the last sent buffer, kept for reuse.
struct WriteSide {
    pending: Vec<u8>,
    spare: Vec<u8>,
    op: Option<usize>,
    off: usize,
    /// The shutdown of the sending side in flight (a socket in the ring's table), and whether
    /// it was done.
    shut: Option<usize>,
    shut_done: bool,
}

/// A TCP stream whose reads and writes go through the worker's io_uring.
pub struct UringStream {
    /// Shared with each operation in flight, which keeps it open until its completion.
    sock: Sock,
    ring: Arc<Ring>,
    rd: ReadSide,
    wr: WriteSide,
    /// Told each time a send moves bytes (one write can take several sends).
    progress: Option<crate::cut::Progress>,
}

impl UringStream {
    /// Moves `sock` onto `ring`, into its table of registered sockets where it has room (the
    /// socket goes back to blocking mode: io_uring tries each operation without blocking first
    /// and waits on its own).
    pub fn new(sock: std::net::TcpStream, ring: Arc<Ring>) -> io::Result<UringStream> {
        sock.set_nonblocking(false)?;
        Ok(UringStream::blocking(sock, ring))
    }

    /// [`UringStream::new`] for a socket already in blocking mode (one the ring accepted:
    /// its accept asks for no `SOCK_NONBLOCK`), without the system call that would set it so.
    fn blocking(sock: std::net::TcpStream, ring: Arc<Ring>) -> UringStream {
        UringStream {
            sock: ring.adopt(sock),
            ring,
            rd: ReadSide {
                buf: Vec::new(),
                pos: 0,
                filled: 0,
                op: None,
                size: MIN_READ,
            },
            wr: WriteSide {
                pending: Vec::new(),
                spare: Vec::new(),
                op: None,
                off: 0,
                shut: None,
                shut_done: false,
            },
            progress: None,
        }
    }

    fn start_recv(&mut self) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.rd.buf);
        buf.clear();
        if buf.capacity() != self.rd.size {
            // not zero-filled: the kernel writes into the spare room, and the completion says
            // how much of it is written (the size follows the traffic, and a bulk transfer
            // whose receives come now full, now short changed it often enough for zeroing
            // each new buffer to be 4 % of a worker's samples: perf/BENCHMARKS.md)
            buf = Vec::with_capacity(self.rd.size);
        }
        let (fd, flags) = self.sock.target();
        // queued, not submitted: the worker's next send (the bytes just read, relayed, are
        // about to be one) or its runtime going idle takes it into the kernel
        let id = self.ring.start_lazy(&self.sock, buf, |b| {
            let room = b.spare_capacity_mut();
            opcode::Recv::new(fd, room.as_mut_ptr().cast(), room.len() as u32)
                .build()
                .flags(flags)
        })?;
        self.rd.op = Some(id);
        Ok(())
    }

    /// Sends `wr.pending` (when there is something and no send is in flight).
    fn start_send(&mut self) -> io::Result<()> {
        if self.wr.op.is_some() || self.wr.pending.is_empty() {
            return Ok(());
        }
        let buf = std::mem::replace(&mut self.wr.pending, std::mem::take(&mut self.wr.spare));
        self.wr.off = 0;
        self.submit_send(buf)
    }

    fn submit_send(&mut self, buf: Vec<u8>) -> io::Result<()> {
        let ((fd, flags), off) = (self.sock.target(), self.wr.off);
        let id = self.ring.start(&self.sock, buf, |b| {
            let rest = &b[off..];
            opcode::Send::new(fd, rest.as_ptr(), rest.len() as u32)
                .flags(nix::libc::MSG_NOSIGNAL)
                .build()
                .flags(flags)
        })?;
        self.wr.op = Some(id);
        Ok(())
    }

    /// Ready when no send is in flight (every completion so far taken, short sends sent on).
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(id) = self.wr.op {
            let (res, mut buf) = ready!(self.ring.poll_op(id, cx));
            self.wr.op = None;
            if res < 0 {
                if matches!(-res, nix::libc::EINTR | nix::libc::EAGAIN) {
                    self.submit_send(buf)?;
                    continue;
                }
                return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
            }
            if res == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wr.off += res as usize;
            if let Some(p) = &self.progress {
                p.moved();
            }
            if self.wr.off < buf.len() {
                self.submit_send(buf)?;
                continue;
            }
            // keep the buffer for the next send unless it is far larger than sends are now (an
            // idle leg then keeps only a small one: its last sends were keystrokes' packets)
            let sent = buf.len();
            buf.clear();
            if buf.capacity() <= 4 * sent.max(SPARE_MIN) {
                self.wr.spare = buf;
            }
            self.wr.off = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for UringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let rd = &mut me.rd;
            if rd.pos < rd.filled {
                let n = out.remaining().min(rd.filled - rd.pos);
                out.put_slice(&rd.buf[rd.pos..rd.pos + n]);
                rd.pos += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(id) = rd.op {
                let (res, mut buf) = ready!(me.ring.poll_op(id, cx));
                if res > 0 && buf.is_empty() {
                    let n = (res as usize).min(buf.capacity());
                    // SAFETY: the receive wrote its first `res` bytes into the buffer's spare
                    // room (the kernel writes no more than it was given, `capacity`): they
                    // are initialised
                    unsafe { buf.set_len(n) };
                }
                let rd = &mut me.rd;
                rd.op = None;
                rd.buf = buf;
                rd.pos = 0;
                rd.filled = 0;
                if res < 0 {
                    if matches!(-res, nix::libc::EINTR | nix::libc::EAGAIN) {
                        continue;
                    }
                    return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
                }
                let n = res as usize;
                if n == 0 {
                    return Poll::Ready(Ok(())); // end of stream
                }
                rd.filled = n;
                // follow the traffic: a full receive doubles the next, a small one halves it (at
                // once: an idle leg's handshake leaves few receives to bring it down; messages
                // a little larger than the buffer among small ones make it grow and shrink,
                // which costs an allocation and a receive more per message)
                if n == rd.buf.capacity() {
                    rd.size = (rd.size * 2).min(MAX_READ);
                } else if n < rd.size / 8 {
                    rd.size = (rd.size / 2).max(MIN_READ);
                }
                continue;
            }
            me.start_recv()?;
        }
    }
}

impl AsyncWrite for UringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let idle = match me.poll_sent(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => true,
                Poll::Pending => false,
            };
            if idle && me.wr.pending.is_empty() {
                // nothing queued before these bytes: they go from the caller's buffer to the
                // socket as far as it has room, and only the rest through `pending`
                match me.ring.send_now(&me.sock, data) {
                    Some(n) if n > 0 => {
                        if let Some(p) = &me.progress {
                            p.moved();
                        }
                        return Poll::Ready(Ok(n as usize));
                    }
                    Some(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Some(e) if matches!(-e, nix::libc::EAGAIN | nix::libc::EINTR) => {}
                    Some(e) => return Poll::Ready(Err(io::Error::from_raw_os_error(-e))),
                    None => {}
                }
            }
            let room = WRITE_CAP.saturating_sub(me.wr.pending.len());
            if room > 0 {
                let n = room.min(data.len());
                me.wr.pending.extend_from_slice(&data[..n]);
                if idle {
                    me.start_send()?;
                }
                return Poll::Ready(Ok(n));
            }
            if !idle {
                return Poll::Pending;
            }
            me.start_send()?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            ready!(me.poll_sent(cx))?;
            if me.wr.pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
            me.start_send()?;
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        let me = self.get_mut();
        if let Sock::Fd(s) = &me.sock {
            return Poll::Ready(s.shutdown(Shutdown::Write));
        }
        // a socket in the table is shut down through the ring
        if me.wr.shut_done {
            return Poll::Ready(Ok(()));
        }
        let id = match me.wr.shut {
            Some(id) => id,
            None => {
                let entry = super::shutdown_entry(&me.sock, Shutdown::Write);
                let id = me.ring.start(&me.sock, Vec::new(), |_| entry)?;
                me.wr.shut = Some(id);
                id
            }
        };
        let (res, _) = ready!(me.ring.poll_op(id, cx));
        me.wr.shut = None;
        me.wr.shut_done = true;
        if res < 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        let ops = [self.rd.op, self.wr.op, self.wr.shut];
        if ops.iter().any(Option::is_some) {
            // the operations in flight hold the socket (and the kernel, once it took them): end
            // them, or the connection would outlive its stream
            self.ring.shut(&self.sock, Shutdown::Both);
        }
        for id in ops.into_iter().flatten() {
            self.ring.forget(id);
        }
    }
}

/// One leg's TCP stream, on the worker's back end: io_uring where the worker runs one, else
/// tokio's readiness I/O (epoll).
pub enum Leg {
    /// epoll readiness.
    Epoll(tokio::net::TcpStream),
    /// io_uring.
    Uring(UringStream),
}

impl Leg {
    /// Tells `progress` whenever a send moves bytes, also in the middle of a write: io_uring
    /// sends a write's buffer in as many sends as the peer's window takes. (On epoll each
    /// write returns what it moved, which its [`Cuttable`](crate::cut::Cuttable) sees.)
    pub fn report_progress(&mut self, progress: crate::cut::Progress) {
        if let Leg::Uring(s) = self {
            s.progress = Some(progress);
        }
    }

    /// A connection as the worker got it, on this thread's back end: one the ring accepted
    /// goes straight onto it, never registered with the runtime's epoll.
    pub fn accepted(incoming: super::Incoming) -> io::Result<Leg> {
        match incoming {
            super::Incoming::Tokio(tcp) => Leg::new(tcp),
            super::Incoming::Ring(tcp, ring) => Ok(Leg::Uring(UringStream::blocking(tcp, ring))),
        }
    }

    /// `tcp` on this thread's back end.
    pub fn new(tcp: tokio::net::TcpStream) -> io::Result<Leg> {
        match current() {
            Some(ring) => Ok(Leg::Uring(UringStream::new(tcp.into_std()?, ring)?)),
            None => Ok(Leg::Epoll(tcp)),
        }
    }
}

impl crate::cut::Socket for Leg {
    fn shutter(&self) -> Shutter {
        match self {
            Leg::Epoll(s) => s.shutter(),
            Leg::Uring(s) => s.ring.shutter(&s.sock),
        }
    }
}

impl AsyncRead for Leg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Epoll(s) => Pin::new(s).poll_read(cx, buf),
            Leg::Uring(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Leg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Leg::Epoll(s) => Pin::new(s).poll_write(cx, data),
            Leg::Uring(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Epoll(s) => Pin::new(s).poll_flush(cx),
            Leg::Uring(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Epoll(s) => Pin::new(s).poll_shutdown(cx),
            Leg::Uring(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A current-thread runtime, as a worker's.
    pub(in crate::uring) fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::uring::before_park)
            .build()
            .expect("runtime")
    }

    /// A ring on this runtime, driven (io_uring must be allowed here, as the relay's
    /// integration tests require; `psm-perf check` says why when it is not).
    /// (With a table whatever the kernel: before 6.13 the relay gives its rings none, but the
    /// kernel has them from 5.19.)
    pub(in crate::uring) fn ring() -> Arc<Ring> {
        ring_with_slots(1024)
    }

    /// The relay's rings get a table where the kernel closes a socket that leaves it at once.
    #[test]
    fn the_relays_rings_get_a_table_from_linux_6_13() {
        runtime().block_on(async {
            let r = Ring::new().expect("io_uring is not allowed on this machine");
            assert_eq!(r.slots() > 0, super::super::table_closes_at_once());
        });
    }

    /// The `[io_uring]` descriptors this process holds.
    fn ring_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[io_uring]")
            })
            .count()
    }

    /// A ring is one descriptor of the relay, closed with the ring: `psm-perf check` counts
    /// the workers on io_uring by them. (nextest runs each test in a process of its own.)
    #[test]
    fn a_ring_is_one_descriptor() {
        runtime().block_on(async {
            let before = ring_descriptors();
            let r = Ring::new().expect("io_uring is not allowed on this machine");
            assert_eq!(ring_descriptors(), before + 1);
            let (a, b) = (r.clone(), Ring::new().expect("a second ring"));
            assert_eq!(ring_descriptors(), before + 2);
            drop((r, a, b));
            assert_eq!(ring_descriptors(), before);
        });
    }

    /// A driven ring whose table holds `slots` sockets (0: none).
    fn ring_with_slots(slots: u32) -> Arc<Ring> {
        let r = Ring::with_queues(super::super::SQ_ENTRIES, super::super::CQ_ENTRIES, slots)
            .expect("io_uring is not allowed on this machine");
        assert_eq!(r.slots(), slots);
        tokio::spawn(r.clone().drive());
        r
    }

    /// The inode of a socket, as `/proc/self/fd` links name it (`socket:[inode]`).
    fn socket_link(fd: &impl std::os::fd::AsRawFd) -> String {
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        std::fs::read_link(link)
            .expect("fd link")
            .to_string_lossy()
            .into_owned()
    }

    /// Whether any descriptor of this process is `link`.
    fn has_descriptor(link: &str) -> bool {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == link))
    }

    /// The place in the table of a stream's socket, if it is there.
    fn index(s: &UringStream) -> Option<u32> {
        match &s.sock {
            Sock::Fixed(slot) => Some(slot.index),
            Sock::Fd(_) | Sock::Listener(_) => None,
        }
    }

    async fn pair(ring: &Arc<Ring>) -> (UringStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, a) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let c = c.expect("connect");
        let (a, _) = a.expect("accept");
        (
            UringStream::new(c.into_std().expect("std"), ring.clone()).expect("stream"),
            a,
        )
    }

    /// A receive armed again waits in the queue for the next send, which takes it into the
    /// kernel in its own `io_uring_enter` (the send going straight from the caller's buffer).
    #[test]
    fn a_receive_armed_again_goes_in_with_the_next_send() {
        runtime().block_on(async {
            let ring = ring();
            let (mut a, mut a_peer) = pair(&ring).await;
            let (mut b, mut b_peer) = pair(&ring).await;
            let mut buf = [0u8; 16];
            // a's receive, queued: nothing entered the kernel for it
            let mut read = std::pin::pin!(a.read(&mut buf));
            assert!(futures_util::poll!(read.as_mut()).is_pending());
            assert!(ring.lock().unsubmitted(), "queued, not submitted");
            // b's send takes it along, and goes the direct way, not through b's own buffer
            b.write_all(b"x").await.expect("send");
            assert!(
                b.wr.op.is_none() && b.wr.pending.is_empty(),
                "sent directly"
            );
            assert!(!ring.lock().unsubmitted(), "submitted with the send");
            let mut one = [0u8; 1];
            b_peer.read_exact(&mut one).await.expect("b's byte");
            a_peer.write_all(b"hello").await.expect("to a");
            assert_eq!(read.await.expect("read"), 5);
            assert_eq!(&buf[..5], b"hello");
        });
    }

    /// A receive no send took goes into the kernel as the thread is about to sleep
    /// (`before_park`): here on a ring with no driver, so nothing else would submit it.
    #[test]
    fn a_receive_no_send_took_goes_in_before_the_thread_sleeps() {
        runtime().block_on(async {
            let ring = Ring::with_queues(super::super::SQ_ENTRIES, super::super::CQ_ENTRIES, 0)
                .expect("io_uring is not allowed on this machine");
            let (mut a, _a_peer) = pair(&ring).await;
            let mut buf = [0u8; 16];
            let mut read = std::pin::pin!(a.read(&mut buf));
            assert!(futures_util::poll!(read.as_mut()).is_pending());
            assert!(ring.lock().unsubmitted(), "queued, not submitted");
            // the thread parks (a timer, nothing else to run)
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert!(
                !ring.lock().unsubmitted(),
                "submitted as the thread went idle"
            );
        });
    }

    /// Where the runtime never calls `before_park` (a worker kept busy polls for events
    /// without parking; here a runtime without the hook), the driver submits a queued receive
    /// after `LAZY_BACKSTOP`: the reader still gets its bytes.
    #[test]
    fn a_receive_queued_on_a_busy_worker_goes_in_after_a_short_wait() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime without the hook");
        rt.block_on(async {
            let ring = ring();
            let (mut a, mut a_peer) = pair(&ring).await;
            let mut buf = [0u8; 16];
            let mut read = std::pin::pin!(a.read(&mut buf));
            assert!(futures_util::poll!(read.as_mut()).is_pending());
            assert!(ring.lock().unsubmitted(), "queued, not submitted");
            a_peer.write_all(b"late").await.expect("to a");
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), read)
                .await
                .expect("the driver submitted the receive")
                .expect("read");
            assert_eq!(&buf[..n], b"late");
        });
    }

    /// 64 MiB each way at once through one stream, every byte checked, with receive and send
    /// sizes that do not line up with the stream's buffers: a socket in the ring's table.
    #[test]
    fn bytes_cross_intact_both_ways_at_once() {
        runtime().block_on(async {
            let ring = ring();
            let (s, peer) = pair(&ring).await;
            assert!(index(&s).is_some(), "the socket went into the table");
            both_ways(s, peer).await;
        });
    }

    /// The same on a socket that kept its descriptor (a ring without a table).
    #[test]
    fn bytes_cross_intact_both_ways_at_once_on_a_descriptor() {
        runtime().block_on(async {
            let ring = ring_with_slots(0);
            let (s, peer) = pair(&ring).await;
            assert!(
                index(&s).is_none(),
                "no table: the socket keeps its descriptor"
            );
            both_ways(s, peer).await;
        });
    }

    async fn both_ways(s: UringStream, mut peer: tokio::net::TcpStream) {
        let (mut sr, mut sw) = tokio::io::split(s);
        const N: usize = 64 << 20;
        let pattern = |i: usize| (i.wrapping_mul(7919) >> 3) as u8;
        let send = async move {
            let mut i = 0;
            while i < N {
                let n = (i % 70_001 + 1).min(N - i);
                let chunk: Vec<u8> = (i..i + n).map(pattern).collect();
                sw.write_all(&chunk).await.expect("write");
                i += n;
            }
            sw.flush().await.expect("flush");
            sw.shutdown().await.expect("shutdown");
        };
        let (mut pr, mut pw) = peer.split();
        let echo = async {
            // the peer sends its own N bytes and checks what it receives
            let send = async {
                let mut i = 0;
                while i < N {
                    let n = (i % 33_333 + 1).min(N - i);
                    let chunk: Vec<u8> = (i..i + n).map(pattern).collect();
                    pw.write_all(&chunk).await.expect("peer write");
                    i += n;
                }
                pw.shutdown().await.expect("peer shutdown");
            };
            let recv = async {
                let mut got = 0usize;
                let mut b = vec![0u8; 50_000];
                loop {
                    let n = pr.read(&mut b).await.expect("peer read");
                    if n == 0 {
                        break;
                    }
                    for (k, byte) in b[..n].iter().enumerate() {
                        assert_eq!(*byte, pattern(got + k), "byte {} to the peer", got + k);
                    }
                    got += n;
                }
                assert_eq!(got, N);
            };
            tokio::join!(send, recv);
        };
        let recv = async move {
            let mut got = 0usize;
            let mut b = vec![0u8; 9_000];
            loop {
                let n = sr.read(&mut b).await.expect("read");
                if n == 0 {
                    break;
                }
                for (k, byte) in b[..n].iter().enumerate() {
                    assert_eq!(*byte, pattern(got + k), "byte {} from the peer", got + k);
                }
                got += n;
            }
            assert_eq!(got, N);
        };
        tokio::join!(send, echo, recv);
    }

    /// A socket in the table holds no descriptor of the process, and the connection still
    /// ends when its stream drops (with nothing in flight: the place is given back, which
    /// closes it); a shutdown of the sending side reaches the peer while the stream still
    /// reads.
    #[test]
    fn a_socket_in_the_table_holds_no_descriptor_and_closes_with_its_stream() {
        runtime().block_on(async {
            let ring = ring();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let (c, a) = tokio::join!(
                tokio::net::TcpStream::connect(l.local_addr().expect("addr")),
                l.accept()
            );
            let c = c.expect("connect").into_std().expect("std");
            let (mut peer, _) = a.expect("accept");
            let link = socket_link(&c);
            let mut s = UringStream::new(c, ring.clone()).expect("stream");
            assert!(index(&s).is_some());
            assert!(!has_descriptor(&link), "the descriptor was closed");
            s.write_all(b"hello").await.expect("write");
            s.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.expect("peer read");
            assert_eq!(got, b"hello", "the peer read the bytes and the end");
            peer.write_all(b"back").await.expect("peer write");
            let mut b = [0u8; 4];
            s.read_exact(&mut b)
                .await
                .expect("read after shutting the write side");
            assert_eq!(&b, b"back");
            drop(s);
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                peer.write_all(b"x").await?;
                peer.read(&mut b).await
            })
            .await
            .expect("the connection ended");
            assert!(
                matches!(n, Ok(0) | Err(_)),
                "the peer sees the end or a reset: {n:?}"
            );
        });
    }

    /// A full table leaves further sockets on their descriptors, which work the same; a
    /// place given back is used again.
    #[test]
    fn a_full_table_leaves_sockets_on_their_descriptors() {
        runtime().block_on(async {
            let ring = ring_with_slots(1);
            let (mut first, mut p1) = pair(&ring).await;
            let (mut second, mut p2) = pair(&ring).await;
            assert_eq!(index(&first), Some(0));
            assert_eq!(index(&second), None);
            for (s, p) in [(&mut first, &mut p1), (&mut second, &mut p2)] {
                s.write_all(b"ping").await.expect("write");
                s.flush().await.expect("flush");
                let mut b = [0u8; 4];
                p.read_exact(&mut b).await.expect("peer read");
                p.write_all(&b).await.expect("peer write");
                s.read_exact(&mut b).await.expect("read");
                assert_eq!(&b, b"ping");
            }
            drop(first);
            // the driver takes the socket out of the table once the place is given back
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), p1.read(&mut b))
                .await
                .expect("the first connection closed")
                .expect("read");
            assert_eq!(n, 0);
            let (third, _p3) = pair(&ring).await;
            assert_eq!(index(&third), Some(0), "the place was used again");
        });
    }

    /// A cut reaches a socket in the table through the ring, from another thread, while the
    /// stream is held and never polled.
    #[test]
    fn a_cut_reaches_a_socket_in_the_table() {
        runtime().block_on(async {
            let ring = ring();
            let (s, mut peer) = pair(&ring).await;
            let (held, cutter) = crate::cut::Cuttable::socket(Leg::Uring(s));
            std::thread::spawn(move || cutter.cut())
                .join()
                .expect("cut");
            let mut b = [0u8; 8];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), peer.read(&mut b))
                .await
                .expect("the peer learnt of the cut")
                .expect("read");
            assert_eq!(n, 0);
            drop(held);
        });
    }

    /// A shutdown the ring could not take at once, left to its driver, reaches the socket on
    /// the driver's next round: the peer sees the write side end, and the other way still
    /// carries bytes (the socket stayed in the table).
    #[test]
    fn a_shutdown_left_to_the_driver_reaches_the_socket() {
        runtime().block_on(async {
            let ring = ring();
            let (mut s, mut peer) = pair(&ring).await;
            assert!(index(&s).is_some(), "the socket went into the table");
            ring.defer_shut(&s.sock, std::net::Shutdown::Write);
            let mut b = [0u8; 8];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), peer.read(&mut b))
                .await
                .expect("the driver sent the shutdown")
                .expect("read");
            assert_eq!(n, 0, "the peer saw the write side end");
            peer.write_all(b"still").await.expect("write");
            let mut got = [0u8; 5];
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut got))
                .await
                .expect("the other way still carries bytes")
                .expect("read");
            assert_eq!(&got, b"still");
        });
    }

    /// Dropping a stream that waits on a receive ends the connection (the peer sees the end)
    /// and leaves nothing in flight once the completion came.
    #[test]
    fn a_dropped_stream_closes_its_connection_and_frees_its_operation() {
        runtime().block_on(async {
            let ring = ring();
            let (mut s, mut peer) = pair(&ring).await;
            let mut b = [0u8; 16];
            // start a receive that cannot complete
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut b))
                    .await
                    .is_err()
            );
            assert_eq!(ring.in_flight(), 1);
            drop(s);
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), peer.read(&mut b))
                .await
                .expect("the peer sees the end")
                .expect("read");
            assert_eq!(n, 0);
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while ring.in_flight() > 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the orphaned receive completed and was freed");
        });
    }

    /// A socket stays in its place in the table until every operation that names it is
    /// reaped, also once its stream is gone, so an entry still waiting in the submission queue
    /// can never reach a connection that was given the same place since; then the place is used
    /// again.
    #[test]
    fn a_dropped_streams_socket_lives_until_its_operations_are_reaped() {
        runtime().block_on(async {
            // no driver: completions are reaped only when this test says
            let ring = Ring::with_queues(super::super::SQ_ENTRIES, super::super::CQ_ENTRIES, 64)
                .expect("io_uring is not allowed on this machine");
            let (mut s, mut peer) = pair(&ring).await;
            let place = index(&s).expect("in the table");
            s.start_recv().expect("receive");
            // the stream goes, its receive stays in flight (nothing shuts it down)
            let id = s.rd.op.take().expect("in flight");
            drop(s);
            assert_eq!(ring.in_flight(), 1);
            let (other, _p) = pair(&ring).await;
            assert_ne!(
                index(&other),
                Some(place),
                "the receive in flight keeps the place"
            );
            peer.write_all(b"x").await.expect("peer write");
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    ring.lock().reap();
                    if ring.lock().ops[id]
                        .as_ref()
                        .is_some_and(|op| op.result.is_some())
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the receive completed");
            let (still, _p) = pair(&ring).await;
            assert_ne!(
                index(&still),
                Some(place),
                "completed but not yet taken: the operation still holds the place"
            );
            ring.forget(id);
            assert_eq!(ring.in_flight(), 0);
            let (again, _p) = pair(&ring).await;
            assert_eq!(index(&again), Some(place), "taken: the place is free again");
        });
    }

    /// Completions the completion queue had no room for (the kernel keeps them aside) are
    /// reaped too, without a new submission to bring them in: a worker whose legs all complete
    /// at once wakes every one of them.
    #[test]
    fn completions_beyond_the_queue_are_reaped() {
        runtime().block_on(async {
            // no driver, and a completion queue of 8 for 20 receives
            let ring =
                Ring::with_queues(4, 8, 64).expect("io_uring is not allowed on this machine");
            let mut legs = Vec::new();
            for _ in 0..20 {
                let (mut s, peer) = pair(&ring).await;
                s.start_recv().expect("receive");
                legs.push((s, peer));
            }
            for (_, peer) in &mut legs {
                peer.write_all(b"x").await.expect("peer write");
            }
            let done = |ring: &Ring| {
                let mut g = ring.lock();
                g.reap();
                g.ops
                    .iter()
                    .flatten()
                    .filter(|op| op.result.is_some())
                    .count()
            };
            let all = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while done(&ring) < 20 {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            })
            .await;
            assert!(all.is_ok(), "{} of 20 completions reaped", done(&ring));
        });
    }

    /// A write to a socket with room goes from the caller's buffer, not through the stream's;
    /// once the socket is full, the rest waits in the stream's buffer, and every byte arrives in
    /// order.
    #[test]
    fn writes_skip_the_streams_buffer_while_the_socket_has_room() {
        runtime().block_on(async {
            let ring = ring();
            let (mut s, mut peer) = pair(&ring).await;
            assert_eq!(s.write(b"hello").await.expect("write"), 5);
            assert!(
                s.wr.op.is_none() && s.wr.pending.is_empty() && s.wr.spare.capacity() == 0,
                "sent without the stream's buffer"
            );
            let mut got = [0u8; 5];
            peer.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"hello");
            // the peer reads nothing yet: the socket fills and the stream's buffer takes over
            let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
            let mut sent = 0;
            while s.wr.pending.is_empty() && s.wr.op.is_none() {
                assert!(
                    sent < big.len(),
                    "32 MiB went out without filling the socket"
                );
                sent += s.write(&big[sent..]).await.expect("write");
            }
            let (w, r) = tokio::join!(
                async {
                    s.write_all(&big[sent..]).await?;
                    s.flush().await
                },
                async {
                    let mut all = vec![0u8; big.len()];
                    peer.read_exact(&mut all).await.map(|_| all)
                }
            );
            w.expect("write the rest");
            assert!(r.expect("read") == big, "every byte in order");
        });
    }

    /// An idle stream's receive buffer comes back to its smallest after a bulk transfer.
    #[test]
    fn the_receive_buffer_grows_with_bulk_and_shrinks_when_idle() {
        runtime().block_on(async {
            let ring = ring();
            let (mut s, mut peer) = pair(&ring).await;
            let big = vec![7u8; 8 << 20];
            let mut sink = vec![0u8; 1 << 20];
            let (w, ()) = tokio::join!(peer.write_all(&big), async {
                let mut got = 0;
                while got < big.len() {
                    got += s.read(&mut sink).await.expect("read");
                }
            });
            w.expect("write");
            assert!(s.rd.size > MIN_READ, "a bulk transfer grew the buffer");
            // a halving per small receive, from 256 KiB
            for _ in 0..(MAX_READ / MIN_READ).ilog2() {
                peer.write_all(b"x").await.expect("write");
                assert_eq!(s.read(&mut sink).await.expect("read"), 1);
            }
            assert_eq!(s.rd.size, MIN_READ);
        });
    }
}
