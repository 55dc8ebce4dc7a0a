//! The target leg: an SSH client connection to the target, with the pinned host key checked and
//! the vaulted credential injected. Keepalives find a target that stopped answering; how the
//! connection was lost is reported as a [`TargetLoss`] so the session ends with the true reason.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use psm_control_api::{Account, Credential, Target};
use russh::client;
use russh::keys::PublicKeyOrCertificate;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::cut::{Cuttable, Cutter};
use crate::end::TargetLoss;
use crate::notices::Notices;

/// Keepalives toward targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetKeepalive {
    /// Silence after which a keepalive is sent.
    pub interval: Duration,
    /// Unanswered keepalives after which the target is given up.
    pub max: usize,
}

impl Default for TargetKeepalive {
    /// 15 s, 3 misses.
    fn default() -> Self {
        TargetKeepalive {
            interval: Duration::from_secs(15),
            max: 3,
        }
    }
}

/// Tells how a target connection was lost, once it is.
pub type LossWatch = watch::Receiver<Option<TargetLoss>>;

/// What a russh client error says about how the target was lost.
pub fn classify(e: &russh::Error) -> TargetLoss {
    use std::io::ErrorKind;
    match e {
        russh::Error::KeepaliveTimeout | russh::Error::InactivityTimeout => {
            TargetLoss::Unresponsive
        }
        russh::Error::IO(io) => match io.kind() {
            // cut by psm when its writes stalled (`Cutter::cut_stalled`)
            ErrorKind::TimedOut => TargetLoss::Unresponsive,
            ErrorKind::ConnectionReset => TargetLoss::Closed("connection reset".into()),
            ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => TargetLoss::Closed(String::new()),
            _ => TargetLoss::Closed(io.to_string()),
        },
        russh::Error::Disconnect | russh::Error::HUP => TargetLoss::Closed(String::new()),
        other => TargetLoss::Violation(other.to_string()),
    }
}

/// How long connecting and logging in to a target may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the target leg could not be set up. `Display` is the full reason for the audit log;
/// [`UpstreamError::client_message`] is the one line the user sees.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The pinned host key in policy does not parse.
    #[error("pinned host key of target '{target}' is invalid: {reason}")]
    BadPin {
        /// Target name.
        target: String,
        /// Parse error.
        reason: String,
    },
    /// TCP connection failed or timed out.
    #[error("target '{target}' unreachable at {address}: {reason}")]
    Unreachable {
        /// Target name.
        target: String,
        /// Address tried.
        address: String,
        /// Why.
        reason: String,
    },
    /// The target presented another host key than the pinned one.
    #[error("host key mismatch for target '{target}': pinned {expected}, presented {presented}")]
    HostKeyMismatch {
        /// Target name.
        target: String,
        /// Pinned fingerprint.
        expected: String,
        /// Presented fingerprint.
        presented: String,
    },
    /// The SSH handshake failed for another reason.
    #[error("ssh handshake with target '{target}' failed: {reason}")]
    Handshake {
        /// Target name.
        target: String,
        /// Why.
        reason: String,
    },
    /// The target did not accept the vaulted credential.
    #[error("target '{target}' refused the vaulted {kind} credential for account '{account}'")]
    CredentialRefused {
        /// Target name.
        target: String,
        /// Account name.
        account: String,
        /// `password` or `private key`.
        kind: &'static str,
    },
    /// The vaulted private key does not parse.
    #[error("vaulted private key for {account}@{target} is unusable: {reason}")]
    BadCredential {
        /// Target name.
        target: String,
        /// Account name.
        account: String,
        /// Why (never the key itself).
        reason: String,
    },
    /// Opening the session channel on the target failed.
    #[error("target '{target}' refused to open a session channel: {reason}")]
    ChannelRefused {
        /// Target name.
        target: String,
        /// Why.
        reason: String,
    },
}

