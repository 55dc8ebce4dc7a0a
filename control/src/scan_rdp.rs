//! Certificate scanning for `psmctl target add --protocol rdp --scan`: connect to an RDP target,
//! negotiate TLS the way the relay will (X.224 Connection Request offering SSL and HYBRID), and
//! take the leaf certificate it proves during the TLS handshake.
//!
//! The pin is `SHA256:` and the unpadded base64 of the SHA-256 of the leaf's DER
//! ([`crate::validate::der_fingerprint`]). The handshake checks the server's signature with the
//! certificate's key (so the server holds that key) but trusts no CA: the operator compares the
//! printed fingerprint with the target's, as with SSH host keys.
//!
//! What it does not do: authenticate (no CredSSP), or keep the connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// How long a scan may take before giving up.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(10);

/// `PROTOCOL_SSL` of an RDP Negotiation Request/Response.
pub const PROTOCOL_SSL: u32 = 1;
/// `PROTOCOL_HYBRID` (CredSSP, NLA).
pub const PROTOCOL_HYBRID: u32 = 2;

/// What a scan found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdpScan {
    /// `SHA256:…` of the leaf certificate.
    pub fingerprint: String,
    /// The security protocol the target chose (`PROTOCOL_SSL` or `PROTOCOL_HYBRID`).
    pub selected: u32,
    /// The leaf certificate's subject, for the operator (empty when it does not parse).
    pub subject: String,
}

