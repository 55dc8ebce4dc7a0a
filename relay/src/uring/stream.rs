//! A leg's stream on the worker's ring ([`UringStream`]), and [`Leg`]: a connection on whichever
//! back end its worker runs.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use io_uring::{opcode, types};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{current, Ring, MAX_READ, MIN_READ, SPARE_MIN, WRITE_CAP};

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
}

/// A TCP stream whose reads and writes go through the worker's io_uring.
pub struct UringStream {
    /// Shared with each operation in flight, which keeps it open until its completion.
    sock: Arc<std::net::TcpStream>,
    ring: Arc<Ring>,
    rd: ReadSide,
    wr: WriteSide,
    /// Told each time a send moves bytes (one write can take several sends).
    progress: Option<crate::cut::Progress>,
}

impl UringStream {
    /// Moves `sock` onto `ring` (the socket goes back to blocking mode: io_uring tries each
    /// operation without blocking first and waits on its own).
    pub fn new(sock: std::net::TcpStream, ring: Arc<Ring>) -> io::Result<UringStream> {
        sock.set_nonblocking(false)?;
        Ok(UringStream {
            sock: Arc::new(sock),
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
            },
            progress: None,
        })
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.sock.as_raw_fd())
    }

    fn start_recv(&mut self) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.rd.buf);
        if buf.len() != self.rd.size {
            // zeroed once per size change, so that the kernel writes into initialised memory
            // and no `set_len` is needed
            buf = vec![0; self.rd.size];
        }
        let fd = self.fd();
        let id = self.ring.start(&self.sock, buf, |b| {
            opcode::Recv::new(fd, b.as_mut_ptr(), b.len() as u32).build()
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
        let (fd, off) = (self.fd(), self.wr.off);
        let id = self.ring.start(&self.sock, buf, |b| {
            let rest = &b[off..];
            opcode::Send::new(fd, rest.as_ptr(), rest.len() as u32)
                .flags(nix::libc::MSG_NOSIGNAL)
                .build()
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
                let (res, buf) = ready!(me.ring.poll_op(id, cx));
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
                // follow the traffic: a full receive doubles the next, a small one halves it
                if n == rd.buf.len() {
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
        Poll::Ready(self.sock.shutdown(Shutdown::Write))
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        if self.rd.op.is_some() || self.wr.op.is_some() {
            // the operations in flight hold the socket (and the kernel, once it took them): end
            // them, or the connection would outlive its stream
            let _ = self.sock.shutdown(Shutdown::Both);
        }
        for id in [self.rd.op, self.wr.op].into_iter().flatten() {
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

    /// `tcp` on this thread's back end.
    pub fn new(tcp: tokio::net::TcpStream) -> io::Result<Leg> {
        match current() {
            Some(ring) => Ok(Leg::Uring(UringStream::new(tcp.into_std()?, ring)?)),
            None => Ok(Leg::Epoll(tcp)),
        }
    }
}

impl std::os::fd::AsRawFd for Leg {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Leg::Epoll(s) => s.as_raw_fd(),
            Leg::Uring(s) => s.sock.as_raw_fd(),
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
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A ring on this runtime, driven (io_uring must be allowed here, as the relay's
    /// integration tests require; `psm-perf check` says why when it is not).
    fn ring() -> Arc<Ring> {
        let r = Ring::new().expect("io_uring is not allowed on this machine");
        tokio::spawn(r.clone().drive());
        r
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

    /// 64 MiB each way at once through one stream, every byte checked, with receive and send
    /// sizes that do not line up with the stream's buffers.
    #[test]
    fn bytes_cross_intact_both_ways_at_once() {
        runtime().block_on(async {
            let ring = ring();
            let (s, mut peer) = pair(&ring).await;
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

    /// A dropped stream's socket stays open until every operation that names it is reaped, so
    /// an entry still waiting in the submission queue can never reach a connection that was
    /// given the same descriptor number since.
    #[test]
    fn a_dropped_streams_socket_lives_until_its_operations_are_reaped() {
        runtime().block_on(async {
            // no driver: completions are reaped only when this test says
            let ring = Ring::new().expect("io_uring is not allowed on this machine");
            let (mut s, _peer) = pair(&ring).await;
            let fd = s.sock.as_raw_fd();
            // `socket:[inode]`
            let link = format!("/proc/self/fd/{fd}");
            let socket = std::fs::read_link(&link).expect("fd link");
            let sock = Arc::downgrade(&s.sock);
            let mut b = [0u8; 16];
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut b))
                    .await
                    .is_err()
            );
            assert_eq!(ring.in_flight(), 1);
            drop(s);
            assert!(
                sock.upgrade().is_some(),
                "the receive in flight keeps the socket"
            );
            assert_eq!(
                std::fs::read_link(&link).expect("the descriptor is still open"),
                socket,
                "the descriptor still names this socket"
            );
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    ring.lock().reap();
                    if ring.in_flight() == 0 {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the shut-down receive completed");
            assert_eq!(sock.strong_count(), 0, "reaped: the socket is closed");
        });
    }

    /// Completions the completion queue had no room for (the kernel keeps them aside) are
    /// reaped too, without a new submission to bring them in: a worker whose legs all complete
    /// at once wakes every one of them.
    #[test]
    fn completions_beyond_the_queue_are_reaped() {
        runtime().block_on(async {
            // no driver, and a completion queue of 8 for 20 receives
            let ring = Ring::with_queues(4, 8).expect("io_uring is not allowed on this machine");
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
            for _ in 0..10 {
                peer.write_all(b"x").await.expect("write");
                assert_eq!(s.read(&mut sink).await.expect("read"), 1);
            }
            assert_eq!(s.rd.size, MIN_READ);
        });
    }
}
