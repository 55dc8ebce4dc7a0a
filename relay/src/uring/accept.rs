//! Accepting connections through the ring: a worker's SSH and RDP listeners take their
//! connections with `IORING_OP_ACCEPT`, so a worker on io_uring makes no `accept` call of its
//! own for them and registers neither them nor their connections with its runtime's epoll: an
//! accepted descriptor goes straight onto the ring ([`Leg::accepted`](super::Leg::accepted)),
//! into its table where the table has room. A pass-through port's listener takes its
//! connections the same way; they stay on their descriptors, which splice(2) needs, and wait on
//! the ring ([`Polled`](super::Polled)).
//!
//! A [`Listener`] keeps one accept in flight at most, which outlives the future waiting on it
//! (`accept` can be dropped in a `select!` and called again: the connection the kernel took in
//! the meantime is the next one returned), and stays the listener's even when the ring could
//! not take it at once (the driver submits it). A listener dropped with an accept in flight is
//! shut down, which ends the accept and takes the socket out of its `SO_REUSEPORT` group at
//! once; a connection the accept took just before is closed by the ring (`drop_result`).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use io_uring::opcode;

use super::{Ring, Sock};

/// Room for the peer's address (`struct sockaddr_storage`) and its length after it.
const ADDR_ROOM: usize = 128;
const ADDR_BUF: usize = ADDR_ROOM + 4;

/// A TCP connection as a worker got it, before it becomes a [`Leg`](super::Leg).
pub enum Incoming {
    /// A tokio stream (accepted by tokio's listener, or dialed): [`Leg::new`](super::Leg::new)
    /// moves it onto the ring where the worker runs one.
    Tokio(tokio::net::TcpStream),
    /// From the ring's accept: a descriptor of its own, which the leg moves onto the ring
    /// without registering it with the runtime's epoll.
    Ring(TcpStream, Arc<Ring>),
}

impl Incoming {
    /// Disables Nagle's algorithm on the connection.
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Incoming::Tokio(s) => s.set_nodelay(true),
            Incoming::Ring(s, _) => s.set_nodelay(true),
        }
    }
}

impl AsFd for Incoming {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Incoming::Tokio(s) => s.as_fd(),
            Incoming::Ring(s, _) => s.as_fd(),
        }
    }
}

/// A worker's listening socket, on the worker's back end.
pub enum Listener {
    /// tokio's (epoll readiness).
    Epoll(tokio::net::TcpListener),
    /// The ring's: one `IORING_OP_ACCEPT` in flight at most.
    Uring(UringListener),
}

impl Listener {
    /// `listener` on this thread's back end (the ring where the worker runs one).
    pub fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
        match super::current() {
            Some(ring) => Ok(Listener::Uring(UringListener::new(listener, ring)?)),
            None => Ok(Listener::Epoll(tokio::net::TcpListener::from_std(
                listener,
            )?)),
        }
    }

    /// The next connection and its peer's address. Cancel-safe: a connection the kernel took
    /// for a dropped call is returned by the next one.
    pub async fn accept(&mut self) -> io::Result<(Incoming, SocketAddr)> {
        match self {
            Listener::Epoll(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Incoming::Tokio(s), peer))
            }
            Listener::Uring(l) => {
                let (s, peer) = std::future::poll_fn(|cx| l.poll_accept(cx)).await?;
                Ok((Incoming::Ring(s, l.ring.clone()), peer))
            }
        }
    }
}

/// A listening socket whose connections come through the ring.
pub struct UringListener {
    sock: Sock,
    ring: Arc<Ring>,
    /// The accept in flight.
    op: Option<usize>,
}

impl UringListener {
    /// Puts `listener` on `ring`. The socket goes back to blocking mode, as a leg's does: the
    /// ring tries each accept without blocking and then waits for a connection on its own.
    pub fn new(listener: std::net::TcpListener, ring: Arc<Ring>) -> io::Result<UringListener> {
        listener.set_nonblocking(false)?;
        Ok(UringListener {
            sock: Sock::Listener(Arc::new(listener)),
            ring,
            op: None,
        })
    }

    /// The next connection, once the kernel accepted one.
    pub fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        let id = match self.op {
            Some(id) => id,
            None => {
                let (fd, flags) = self.sock.target();
                let mut buf = vec![0u8; ADDR_BUF];
                buf[ADDR_ROOM..].copy_from_slice(&(ADDR_ROOM as u32).to_ne_bytes());
                let id = self.ring.start(&self.sock, buf, |b| {
                    let (addr, len) = b.split_at_mut(ADDR_ROOM);
                    opcode::Accept::new(fd, addr.as_mut_ptr().cast(), len.as_mut_ptr().cast())
                        .flags(nix::libc::SOCK_CLOEXEC)
                        .build()
                        .flags(flags)
                })?;
                self.op = Some(id);
                id
            }
        };
        let (res, buf) = ready!(self.ring.poll_op(id, cx));
        self.op = None;
        if res < 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
        }
        // SAFETY: the accept's result is a descriptor the kernel made for this completion and
        // handed to nobody else; the stream owns it from here on
        let stream = unsafe { TcpStream::from_raw_fd(res) };
        let peer = match peer_addr(&buf) {
            Some(a) => a,
            None => stream.peer_addr()?,
        };
        Poll::Ready(Ok((stream, peer)))
    }
}

impl Drop for UringListener {
    fn drop(&mut self) {
        if let Some(id) = self.op.take() {
            // the accept holds the socket open until it completes: shut it down so that it
            // completes now and no connection goes to a listener nobody serves
            self.ring.shut(&self.sock, std::net::Shutdown::Read);
            self.ring.forget(id);
        }
    }
}