impl RdpScan {
    /// `TLS` or `NLA (CredSSP)`, for the operator.
    pub fn security(&self) -> &'static str {
        if self.selected & PROTOCOL_HYBRID != 0 {
            "NLA"
        } else {
            "TLS"
        }
    }
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum RdpScanError {
    /// No answer within the timeout.
    #[error("cannot scan {address}: no RDP answer within {}s", .timeout.as_secs())]
    Timeout {
        /// The address scanned.
        address: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The connection, negotiation or TLS handshake failed.
    #[error("cannot scan {address}: {reason}")]
    Failed {
        /// The address scanned.
        address: String,
        /// What went wrong.
        reason: String,
    },
}

/// The X.224 Connection Request psm sends: TPKT, CR TPDU, RDP_NEG_REQ offering
/// `requested` (no cookie: the scan names no user).
pub fn connection_request(requested: u32) -> Vec<u8> {
    let mut neg = vec![0x01, 0x00, 0x08, 0x00];
    neg.extend_from_slice(&requested.to_le_bytes());
    // length indicator: the CR header after it (6 bytes) and the negotiation request
    let li = 6 + neg.len();
    let total = 4 + 1 + li;
    let mut out = vec![0x03, 0x00];
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.push(li as u8);
    out.extend_from_slice(&[0xe0, 0x00, 0x00, 0x00, 0x00, 0x00]);
    out.extend_from_slice(&neg);
    out
}

/// The security protocol a Connection Confirm (one whole TPKT) selects, or why there is none.
pub fn parse_connection_confirm(tpkt: &[u8]) -> Result<u32, String> {
    if tpkt.len() < 11 || tpkt[0] != 0x03 {
        return Err("the answer is not an RDP connection confirm".into());
    }
    if tpkt[5] & 0xf0 != 0xd0 {
        return Err("the answer is not an X.224 connection confirm".into());
    }
    let neg = &tpkt[11..];
    if neg.len() < 8 {
        return Err(
            "the target offers only standard RDP security (no TLS): psm cannot relay it".into(),
        );
    }
    let value = u32::from_le_bytes([neg[4], neg[5], neg[6], neg[7]]);
    match neg[0] {
        0x02 if value & (PROTOCOL_SSL | PROTOCOL_HYBRID) != 0 => Ok(value),
        0x02 => Err(format!(
            "the target chose security protocol {value:#x}, not TLS or NLA"
        )),
        0x03 => Err(format!(
            "the target refused the negotiation: {}",
            match value {
                1 => "SSL required by server".to_string(),
                2 => "SSL not allowed by server".into(),
                3 => "SSL certificate not on server".into(),
                4 => "inconsistent flags".into(),
                5 => "HYBRID (NLA) required by server".into(),
                6 => "SSL with user authentication required by server".into(),
                other => format!("failure code {other}"),
            }
        )),
        other => Err(format!("unknown negotiation answer type {other:#x}")),
    }
}

/// Accepts any certificate (the operator compares the fingerprint) but checks the handshake's
/// signatures with it.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to `address` (`host:port`), negotiates TLS and returns the certificate it shows.
/// Blocking; gives up after `timeout` in all.
pub fn scan_certificate(address: &str, timeout: Duration) -> Result<RdpScan, RdpScanError> {
    let deadline = Instant::now() + timeout;
    let failed = |reason: String| RdpScanError::Failed {
        address: address.to_string(),
        reason,
    };
    let timed_out = || RdpScanError::Timeout {
        address: address.to_string(),
        timeout,
    };
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => timed_out(),
        _ => failed(e.to_string()),
    };
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| failed(format!("cannot resolve: {e}")))?
        .collect();
    let mut last = None;
    let mut sock = None;
    for a in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        match TcpStream::connect_timeout(a, left) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut sock = match (sock, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(io(e)),
        (None, None) => return Err(failed("no address".into())),
    };
    let arm = |s: &TcpStream| -> Result<(), RdpScanError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        s.set_write_timeout(Some(left)).map_err(io)
    };
    arm(&sock)?;
    sock.write_all(&connection_request(PROTOCOL_SSL | PROTOCOL_HYBRID))
        .map_err(io)?;
    let mut head = [0u8; 4];
    sock.read_exact(&mut head).map_err(io)?;
    if head[0] != 0x03 {
        return Err(failed(
            "the answer is not RDP (is this an RDP port?)".into(),
        ));
    }
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if !(11..=512).contains(&len) {
        return Err(failed(format!("bad TPKT length {len}")));
    }
    let mut tpkt = head.to_vec();
    tpkt.resize(len, 0);
    sock.read_exact(&mut tpkt[4..]).map_err(io)?;
    let selected = parse_connection_confirm(&tpkt).map_err(failed)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let host = address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(address);
    let name = ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from("rdp.invalid".to_string()))
        .map_err(|e| failed(format!("TLS server name: {e}")))?;
    let mut tls = ClientConnection::new(Arc::new(config), name)
        .map_err(|e| failed(format!("TLS setup: {e}")))?;
    while tls.is_handshaking() {
        arm(&sock)?;
        tls.complete_io(&mut sock).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => timed_out(),
            _ => failed(format!("TLS handshake: {e}")),
        })?;
    }
    let leaf = tls
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| failed("the target showed no certificate".into()))?;
    Ok(RdpScan {
        fingerprint: crate::validate::der_fingerprint(leaf.as_ref()),
        selected,
        subject: subject_of(leaf.as_ref()),
    })
}