impl UpstreamError {
    /// A stable short code for the audit log's `reason_code`.
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::BadPin { .. } => "bad_host_key_pin",
            UpstreamError::Unreachable { .. } => "target_unreachable",
            UpstreamError::HostKeyMismatch { .. } => "host_key_mismatch",
            UpstreamError::Handshake { .. } => "target_handshake_failed",
            UpstreamError::CredentialRefused { .. } => "credential_refused",
            UpstreamError::BadCredential { .. } => "bad_credential",
            UpstreamError::ChannelRefused { .. } => "target_channel_refused",
        }
    }

    /// The single line shown to the user: never a secret.
    pub fn client_message(&self) -> String {
        match self {
            UpstreamError::BadPin { target, .. } | UpstreamError::Handshake { target, .. } => {
                format!("psm: cannot connect to {target}: secure handshake with the target failed")
            }
            UpstreamError::Unreachable { target, .. } => {
                format!("psm: cannot connect to {target}: target unreachable")
            }
            UpstreamError::HostKeyMismatch { target, .. } => format!(
                "psm: cannot connect to {target}: the target's host key does not match the pinned key"
            ),
            UpstreamError::CredentialRefused {
                target, account, ..
            }
            | UpstreamError::BadCredential {
                target, account, ..
            } => format!(
                "psm: cannot log in to {account}@{target}: the target refused the vaulted credential"
            ),
            UpstreamError::ChannelRefused { target, .. } => {
                format!("psm: cannot open a session on {target}")
            }
        }
    }
}

/// A channel the target opens toward psm that psm may have asked for: a connection to a
/// remote forward (`forwarded-tcpip`) or to the user's forwarded agent (`auth-agent`). The
/// relay decides whether it asked (see `session::reverse`); the open is answered through
/// `reply`.
pub enum Reverse {
    /// A connection arrived at a port the target listens on for psm (`ssh -R`).
    Forwarded {
        /// The target's side of the channel.
        channel: russh::Channel<client::Msg>,
        /// Address the target listens on, as requested.
        connected_address: String,
        /// Port the target listens on.
        connected_port: u32,
        /// Who connected (as the target reports it).
        originator_address: String,
        /// Their port.
        originator_port: u32,
        /// Accepts or rejects the target's open.
        reply: client::ChannelOpenHandle,
    },
    /// A program on the target asks the forwarded agent (`ssh -A`).
    Agent {
        /// The target's side of the channel.
        channel: russh::Channel<client::Msg>,
        /// Accepts or rejects the target's open.
        reply: client::ChannelOpenHandle,
    },
}

/// Reverse opens waiting for the relay, per target connection; more are refused.
pub const REVERSE_QUEUE: usize = 16;

/// What psm asked a target connection for, and so what the target may open back over it.
#[derive(Default)]
pub struct Route {
    /// The target accepted the agent request made on this connection.
    agent: AtomicBool,
    /// (address, port) the target listens on for psm over this connection.
    listening: Mutex<Vec<(String, u32)>>,
}

impl Route {
    /// The target accepted an agent request on this connection.
    pub fn allow_agent(&self) {
        self.agent.store(true, Ordering::Release);
    }

    /// The target listens on `address:port` for psm over this connection.
    pub fn listen(&self, address: &str, port: u32) {
        if let Ok(mut l) = self.listening.lock() {
            l.push((address.to_string(), port));
        }
    }

    /// Whether psm asked for this open.
    pub fn asked(&self, open: &Reverse) -> bool {
        match open {
            Reverse::Agent { .. } => self.agent.load(Ordering::Acquire),
            Reverse::Forwarded {
                connected_address,
                connected_port,
                ..
            } => self
                .listening
                .lock()
                .map(|l| {
                    l.iter()
                        .any(|(a, p)| a == connected_address && p == connected_port)
                })
                .unwrap_or(false),
        }
    }
}

