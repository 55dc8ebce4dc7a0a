//! A sink's connection to its receiver: a connected UDP socket (one message per datagram), or
//! a TCP or TLS stream carrying octet-counted frames.
//!
//! Receivers never talk back, so anything readable on a stream means it is closing: [`Conn::alive`]
//! looks (without waiting) before every message, and [`Conn::closed`] resolves when the receiver
//! goes away while the sink is idle. A message written to a connection that still looked alive
//! counts as delivered: what TCP itself loses when the receiver dies right then cannot be
//! known without application acknowledgements, which syslog does not have.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::config::Transport;
use super::format::octet_counted;

/// How long a connection (TCP handshake and TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one message may take to write before the connection is given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest datagram a UDP sink sends; longer messages are cut.
pub const MAX_DATAGRAM: usize = 65_000;

/// A connection to a receiver.
pub enum Conn {
    /// Connected UDP socket.
    Udp(UdpSocket),
    /// TCP stream.
    Tcp(TcpStream),
    /// TLS stream.
    Tls(Box<TlsStream<TcpStream>>),
}

async fn resolve(address: &str) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(address).await?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{address} resolves to no address"),
        ));
    }
    Ok(addrs)
}

async fn tcp(address: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for a in resolve(address).await? {
        match TcpStream::connect(a).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no address")))
}

impl Conn {
    /// Connects to `address` over `transport` (`tls`: with `tls`, the sink's client config).
    pub async fn connect(
        transport: &Transport,
        address: &str,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> io::Result<Conn> {
        let fut = async {
            match transport {
                Transport::Udp => {
                    let addr = resolve(address).await?[0];
                    let bind: SocketAddr = if addr.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    let sock = UdpSocket::bind(bind).await?;
                    sock.connect(addr).await?;
                    Ok(Conn::Udp(sock))
                }
                Transport::Tcp => Ok(Conn::Tcp(tcp(address).await?)),
                Transport::Tls(files) => {
                    let config = tls.ok_or_else(|| io::Error::other("no TLS configuration"))?;
                    let name = rustls::pki_types::ServerName::try_from(files.server_name.clone())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                    let stream = tcp(address).await?;
                    let tls = TlsConnector::from(config.clone())
                        .connect(name, stream)
                        .await?;
                    Ok(Conn::Tls(Box::new(tls)))
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))?
    }

    /// Whether a stream still looks open: nothing (no EOF, no error) is waiting to be read.
    /// Data a receiver sends anyway is read and ignored.
    pub async fn alive(&mut self) -> bool {
        let mut buf = [0u8; 512];
        for _ in 0..64 {
            let read = match self {
                Conn::Udp(_) => return true,
                Conn::Tcp(s) => tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await,
                Conn::Tls(s) => tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await,
            };
            match read {
                Err(_) => return true, // nothing to read: open
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => continue,
            }
        }
        true
    }

    /// Resolves when the receiver closes the stream (never for UDP). Cancel-safe.
    pub async fn closed(&mut self) {
        let mut buf = [0u8; 512];
        loop {
            let n = match self {
                Conn::Udp(_) => return std::future::pending().await,
                Conn::Tcp(s) => s.read(&mut buf).await,
                Conn::Tls(s) => s.read(&mut buf).await,
            };
            if !matches!(n, Ok(n) if n > 0) {
                return;
            }
        }
    }

    /// Sends one syslog message (framed for streams).
    pub async fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let fut = async {
            match self {
                Conn::Udp(s) => {
                    let msg = &msg[..msg.len().min(MAX_DATAGRAM)];
                    s.send(msg).await.map(|_| ())
                }
                Conn::Tcp(s) => {
                    s.write_all(&octet_counted(msg)).await?;
                    s.flush().await
                }
                Conn::Tls(s) => {
                    s.write_all(&octet_counted(msg)).await?;
                    s.flush().await
                }
            }
        };
        tokio::time::timeout(WRITE_TIMEOUT, fut)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))?
    }

    /// Closes a stream politely (TLS close_notify); bounded.
    pub async fn shutdown(&mut self) {
        let fut = async {
            match self {
                Conn::Udp(_) => Ok(()),
                Conn::Tcp(s) => s.shutdown().await,
                Conn::Tls(s) => s.shutdown().await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), fut).await;
    }
}