/// The peer's address the kernel wrote for an accept: `sockaddr_storage`, then its length.
fn peer_addr(buf: &[u8]) -> Option<SocketAddr> {
    let len = u32::from_ne_bytes(buf.get(ADDR_ROOM..ADDR_BUF)?.try_into().ok()?) as usize;
    let a = buf.get(..len.min(ADDR_ROOM))?;
    let family = i32::from(u16::from_ne_bytes(a.get(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(a.get(2..4)?.try_into().ok()?);
    match family {
        nix::libc::AF_INET => {
            let ip: [u8; 4] = a.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        nix::libc::AF_INET6 => {
            // as std and mio read `sin6_flowinfo`: the field's bytes as they are
            let flow = u32::from_ne_bytes(a.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = a.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(a.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::stream::tests::{ring, runtime};
    use crate::uring::Leg;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener on the ring on a loopback port, with an accept in flight that found no
    /// connection yet (the call that started it gave up waiting), and its address.
    async fn listener_with_an_accept_waiting(ring: &Arc<Ring>) -> (Listener, SocketAddr) {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = std_listener.local_addr().expect("addr");
        let mut l =
            Listener::Uring(UringListener::new(std_listener, ring.clone()).expect("listener"));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), l.accept()).await;
        assert!(waited.is_err(), "no connection yet");
        assert_eq!(ring.in_flight(), 1, "the accept stays in flight");
        (l, addr)
    }

    /// Connections to a listener on the ring come with their peer's address (IPv4 and IPv6),
    /// and bytes cross the leg made of each both ways.
    #[test]
    fn connections_come_through_the_ring_with_their_peer() {
        runtime().block_on(async {
            let ring = ring();
            for bind in ["127.0.0.1:0", "[::1]:0"] {
                let Ok(std_listener) = std::net::TcpListener::bind(bind) else {
                    // a machine without IPv6 on loopback
                    continue;
                };
                let addr = std_listener.local_addr().expect("addr");
                let mut l = Listener::Uring(
                    UringListener::new(std_listener, ring.clone()).expect("listener"),
                );
                for round in 0..3u8 {
                    let (c, a) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
                    let mut c = c.expect("connect");
                    let (incoming, peer) = a.expect("accept");
                    assert_eq!(peer, c.local_addr().expect("client addr"), "{bind}");
                    assert!(matches!(incoming, Incoming::Ring(..)));
                    // the leg takes it as it is: in blocking mode, as the ring's operations
                    // need (the accept asks for no `SOCK_NONBLOCK`)
                    let flags = nix::fcntl::fcntl(&incoming, nix::fcntl::FcntlArg::F_GETFL)
                        .expect("F_GETFL");
                    assert_eq!(flags & nix::libc::O_NONBLOCK, 0, "{bind}");
                    let mut leg = Leg::accepted(incoming).expect("leg");
                    assert!(matches!(leg, Leg::Uring(_)));
                    c.write_all(&[round; 3]).await.expect("write");
                    let mut b = [0u8; 3];
                    leg.read_exact(&mut b).await.expect("read");
                    assert_eq!(b, [round; 3]);
                    leg.write_all(b"ok").await.expect("write");
                    leg.flush().await.expect("flush");
                    let mut b = [0u8; 2];
                    c.read_exact(&mut b).await.expect("read");
                    assert_eq!(&b, b"ok");
                }
            }
        });
    }

    /// An accept dropped before a connection came stays in flight, and the next call returns
    /// the connection it took: none is lost to a `select!` that picked another branch.
    #[test]
    fn a_dropped_accept_loses_no_connection() {
        runtime().block_on(async {
            let ring = ring();
            let (mut l, addr) = listener_with_an_accept_waiting(&ring).await;
            let c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (_, peer) = tokio::time::timeout(std::time::Duration::from_secs(5), l.accept())
                .await
                .expect("the connection taken meanwhile comes")
                .expect("accept");
            assert_eq!(peer, c.local_addr().expect("client addr"));
            assert_eq!(ring.in_flight(), 0);
        });
    }

    /// A listener dropped with an accept in flight stops listening at once: its accept ends
    /// and is freed, and a client is refused rather than taken by a listener nobody serves.
    #[test]
    fn a_dropped_listener_stops_listening_at_once() {
        runtime().block_on(async {
            let ring = ring();
            let (l, addr) = listener_with_an_accept_waiting(&ring).await;
            drop(l);
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while ring.in_flight() > 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the accept ended and was freed");
            let refused = tokio::net::TcpStream::connect(addr).await;
            assert_eq!(
                refused.map(|_| ()).map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionRefused),
                "nobody listens any more"
            );
        });
    }

    /// An address of a family other than IPv4 and IPv6, or cut short, reads as none (the
    /// stream's `peer_addr` is asked instead). The kernel's own, for both families, are read in
    /// `connections_come_through_the_ring_with_their_peer`.
    #[test]
    fn unknown_or_short_addresses_read_as_none() {
        assert_eq!(peer_addr(&[0u8; ADDR_BUF]), None, "an unknown family");
        let mut short = vec![0u8; ADDR_BUF];
        short[..2].copy_from_slice(&(nix::libc::AF_INET6 as u16).to_ne_bytes());
        short[ADDR_ROOM..].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(peer_addr(&short), None, "an IPv6 address cut at 8 bytes");
    }
}