/// Client-side handler for the target connection: checks the pinned host key and reports how
/// the connection ended.
pub struct TargetHandler {
    pinned: PublicKey,
    presented: Arc<Mutex<Option<String>>>,
    loss: watch::Sender<Option<TargetLoss>>,
    notices: Arc<Notices>,
    /// What psm asked this connection for, and where the opens it asked for go (none: refused
    /// like every other kind).
    reverse: Option<(Arc<Route>, mpsc::Sender<Reverse>)>,
}

impl TargetHandler {
    /// A target opened a channel psm never asked for: refused, and noted once per kind.
    async fn unasked(&self, kind: &'static str, reply: client::ChannelOpenHandle) {
        unasked(&self.notices, kind, reply).await;
    }

    /// Hands a reverse open psm asked for to the relay; refused when psm did not ask for it or
    /// the relay has too many waiting.
    async fn route(&self, kind: &'static str, open: Reverse) {
        let Some((_, tx)) = self.reverse.as_ref().filter(|(r, _)| r.asked(&open)) else {
            let (Reverse::Forwarded { reply, .. } | Reverse::Agent { reply, .. }) = open;
            return self.unasked(kind, reply).await;
        };
        match tx.try_send(open) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(open)) => {
                let (Reverse::Forwarded { reply, .. } | Reverse::Agent { reply, .. }) = open;
                reply
                    .reject(russh::ChannelOpenFailure::ResourceShortage)
                    .await;
                self.notices.note("reverse channel flood", kind, || {
                    format!("the target opened {kind} channels faster than psm could relay them; refused")
                });
            }
            Err(mpsc::error::TrySendError::Closed(open)) => {
                let (Reverse::Forwarded { reply, .. } | Reverse::Agent { reply, .. }) = open;
                self.unasked(kind, reply).await;
            }
        }
    }
}

/// Refuses a channel the target opened that psm never asked for, noted once per kind.
pub async fn unasked(notices: &Notices, kind: &'static str, reply: client::ChannelOpenHandle) {
    reply
        .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
        .await;
    notices.note(kind, "", || {
        format!("the target opened an unrequested {kind} channel; refused")
    });
}

/// The kinds of channel a target may try to open toward psm; all are refused unless psm asked
/// for them (a remote forward it requested, an agent the user forwarded).
pub const UNASKED_CHANNEL_KINDS: [&str; 7] = [
    "session",
    "direct-tcpip",
    "forwarded-tcpip",
    "x11",
    "auth-agent",
    "direct-streamlocal",
    "forwarded-streamlocal",
];

impl client::Handler for TargetHandler {
    type Error = russh::Error;

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.unasked("session", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.unasked("direct-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let open = Reverse::Forwarded {
            channel,
            connected_address: connected_address.to_string(),
            connected_port,
            originator_address: originator_address.to_string(),
            originator_port,
            reply,
        };
        self.route("forwarded-tcpip", open).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.unasked("x11", reply).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.route("auth-agent", Reverse::Agent { channel, reply })
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.unasked("direct-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.unasked("forwarded-streamlocal", reply).await;
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let (loss, result) = match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => (
                TargetLoss::Closed(crate::escape_short(&info.message)),
                Ok(()),
            ),
            client::DisconnectReason::Error(e) => (classify(&e), Err(e)),
        };
        self.loss.send_if_modified(|l| {
            if l.is_none() {
                *l = Some(loss);
                true
            } else {
                false
            }
        });
        result
    }

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            if let Ok(mut p) = self.presented.lock() {
                *p = Some("a certificate".into());
            }
            return Ok(false);
        };
        if key.key_data() == self.pinned.key_data() {
            return Ok(true);
        }
        if let Ok(mut p) = self.presented.lock() {
            *p = Some(format!(
                "{} {}",
                key.algorithm(),
                key.fingerprint(HashAlg::Sha256)
            ));
        }
        Ok(false)
    }
}

