//! The load client of `psm-perf bench`: russh sessions to a route (direct, through psm, or
//! through an OpenSSH jump host) running the light target's commands.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::{Channel, ChannelMsg};
use tokio::io::AsyncWriteExt as _;

/// Every step of a workload gets at most this long.
pub const STEP: Duration = Duration::from_secs(120);

/// Where a session goes: `user@addr`, optionally through a jump host (`-J`).
#[derive(Clone, Debug)]
pub struct Dest {
    /// The SSH server to log in to (the target, or psm).
    pub addr: SocketAddr,
    /// The login (`bench`, or `alice@bench@bench` for psm).
    pub user: String,
    /// A jump host: its address and login; the session is tunnelled through its
    /// `direct-tcpip` channel to `addr`.
    pub jump: Option<(SocketAddr, String)>,
}

/// The client side of russh; the bench talks only to its own processes, so any host key is
/// accepted.
pub struct Bench;

impl client::Handler for Bench {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A russh client configuration preferring `cipher`.
pub fn config(cipher: russh::cipher::Name) -> Arc<client::Config> {
    let ciphers: &'static [russh::cipher::Name] = if cipher == russh::cipher::CHACHA20_POLY1305 {
        &[russh::cipher::CHACHA20_POLY1305]
    } else {
        &[russh::cipher::AES_128_GCM]
    };
    Arc::new(client::Config {
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(ciphers),
            ..Default::default()
        },
        window_size: 8 << 20,
        nodelay: true,
        ..Default::default()
    })
}

async fn auth(h: &mut Handle<Bench>, user: &str, key: &Arc<PrivateKey>) -> anyhow::Result<()> {
    let ok = h
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), None))
        .await
        .context("authenticating")?;
    if !ok.success() {
        bail!("{user}: public key refused");
    }
    Ok(())
}

