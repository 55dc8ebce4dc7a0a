//! `psm-perf bench-target`: the light SSH target of `psm-perf bench`. A stock sshd forks a
//! process per connection and execs a shell per command, which bounds session setup long before
//! psm does; this target serves every connection in one process on a multi-thread runtime, with
//! a few built-in commands and no shell:
//!
//! * `sink`: reads everything, answers exit status 0 at EOF;
//! * `source N`: writes N zero bytes, then exit status 0;
//! * `echo` (and a shell request): sends back what it reads, until EOF (latency probes: an
//!   echo that waits on its own writes would stall a saturated channel);
//! * `true`: exit status 0 at once.
//!
//! It accepts one user key (public-key authentication only) and also runs the plain TCP sink of
//! the pass-through workload. Not a production server: bench use only.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Serves SSH on `listen` and the TCP sink on `tcp_sink` until killed; prints
/// `ssh ADDR tcp ADDR` once both listen.
pub fn run(
    listen: SocketAddr,
    tcp_sink: SocketAddr,
    host_key: PrivateKey,
    user_key: PublicKey,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    rt.block_on(async move {
        let ssh = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let tcp = tokio::net::TcpListener::bind(tcp_sink)
            .await
            .with_context(|| format!("binding {tcp_sink}"))?;
        println!("ssh {} tcp {}", ssh.local_addr()?, tcp.local_addr()?);
        tokio::spawn(sink_loop(tcp));
        let config = Arc::new(russh::server::Config {
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            keys: vec![host_key],
            auth_rejection_time: std::time::Duration::from_millis(10),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            window_size: 8 << 20,
            maximum_packet_size: 65535,
            // the two ciphers the bench compares (russh's server default lacks AES-128-GCM)
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_128_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                    russh::cipher::AES_256_GCM,
                ]),
                ..Default::default()
            },
            nodelay: true,
            ..Default::default()
        });
        let user_key = Arc::new(user_key);
        loop {
            let (stream, _) = ssh.accept().await?;
            // russh applies `nodelay` only to sockets it accepts itself: without it the
            // exit-status, EOF and close of a short command wait 40 ms on Nagle and the
            // client's delayed ACK, which capped the sessions-per-second figure at 22 sequential
            let _ = stream.set_nodelay(true);
            let handler = Target {
                user_key: user_key.clone(),
                channels: Default::default(),
            };
            let config = config.clone();
            tokio::spawn(async move {
                if let Ok(running) = russh::server::run_stream(config, stream, handler).await {
                    let _ = running.await;
                }
            });
        }
    })
}

/// Accepts plain TCP connections and discards what they send.
async fn sink_loop(l: tokio::net::TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

struct Target {
    user_key: Arc<PublicKey>,
    channels: std::collections::HashMap<ChannelId, Channel<Msg>>,
}

impl Target {
    fn start(&mut self, id: ChannelId, command: &str) -> bool {
        let Some(ch) = self.channels.remove(&id) else {
            return false;
        };
        let mut words = command.split_whitespace();
        let job = match (words.next(), words.next()) {
            (Some("sink"), None) => Job::Sink,
            (Some("echo"), None) => Job::Echo,
            (Some("true"), None) => Job::True,
            (Some("source"), Some(n)) => match n.parse::<u64>() {
                Ok(n) => Job::Source(n),
                Err(_) => return false,
            },
            _ => return false,
        };
        tokio::spawn(job.run(ch));
        true
    }
}

enum Job {
    Sink,
    Echo,
    True,
    Source(u64),
}

async fn write_zeros(w: &mut (impl tokio::io::AsyncWrite + Unpin), n: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = zeros.len().min(left as usize);
        w.write_all(&zeros[..k]).await?;
        left -= k as u64;
    }
    w.flush().await
}

impl Job {
    async fn run(self, mut ch: Channel<Msg>) {
        match self {
            Job::True => {}
            Job::Source(n) => {
                if write_zeros(&mut ch.make_writer(), n).await.is_err() {
                    return;
                }
            }
            Job::Sink | Job::Echo => loop {
                match ch.wait().await {
                    Some(ChannelMsg::Data { data }) => {
                        if matches!(self, Job::Echo) && ch.data_bytes(data).await.is_err() {
                            return;
                        }
                    }
                    Some(ChannelMsg::Eof) => break,
                    None | Some(ChannelMsg::Close) => return,
                    Some(_) => {}
                }
            },
        }
        let _ = ch.exit_status(0).await;
        let _ = ch.eof().await;
        let _ = ch.close().await;
    }
}

impl russh::server::Handler for Target {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.verdict(offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.verdict(key.public_key))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        if self.start(channel, &command) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.start(channel, "echo") {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
}

impl Target {
    fn verdict(&self, key: &PublicKey) -> Auth {
        if key.key_data() == self.user_key.key_data() {
            Auth::Accept
        } else {
            Auth::Reject {
                proceed_with_methods: None,
                partial_success: false,
            }
        }
    }
}