/// A logged-in connection to a target, with the means to cut its socket when its SSH task does
/// not close it (a target that stopped reading never takes the DISCONNECT).
pub struct TargetHandle {
    handle: client::Handle<TargetHandler>,
    cutter: Cutter,
}

impl std::ops::Deref for TargetHandle {
    type Target = client::Handle<TargetHandler>;
    fn deref(&self) -> &Self::Target {
        &self.handle
    }
}

/// How long a target gets to take psm's DISCONNECT before its socket is cut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

impl TargetHandle {
    /// Ends the connection: a DISCONNECT when the SSH task gets it out within [`CLOSE_GRACE`],
    /// and the socket cut after that whatever the task did, so that the target side of a session
    /// never outlives it.
    pub async fn close(&self) {
        if !self.handle.is_closed() {
            let _ = tokio::time::timeout(
                CLOSE_GRACE,
                self.handle
                    .disconnect(russh::Disconnect::ByApplication, "", "en"),
            )
            .await;
        }
        let cutter = self.cutter.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            cutter.cut();
        });
    }
}

/// Cuts a half-made connection when the login is given up (an error, a timeout), so that its
/// SSH task does not live on.
struct CutUnlessKept(Option<Cutter>);

impl Drop for CutUnlessKept {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cut();
        }
    }
}

/// How long connecting, verifying and logging in may take altogether.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to `target`, verifies its host key against the pinned one and logs in as `account`
/// with the vaulted credential; gives up after [`LOGIN_TIMEOUT`]. The [`LossWatch`] tells how
/// the connection was lost, once it is. Channels the target opens toward psm go to `reverse`
/// when there is one (the relay decides whether it asked for them), and are refused otherwise.
pub async fn connect(
    target: &Target,
    account: &Account,
    keepalive: TargetKeepalive,
    notices: Arc<Notices>,
    reverse: Option<(Arc<Route>, mpsc::Sender<Reverse>)>,
) -> Result<(TargetHandle, LossWatch), UpstreamError> {
    match tokio::time::timeout(
        LOGIN_TIMEOUT,
        connect_inner(target, account, keepalive, notices, reverse),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Unreachable {
            target: target.name.clone(),
            address: target.address.clone(),
            reason: format!("no login within {LOGIN_TIMEOUT:?}"),
        }),
    }
}

