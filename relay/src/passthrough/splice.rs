//! The zero-copy data path of a pass-through connection: splice(2) from one socket into a pipe
//! and from the pipe into the other socket, so the payload never enters psm's memory. Driven by
//! the readiness of the two sockets on the worker's runtime; no `unsafe` here (nix wraps the
//! calls).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

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
    from: &TcpStream,
    to: &TcpStream,
    moved: &(dyn Fn(usize) + Sync),
) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so EAGAIN means the socket has nothing to read.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe.w.as_fd(), None, CHUNK, flags()).map_err(errno)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        // The pipe holds `n` bytes: EAGAIN now means the peer's socket buffer is full.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_fd(), None, to.as_fd(), None, left, flags()).map_err(errno)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    left -= m;
                    total += m as u64;
                    moved(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn splices_every_byte_and_half_closes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test io");
        let addr = l.local_addr().expect("test io");
        // client -> [a | b] -> sink: psm's side holds a (accepted) and b (dialled)
        let mut client = TcpStream::connect(addr).await.expect("test io");
        let (a, _) = l.accept().await.expect("test io");
        let sink_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test io");
        let b = TcpStream::connect(sink_l.local_addr().expect("test io"))
            .await
            .expect("test io");
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
    }
}