/// The subject of a DER certificate (RFC 4514 form), or empty.
fn subject_of(der: &[u8]) -> String {
    use x509_cert::der::Decode as _;
    x509_cert::Certificate::from_der(der)
        .map(|c| c.tbs_certificate().subject().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_connection_request_is_the_classic_one() {
        assert_eq!(
            connection_request(PROTOCOL_SSL | PROTOCOL_HYBRID),
            [
                0x03, 0x00, 0x00, 0x13, 0x0e, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x08,
                0x00, 0x03, 0x00, 0x00, 0x00
            ]
        );
    }

    pub(crate) fn confirm(kind: u8, value: u32) -> Vec<u8> {
        let mut v = vec![
            0x03, 0x00, 0x00, 0x13, 0x0e, 0xd0, 0x00, 0x00, 0x12, 0x34, 0x00, kind, 0x00, 0x08,
            0x00,
        ];
        v.extend_from_slice(&value.to_le_bytes());
        v
    }

    #[test]
    fn connection_confirms() {
        assert_eq!(parse_connection_confirm(&confirm(2, 1)), Ok(1));
        assert_eq!(parse_connection_confirm(&confirm(2, 2)), Ok(2));
        let e = parse_connection_confirm(&confirm(3, 5)).expect_err("failure");
        assert!(e.contains("HYBRID (NLA) required"), "{e}");
        let e = parse_connection_confirm(&confirm(2, 0)).expect_err("rdp security");
        assert!(e.contains("not TLS or NLA"), "{e}");
        // a confirm without negotiation data: standard RDP security only
        let bare = [0x03, 0x00, 0x00, 0x0b, 0x06, 0xd0, 0, 0, 0, 0, 0];
        let e = parse_connection_confirm(&bare).expect_err("bare");
        assert!(e.contains("standard RDP security"), "{e}");
    }

    /// A tiny RDP-ish server: reads the Connection Request, answers `answer`, then (for a TLS
    /// answer) accepts TLS with a fresh self-signed certificate. Returns the address and the
    /// certificate's DER.
    pub(crate) fn serve(answer: Vec<u8>, tls: bool) -> (String, Vec<u8>) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert =
            rcgen::generate_simple_self_signed(vec!["win01.test".to_string()]).expect("cert");
        let der = cert.cert.der().to_vec();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(der.clone())], key)
        .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut cr = [0u8; 19];
            if s.read_exact(&mut cr).is_err() {
                return;
            }
            assert_eq!(cr[15], 0x03, "SSL|HYBRID requested");
            if s.write_all(&answer).is_err() || !tls {
                return;
            }
            let Ok(mut conn) = rustls::ServerConnection::new(Arc::new(config)) else {
                return;
            };
            while conn.is_handshaking() {
                if conn.complete_io(&mut s).is_err() {
                    return;
                }
            }
            let _ = conn.complete_io(&mut s);
        });
        (addr, der)
    }

    #[test]
    fn a_scan_pins_the_leaf_certificate_the_target_shows() {
        let (addr, der) = serve(confirm(2, PROTOCOL_HYBRID), true);
        let scan = scan_certificate(&addr, SCAN_TIMEOUT).expect("scan");
        assert_eq!(scan.fingerprint, crate::validate::der_fingerprint(&der));
        assert_eq!(
            crate::validate::cert_fingerprint(&scan.fingerprint).expect("normal form"),
            scan.fingerprint
        );
        assert_eq!(scan.security(), "NLA");
        assert!(scan.subject.contains("rcgen"), "{}", scan.subject);
    }

    #[test]
    fn a_refusal_or_silence_is_named() {
        let (addr, _) = serve(confirm(3, 5), false);
        let e = scan_certificate(&addr, SCAN_TIMEOUT).expect_err("refused");
        assert!(e.to_string().contains("HYBRID (NLA) required"), "{e}");
        // a listener that never answers
        let quiet = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = quiet.local_addr().expect("addr").to_string();
        let e = scan_certificate(&addr, Duration::from_millis(300)).expect_err("silent");
        assert!(e.to_string().contains("no RDP answer within"), "{e}");
        drop(quiet);
    }

    #[test]
    #[ignore = "needs a real RDP server: PSM_TEST_RDP_ADDR=host:port (xrdp or freerdp-shadow, docs/design/rdp-plan.md §5)"]
    fn against_a_real_rdp_server() {
        let addr = std::env::var("PSM_TEST_RDP_ADDR").unwrap_or_else(|_| "127.0.0.1:13389".into());
        let scan = scan_certificate(&addr, SCAN_TIMEOUT).expect("scan");
        assert!(
            crate::validate::cert_fingerprint(&scan.fingerprint).is_ok(),
            "{scan:?}"
        );
        println!("{} {} {}", scan.fingerprint, scan.security(), scan.subject);
    }
}
