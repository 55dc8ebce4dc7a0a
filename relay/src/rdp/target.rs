//! The target leg of an RDP session: TCP, the X.224 negotiation (TLS or NLA), TLS pinned to the
//! target's certificate, and for NLA targets CredSSP with the vaulted credential. Everything
//! here happens before the user's client gets its last CredSSP answer.

use std::time::Duration;

use ironrdp_core::{decode, encode_vec};
use ironrdp_pdu::nego::{
    ConnectionConfirm, ConnectionRequest, NegoRequestData, RequestFlags, SecurityProtocol,
};
use ironrdp_pdu::x224::X224;
use psm_control_api::{Account, Credential, Secret, Target};
use tokio::net::TcpStream;

use tokio_rustls::client::TlsStream;

use super::tls::{pinned_client, subject_public_key, PIN_MISMATCH};
use super::wire::{Framed, ReadError};

/// How long the whole target login may take (TCP, X.224, TLS, CredSSP).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the target leg could not be set up; every variant is the target's side (or its entry).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// TCP connect failed or timed out.
    #[error("cannot connect to {address}: {why}")]
    Unreachable {
        /// `host:port`.
        address: String,
        /// Why.
        why: String,
    },
    /// The target refused the negotiation or chose something psm does not speak.
    #[error("RDP negotiation with the target failed: {0}")]
    Negotiation(String),
    /// The certificate is not the pinned one.
    #[error("target certificate does not match the pinned fingerprint {pinned}: {why}")]
    CertMismatch {
        /// The pin.
        pinned: String,
        /// What rustls said (with the presented fingerprint).
        why: String,
    },
    /// TLS failed for another reason.
    #[error("TLS with the target failed: {0}")]
    Tls(String),
    /// The target rejected the vaulted credential during its CredSSP.
    #[error("target rejected the vaulted credential: {0}")]
    CredentialRejected(String),
    /// The account has no password to inject.
    #[error("account {0} has no vaulted password (RDP needs a password credential)")]
    NoPassword(String),
    /// The target broke the protocol during the connection phase.
    #[error("target protocol error: {0}")]
    Protocol(String),
    /// The whole login took too long.
    #[error("target login timed out after {0:?}")]
    Timeout(Duration),
}

impl TargetError {
    /// Stable short code for the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            TargetError::Unreachable { .. } => "target_unreachable",
            TargetError::Negotiation(_) => "target_negotiation_failed",
            TargetError::CertMismatch { .. } => "host_key_mismatch",
            TargetError::Tls(_) => "target_handshake_failed",
            TargetError::CredentialRejected(_) => "credential_refused",
            TargetError::NoPassword(_) => "bad_credential",
            TargetError::Protocol(_) => "target_violation",
            TargetError::Timeout(_) => "target_unreachable",
        }
    }

    /// The one line the user's side of psm says (the client itself shows a logon failure).
    pub fn user_line(&self, target: &str) -> String {
        match self {
            TargetError::CertMismatch { .. } => {
                format!("psm: cannot connect to {target}: target identity changed")
            }
            TargetError::CredentialRejected(_) | TargetError::NoPassword(_) => {
                format!("psm: cannot log in to {target}: the target refused the vaulted credential")
            }
            TargetError::Unreachable { .. } | TargetError::Timeout(_) => {
                format!("psm: cannot connect to {target}: target unreachable")
            }
            _ => {
                format!("psm: cannot connect to {target}: secure handshake with the target failed")
            }
        }
    }
}

/// A target leg ready for the MCS phase.
pub struct TargetLeg {
    /// The TLS stream, with what was read past CredSSP.
    pub io: Framed<TlsStream<super::RdpLeg>>,
    /// What the target selected (HYBRID: logged in by CredSSP; SSL: the Client Info logs in).
    pub protocol: SecurityProtocol,
}

/// The vaulted password of an account.
pub fn password(account: &Account) -> Result<Secret, TargetError> {
    match &account.credential {
        Credential::Password(p) => Ok(p.clone()),
        Credential::PrivateKey(_) | Credential::None => {
            Err(TargetError::NoPassword(account.username.clone()))
        }
    }
}

/// Connects and logs in to `target` as `account`, within [`CONNECT_TIMEOUT`].
pub async fn connect(target: &Target, account: &Account) -> Result<TargetLeg, TargetError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(target, account))
        .await
        .unwrap_or(Err(TargetError::Timeout(CONNECT_TIMEOUT)))
}