async fn connect_inner(
    target: &Target,
    account: &Account,
    keepalive: TargetKeepalive,
    notices: Arc<Notices>,
    reverse: Option<(Arc<Route>, mpsc::Sender<Reverse>)>,
) -> Result<(TargetHandle, LossWatch), UpstreamError> {
    let pinned = PublicKey::from_openssh(&target.host_key).map_err(|e| UpstreamError::BadPin {
        target: target.name.clone(),
        reason: e.to_string(),
    })?;
    let unreachable = |reason: String| UpstreamError::Unreachable {
        target: target.name.clone(),
        address: target.address.clone(),
        reason,
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(&target.address),
    )
    .await
    .map_err(|_| unreachable("connection timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let tcp = crate::uring::Leg::new(tcp).map_err(|e| unreachable(e.to_string()))?;
    let (mut tcp, cutter) = Cuttable::socket(tcp);
    let progress = tcp.progress();
    tcp.get_mut().report_progress(progress);
    // a target that stops reading its socket blocks the SSH task in a write, where its
    // keepalives never run: cut it after as long as they would have taken
    let keepalives = u32::try_from(keepalive.max)
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    cutter.watch_writes(keepalive.interval.saturating_mul(keepalives));
    let mut half_made = CutUnlessKept(Some(cutter.clone()));

    let key_algs: Vec<Algorithm> = match pinned.algorithm() {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ],
        other => vec![other],
    };
    let config = client::Config {
        preferred: russh::Preferred {
            key: Cow::Owned(key_algs),
            cipher: Cow::Borrowed(crate::CIPHERS),
            ..Default::default()
        },
        inactivity_timeout: None,
        window_size: crate::flow::WINDOW,
        maximum_packet_size: crate::flow::MAX_PACKET,
        keepalive_interval: Some(keepalive.interval),
        keepalive_max: keepalive.max,
        nodelay: true,
        ..Default::default()
    };
    let presented = Arc::new(Mutex::new(None));
    let (loss, loss_rx) = watch::channel(None);
    let handler = TargetHandler {
        pinned: pinned.clone(),
        presented: presented.clone(),
        loss,
        notices,
        reverse,
    };
    let handshake = client::connect_stream(Arc::new(config), tcp, handler);
    let mut handle = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Err(_) => return Err(unreachable("ssh handshake timed out".into())),
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let presented = presented.lock().ok().and_then(|p| p.clone());
            return Err(match presented {
                Some(presented) => UpstreamError::HostKeyMismatch {
                    target: target.name.clone(),
                    expected: format!(
                        "{} {}",
                        pinned.algorithm(),
                        pinned.fingerprint(HashAlg::Sha256)
                    ),
                    presented,
                },
                None => UpstreamError::Handshake {
                    target: target.name.clone(),
                    reason: e.to_string(),
                },
            });
        }
    };

    let handshake_err = |e: russh::Error| UpstreamError::Handshake {
        target: target.name.clone(),
        reason: e.to_string(),
    };
    let (result, kind) = match &account.credential {
        Credential::None => {
            return Err(UpstreamError::BadCredential {
                target: target.name.clone(),
                account: account.username.clone(),
                reason: "the account holds no credential".into(),
            })
        }
        Credential::Password(pw) => (
            handle
                .authenticate_password(account.username.clone(), pw.expose())
                .await
                .map_err(handshake_err)?,
            "password",
        ),
        Credential::PrivateKey(pem) => {
            let pem = Zeroizing::new(pem.expose().to_string());
            let key = PrivateKey::from_openssh(pem.as_bytes()).map_err(|e| {
                UpstreamError::BadCredential {
                    target: target.name.clone(),
                    account: account.username.clone(),
                    reason: e.to_string(),
                }
            })?;
            let hash = if key.algorithm().is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(handshake_err)?
                    .flatten()
            } else {
                None
            };
            let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
            (
                handle
                    .authenticate_publickey(account.username.clone(), key)
                    .await
                    .map_err(handshake_err)?,
                "private key",
            )
        }
    };
    if !result.success() {
        return Err(UpstreamError::CredentialRefused {
            target: target.name.clone(),
            account: account.username.clone(),
            kind,
        });
    }
    half_made.0 = None;
    Ok((TargetHandle { handle, cutter }, loss_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The russh fork's patch 1 (vendor/russh/PSM-FORK.md) is in the build: every target leg
    /// makes several channels of `client::Msg`, and tokio allocates 32 of them per channel up
    /// front (18 KiB each at russh's own 552 bytes).
    #[test]
    fn a_target_legs_messages_stay_small() {
        // patch 3: the pending channel open is boxed too (136 -> 88 bytes), in the server's
        // `Msg` as well
        let size = std::mem::size_of::<russh::client::Msg>();
        assert!(size <= 96, "russh::client::Msg is {size} bytes");
        let size = std::mem::size_of::<russh::server::Msg>();
        assert!(size <= 96, "russh::server::Msg is {size} bytes");
    }

    #[test]
    fn losses_are_classified_by_what_russh_saw() {
        assert_eq!(
            classify(&russh::Error::KeepaliveTimeout),
            TargetLoss::Unresponsive
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            classify(&russh::Error::IO(reset)),
            TargetLoss::Closed("connection reset".into())
        );
        assert_eq!(
            classify(&russh::Error::HUP),
            TargetLoss::Closed(String::new())
        );
        assert!(matches!(
            classify(&russh::Error::PacketSize(1 << 30)),
            TargetLoss::Violation(_)
        ));
    }
}
