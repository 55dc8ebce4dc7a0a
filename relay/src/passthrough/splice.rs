//! The zero-copy data path of a pass-through connection: splice(2) from one socket into a pipe
//! and from the pipe into the other socket, so the payload never enters psm's memory. Each
//! splice is tried without blocking; when a socket has nothing to read (or no room), the worker
//! waits for it on its back end: one `IORING_OP_POLL_ADD` on its ring
//! ([`Polled`]), or the runtime's epoll on the fallback. No `unsafe` here
//! (nix wraps the calls).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;

use crate::uring::{Incoming, Polled, Wait};

/// A pass-through connection's socket, on its worker's back end.
pub enum Socket {
    /// Readiness from the runtime's epoll.
    Epoll(tokio::net::TcpStream),
    /// Readiness from the worker's ring: never registered with the runtime's epoll.
    Uring(Polled),
}

impl Socket {
    /// A connection a psm port accepted.
    pub fn accepted(incoming: Incoming) -> io::Result<Socket> {
        match incoming {
            Incoming::Tokio(tcp) => Socket::dialled(tcp),
            Incoming::Ring(tcp, ring) => Ok(Socket::Uring(Polled::new(tcp, ring)?)),
        }
    }

    /// A connection psm dialled (tokio's connect), moved onto the ring where the worker runs
    /// one.
    pub fn dialled(tcp: tokio::net::TcpStream) -> io::Result<Socket> {
        match crate::uring::current() {
            Some(ring) => Ok(Socket::Uring(Polled::new(tcp.into_std()?, ring)?)),
            None => Ok(Socket::Epoll(tcp)),
        }
    }

    /// Disables Nagle's algorithm.
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Socket::Epoll(s) => s.set_nodelay(true),
            Socket::Uring(p) => p.tcp().set_nodelay(true),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Epoll(s) => s.as_fd(),
            Socket::Uring(p) => p.tcp().as_fd(),
        }
    }

    /// Runs `op` (a non-blocking splice on this socket) until it does not answer `EAGAIN`,
    /// waiting for `wait` in between.
    async fn io(
        &self,
        wait: Wait,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        match self {
            Socket::Epoll(s) => {
                let interest = match wait {
                    Wait::Readable => Interest::READABLE,
                    Wait::Writable => Interest::WRITABLE,
                };
                loop {
                    s.ready(interest).await?;
                    match s.try_io(interest, || op(s.as_fd())) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => return r,
                    }
                }
            }
            Socket::Uring(p) => loop {
                match op(p.tcp().as_fd()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => p.ready(wait).await?,
                    r => return r,
                }
            },
        }
    }
}

/// Most bytes moved by one splice call (and the pipe's size where the kernel allows it).
const CHUNK: usize = 1 << 20;

/// One direction's pipe: the kernel buffer the bytes pass through.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // 1 MiB where /proc/sys/fs/pipe-max-size allows it; the default 64 KiB otherwise
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        Ok(Pipe { r, w })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

fn errno(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// Moves everything `from` sends into `to` until `from` ends (then half-closes `to`), telling
/// `moved` the size of each chunk as it is delivered. Returns the total.
pub async fn one_way(
    from: &Socket,
    to: &Socket,
    moved: &(dyn Fn(usize) + Sync),
) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so EAGAIN means the socket has nothing to read.
        let n = from
            .io(Wait::Readable, |fd| {
                splice(fd, None, pipe.w.as_fd(), None, CHUNK, flags()).map_err(errno)
            })
            .await?;
        if n == 0 {
            let _ = socket2::SockRef::from(&to.fd()).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        // The pipe holds `n` bytes: EAGAIN now means the peer's socket buffer is full.
        let mut left = n;
        while left > 0 {
            let m = to
                .io(Wait::Writable, |fd| {
                    splice(pipe.r.as_fd(), None, fd, None, left, flags()).map_err(errno)
                })
                .await?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= m;
            total += m as u64;
            moved(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// 5 MB from a client through psm's two sockets to a sink, on a worker's runtime with a
    /// ring (`ring`) or without (the epoll fallback).
    fn splices_every_byte_and_half_closes(ring: bool) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::uring::before_park)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ring = ring.then(|| {
                let r = crate::uring::Ring::new().expect("io_uring is not allowed on this machine");
                tokio::spawn(r.clone().drive());
                crate::uring::install(r.clone());
                r
            });
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("test io");
            let addr = l.local_addr().expect("test io");
            // client -> [a | b] -> sink: psm's side holds a (accepted) and b (dialled)
            let mut client = TcpStream::connect(addr).await.expect("test io");
            let (a, _) = l.accept().await.expect("test io");
            let a = match &ring {
                Some(r) => Incoming::Ring(a.into_std().expect("test io"), r.clone()),
                None => Incoming::Tokio(a),
            };
            let a = Socket::accepted(a).expect("accepted");
            let sink_l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("test io");
            let b = TcpStream::connect(sink_l.local_addr().expect("test io"))
                .await
                .expect("test io");
            let b = Socket::dialled(b).expect("dialled");
            assert_eq!(matches!(a, Socket::Uring(_)), ring.is_some());
            assert_eq!(matches!(b, Socket::Uring(_)), ring.is_some());
            let (mut sink, _) = sink_l.accept().await.expect("test io");
            let moved = AtomicU64::new(0);
            let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&sent).await.expect("test io");
                client.shutdown().await.expect("test io");
                client
            });
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                sink.read_to_end(&mut got).await.expect("test io");
                got
            });
            let total = one_way(&a, &b, &|n| {
                moved.fetch_add(n as u64, Ordering::Relaxed);
            })
            .await
            .expect("test io");
            assert_eq!(total, data.len() as u64);
            assert_eq!(moved.load(Ordering::Relaxed), data.len() as u64);
            // the sink saw the end (half-close forwarded) and every byte in order
            assert!(reader.await.expect("test io") == data);
            writer.await.expect("test io");
            if let Some(r) = ring {
                // every wait on the ring completed
                assert_eq!(r.in_flight(), 0);
            }
        });
    }

    #[test]
    fn splices_every_byte_and_half_closes_waiting_on_the_ring() {
        splices_every_byte_and_half_closes(true);
    }

    #[test]
    fn splices_every_byte_and_half_closes_waiting_on_epoll() {
        splices_every_byte_and_half_closes(false);
    }
}