/// Tunnelled handshakes that stalled and were tried again (see [`connect`]).
pub static JUMP_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A logged-in session to `d`. Through a jump host, a handshake over the tunnel that has not
/// finished within 10 s is abandoned and tried again on a new jump connection (at most 3
/// tries, counted in [`JUMP_RETRIES`]): under concurrent logins one occasionally stalls
/// between russh's client and OpenSSH's `direct-tcpip`, which is not what is measured.
pub async fn connect(
    d: &Dest,
    key: &Arc<PrivateKey>,
    cfg: &Arc<client::Config>,
) -> anyhow::Result<Conn> {
    let Some((jump, jump_user)) = &d.jump else {
        let tcp = tokio::net::TcpStream::connect(d.addr)
            .await
            .with_context(|| format!("connecting to {}", d.addr))?;
        tcp.set_nodelay(true)?;
        let mut h = client::connect_stream(cfg.clone(), tcp, Bench)
            .await
            .with_context(|| format!("ssh handshake with {}", d.addr))?;
        auth(&mut h, &d.user, key).await?;
        return Ok(Conn { h, _jump: None });
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let tcp = tokio::net::TcpStream::connect(jump)
            .await
            .with_context(|| format!("connecting to the jump host {jump}"))?;
        tcp.set_nodelay(true)?;
        let mut j = client::connect_stream(cfg.clone(), tcp, Bench)
            .await
            .context("ssh handshake with the jump host")?;
        auth(&mut j, jump_user, key).await?;
        let ch = j
            .channel_open_direct_tcpip(
                d.addr.ip().to_string(),
                d.addr.port().into(),
                "127.0.0.1",
                0,
            )
            .await
            .context("direct-tcpip through the jump host")?;
        let inner = async {
            let mut h = client::connect_stream(cfg.clone(), ch.into_stream(), Bench)
                .await
                .context("ssh handshake through the jump host")?;
            auth(&mut h, &d.user, key).await?;
            anyhow::Ok(h)
        };
        match tokio::time::timeout(Duration::from_secs(10), inner).await {
            Ok(h) => {
                return Ok(Conn {
                    h: h?,
                    _jump: Some(j),
                })
            }
            Err(_) if tries < 3 => {
                JUMP_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => bail!("the handshake through the jump host stalled {tries} times"),
        }
    }
}

/// A logged-in session, with the jump host's session its tunnel runs through (if any): both
/// end when it is dropped.
pub struct Conn {
    h: Handle<Bench>,
    _jump: Option<Handle<Bench>>,
}

impl std::ops::Deref for Conn {
    type Target = Handle<Bench>;
    fn deref(&self) -> &Handle<Bench> {
        &self.h
    }
}

/// Opens a session channel running `command`, its start confirmed.
pub async fn exec(h: &Handle<Bench>, command: &str) -> anyhow::Result<Channel<client::Msg>> {
    let mut ch = h
        .channel_open_session()
        .await
        .context("opening a channel")?;
    ch.exec(true, command).await?;
    loop {
        match ch.wait().await {
            Some(ChannelMsg::Success) => return Ok(ch),
            Some(ChannelMsg::Failure) | None => bail!("'{command}' refused"),
            Some(_) => {}
        }
    }
}

/// Waits for the channel's exit status (0 expected) and end, counting data bytes on the way.
async fn finish(ch: &mut Channel<client::Msg>) -> anyhow::Result<u64> {
    let mut got = 0u64;
    let mut status = None;
    loop {
        match ch.wait().await {
            Some(ChannelMsg::Data { data }) => got += data.len() as u64,
            Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    match status {
        Some(0) => Ok(got),
        Some(s) => bail!("exit status {s}"),
        None => bail!("the channel ended without an exit status"),
    }
}

async fn write_zeros(ch: &Channel<client::Msg>, n: u64) -> anyhow::Result<()> {
    let zeros = vec![0u8; 256 * 1024];
    let mut w = ch.make_writer();
    let mut left = n;
    while left > 0 {
        let k = zeros.len().min(left as usize);
        w.write_all(&zeros[..k]).await.context("sending")?;
        left -= k as u64;
    }
    w.flush().await?;
    Ok(())
}

/// `n` bytes from the client to the target; seconds taken.
pub async fn upload(h: &Handle<Bench>, n: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut ch = exec(h, "sink").await?;
    write_zeros(&ch, n).await?;
    ch.eof().await?;
    finish(&mut ch).await?;
    Ok(start.elapsed().as_secs_f64())
}

/// `n` bytes from the target to the client; seconds taken.
pub async fn download(h: &Handle<Bench>, n: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut ch = exec(h, &format!("source {n}")).await?;
    let got = finish(&mut ch).await?;
    if got != n {
        bail!("received {got} of {n} bytes");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// `n` bytes each way at once: a `sink` and a `source` on two connections of their own (russh
/// can stall two saturated channels of one connection against each other); seconds taken.
pub async fn both(
    d: &Dest,
    key: &Arc<PrivateKey>,
    cfg: &Arc<client::Config>,
    n: u64,
) -> anyhow::Result<f64> {
    let (a, b) = tokio::try_join!(connect(d, key, cfg), connect(d, key, cfg))?;
    let start = Instant::now();
    let (up, down) = tokio::join!(upload(&a, n), download(&b, n));
    up?;
    down?;
    Ok(start.elapsed().as_secs_f64())
}

/// An echo channel for latency probes.
pub struct Echo(Channel<client::Msg>);

impl Echo {
    /// Opens one on `h`.
    pub async fn open(h: &Handle<Bench>) -> anyhow::Result<Echo> {
        Ok(Echo(exec(h, "echo").await?))
    }

    /// One byte there and back; the round trip.
    pub async fn probe(&mut self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        self.0.data_bytes(bytes::Bytes::from_static(b"x")).await?;
        loop {
            match self.0.wait().await {
                Some(ChannelMsg::Data { .. }) => return Ok(start.elapsed()),
                Some(ChannelMsg::Close) | None => bail!("echo channel closed"),
                Some(_) => {}
            }
        }
    }
}

/// A whole session: connect, log in, run `true`, close. Seconds taken.
pub async fn session(
    d: &Dest,
    key: &Arc<PrivateKey>,
    cfg: &Arc<client::Config>,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let h = connect(d, key, cfg).await?;
    let mut ch = exec(&h, "true").await?;
    finish(&mut ch).await?;
    h.disconnect(russh::Disconnect::ByApplication, "", "en")
        .await?;
    Ok(start.elapsed().as_secs_f64())
}

/// Opens a lease on psm's `tcp` target with a shell channel, waiting for its line; the
/// returned session holds it.
pub async fn lease(
    d: &Dest,
    key: &Arc<PrivateKey>,
    cfg: &Arc<client::Config>,
) -> anyhow::Result<(Conn, Channel<client::Msg>)> {
    let h = connect(d, key, cfg).await?;
    let mut ch = h.channel_open_session().await?;
    ch.request_shell(true).await?;
    loop {
        match ch.wait().await {
            Some(ChannelMsg::Data { data })
                if String::from_utf8_lossy(&data).contains("is open to") =>
            {
                return Ok((h, ch))
            }
            Some(ChannelMsg::Close | ChannelMsg::Eof) | None => bail!("no lease"),
            Some(ChannelMsg::ExtendedData { data, .. }) => {
                bail!("no lease: {}", String::from_utf8_lossy(&data).trim())
            }
            Some(_) => {}
        }
    }
}

/// `n` bytes over plain TCP to `addr`, then its close; seconds taken.
pub async fn tcp_upload(addr: SocketAddr, n: u64) -> anyhow::Result<f64> {
    use tokio::io::AsyncReadExt as _;
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = zeros.len().min(left as usize);
        s.write_all(&zeros[..k]).await?;
        left -= k as u64;
    }
    s.shutdown().await?;
    let mut rest = [0u8; 64];
    while s.read(&mut rest).await? > 0 {}
    Ok(start.elapsed().as_secs_f64())
}