fn read_err(e: ReadError, during: &str) -> TargetError {
    match e {
        ReadError::Eof => TargetError::Protocol(format!("target closed the connection {during}")),
        ReadError::Io(e) => TargetError::Protocol(format!("{during}: {e}")),
        ReadError::Malformed(m) => TargetError::Protocol(format!("{during}: {m}")),
    }
}

async fn connect_inner(target: &Target, account: &Account) -> Result<TargetLeg, TargetError> {
    let secret = password(account)?;
    let tcp = TcpStream::connect(&target.address)
        .await
        .map_err(|e| TargetError::Unreachable {
            address: target.address.clone(),
            why: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let tcp =
        super::leg(crate::uring::Incoming::Tokio(tcp)).map_err(|e| TargetError::Unreachable {
            address: target.address.clone(),
            why: e.to_string(),
        })?;
    let mut io = Framed::new(tcp);
    let cr = encode_vec(&X224(ConnectionRequest {
        nego_data: Some(NegoRequestData::cookie(cookie(&account.username))),
        flags: RequestFlags::empty(),
        protocol: SecurityProtocol::SSL | SecurityProtocol::HYBRID,
        correlation_info: None,
    }))
    .map_err(|e| TargetError::Protocol(e.to_string()))?;
    io.send(&cr)
        .await
        .map_err(|e| TargetError::Protocol(format!("sending the connection request: {e}")))?;
    let cc = io
        .read_pdu()
        .await
        .map_err(|e| read_err(e, "during the X.224 negotiation"))?;
    let protocol = match decode::<X224<ConnectionConfirm>>(&cc)
        .map_err(|e| TargetError::Protocol(format!("connection confirm: {e}")))?
        .0
    {
        ConnectionConfirm::Response { protocol, .. } => protocol,
        ConnectionConfirm::Failure { code } => {
            return Err(TargetError::Negotiation(format!(
                "target refused TLS and NLA (failure code {})",
                u32::from(code)
            )))
        }
    };
    if protocol != SecurityProtocol::SSL && protocol != SecurityProtocol::HYBRID {
        return Err(TargetError::Negotiation(format!(
            "target selected {}, psm offered SSL|HYBRID",
            super::accept::describe(protocol)
        )));
    }
    if !io.buf.is_empty() {
        return Err(TargetError::Protocol(
            "target sent data before the TLS handshake".into(),
        ));
    }
    let cfg = pinned_client(&target.host_key).map_err(|e| TargetError::Tls(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from("target")
        .map_err(|e| TargetError::Tls(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, io.io)
        .await
        .map_err(|e| {
            let why = e.to_string();
            if why.contains(PIN_MISMATCH) {
                TargetError::CertMismatch {
                    pinned: target.host_key.clone(),
                    why,
                }
            } else {
                TargetError::Tls(why)
            }
        })?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| TargetError::Tls("no certificate".into()))?;
    let mut io = Framed::new(tls);
    if protocol == SecurityProtocol::HYBRID {
        let key = subject_public_key(&leaf).map_err(TargetError::Tls)?;
        nla(&mut io, target, account, &secret, key).await?;
    }
    Ok(TargetLeg { io, protocol })
}

/// The `mstshash` cookie: the vaulted user name, cut to what the field carries.
fn cookie(user: &str) -> String {
    user.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// CredSSP as a client with the vaulted credential (NTLM; the password lives only in sspi's
/// zeroizing secret). psm offered SSL|HYBRID, so the target cannot pick HYBRID_EX and no Early
/// User Authorization Result follows.
async fn nla(
    io: &mut Framed<TlsStream<super::RdpLeg>>,
    target: &Target,
    account: &Account,
    secret: &Secret,
    key: Vec<u8>,
) -> Result<(), TargetError> {
    use sspi::credssp::{ClientMode, ClientState, CredSspClient, CredSspMode, TsRequest};
    let host = target
        .address
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&target.address)
        .trim_matches(['[', ']'])
        .to_string();
    let username = sspi::Username::new(&account.username, account.domain.as_deref())
        .map_err(|e| TargetError::CredentialRejected(format!("account name: {e}")))?;
    let identity = sspi::AuthIdentity {
        username,
        password: secret.expose().to_string().into(),
    };
    let mut client = CredSspClient::new(
        key,
        sspi::Credentials::AuthIdentity(identity),
        CredSspMode::WithCredentials,
        ClientMode::Ntlm(sspi::ntlm::NtlmConfig::default()),
        format!("TERMSRV/{host}"),
    )
    .map_err(|e| TargetError::CredentialRejected(format!("cannot start CredSSP: {e}")))?;
    let mut req = TsRequest::default();
    // NTLM: negotiate, authenticate + key proof, delegated credentials (three client messages)
    for _ in 0..8 {
        let state = client
            .process(req)
            .resolve_to_result()
            .map_err(|e| TargetError::CredentialRejected(e.to_string()))?;
        let (out, last) = match state {
            ClientState::ReplyNeeded(ts) => (ts, false),
            ClientState::FinalMessage(ts) => (ts, true),
        };
        let bytes = super::credssp::encode(&out).map_err(TargetError::Protocol)?;
        io.send(&bytes)
            .await
            .map_err(|e| TargetError::CredentialRejected(format!("connection lost: {e}")))?;
        if last {
            return Ok(());
        }
        let bytes = match io.read_ts_request().await {
            Ok(b) => b,
            // NLA servers close the connection on a wrong credential (freerdp-shadow, Windows)
            Err(ReadError::Eof) => {
                return Err(TargetError::CredentialRejected(
                    "the target closed the connection during NLA".into(),
                ))
            }
            Err(e) => return Err(read_err(e, "during NLA")),
        };
        let ts = TsRequest::from_buffer(&bytes)
            .map_err(|e| TargetError::Protocol(format!("malformed CredSSP message: {e}")))?;
        if let Some(code) = ts.error_code {
            return Err(TargetError::CredentialRejected(format!(
                "NLA error {code:?}"
            )));
        }
        req = ts;
    }
    Err(TargetError::Protocol("NLA did not finish".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(credential: Credential) -> Account {
        Account {
            target: "win01".into(),
            username: "Administrator".into(),
            credential,
            domain: None,
        }
    }

    #[test]
    fn errors_name_a_code_and_a_line_without_secrets() {
        let e = TargetError::CertMismatch {
            pinned: "SHA256:x".into(),
            why: "presented SHA256:y".into(),
        };
        assert_eq!(e.code(), "host_key_mismatch");
        assert_eq!(
            e.user_line("win01"),
            "psm: cannot connect to win01: target identity changed"
        );
        let e =
            TargetError::CredentialRejected("the target closed the connection during NLA".into());
        assert_eq!(e.code(), "credential_refused");
        assert!(e
            .to_string()
            .starts_with("target rejected the vaulted credential"));
        assert!(password(&account(Credential::PrivateKey(Secret::new("k".into())))).is_err());
        assert_eq!(
            password(&account(Credential::Password(Secret::new("pw".into()))))
                .expect("password")
                .expose(),
            "pw"
        );
        assert_eq!(cookie("Admin\r\nistrator"), "Administrator");
    }

    #[tokio::test]
    async fn unreachable_and_refusing_targets_are_typed() {
        // a port nobody listens on
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        let t = Target {
            name: "win01".into(),
            address: addr,
            host_key: "SHA256:x".into(),
            groups: vec![],
            protocol: psm_control_api::Protocol::Rdp,
            listen: None,
        };
        let a = account(Credential::Password(Secret::new("pw".into())));
        let e = connect(&t, &a).await.err().expect("refused");
        assert_eq!(e.code(), "target_unreachable", "{e}");
        // a target that answers a negotiation failure
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let t = Target {
            address: l.local_addr().expect("addr").to_string(),
            ..t
        };
        tokio::spawn(async move {
            if let Ok((s, _)) = l.accept().await {
                let mut f = Framed::new(s);
                let _ = f.read_pdu().await;
                let fail = encode_vec(&X224(ConnectionConfirm::Failure {
                    code: ironrdp_pdu::nego::FailureCode::SSL_REQUIRED_BY_SERVER,
                }))
                .expect("encodes");
                let _ = f.send(&fail).await;
            }
        });
        let e = connect(&t, &a).await.err().expect("refused");
        assert_eq!(e.code(), "target_negotiation_failed", "{e}");
    }
}
