//! Host-key scanning for `psmctl target add --scan`: connect to the target with an SSH client,
//! take the host key it proves during key exchange, and disconnect.
//!
//! The client prefers ed25519 host keys (then ECDSA, then RSA), the same order the relay's
//! client uses, so the key pinned is the one the relay will be shown.
//!
//! What it does not do: authenticate, or decide whether the key is trustworthy (the operator
//! compares the printed fingerprint).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PublicKey, PublicKeyOrCertificate};

/// How long a scan may take before giving up.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(10);

/// Host key algorithms offered, most preferred first.
pub const HOST_KEY_PREFERENCE: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// No answer within the timeout.
    #[error("cannot scan {address}: no SSH answer within {}s", .timeout.as_secs())]
    Timeout {
        /// The address scanned.
        address: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The connection or key exchange failed before a host key was seen.
    #[error("cannot scan {address}: {reason}")]
    Failed {
        /// The address scanned.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The server presented a certificate rather than a plain key.
    #[error("cannot scan {address}: the server presented a host certificate, pin its key with --host-key")]
    Certificate {
        /// The address scanned.
        address: String,
    },
    /// The runtime for the scan could not be started.
    #[error("cannot start the scan: {0}")]
    Runtime(std::io::Error),
}

enum Seen {
    Key(PublicKey),
    Certificate,
}

struct Capture {
    seen: Arc<Mutex<Option<Seen>>>,
}

impl client::Handler for Capture {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(match server_public_key {
                PublicKeyOrCertificate::PublicKey { key, .. } => Seen::Key(key.clone()),
                PublicKeyOrCertificate::Certificate(_) => Seen::Certificate,
            });
        }
        // Refuse: we only wanted the key, and refusing ends the connection here.
        Ok(false)
    }
}

/// Connects to `address` (`host:port`) and returns the host key the server proved.
pub async fn scan_host_key(address: &str, timeout: Duration) -> Result<PublicKey, ScanError> {
    let config = client::Config {
        preferred: russh::Preferred {
            key: Cow::Borrowed(HOST_KEY_PREFERENCE),
            ..Default::default()
        },
        inactivity_timeout: Some(timeout),
        ..Default::default()
    };
    let seen = Arc::new(Mutex::new(None));
    let handler = Capture { seen: seen.clone() };
    let result =
        tokio::time::timeout(timeout, client::connect(Arc::new(config), address, handler)).await;
    let taken = seen.lock().ok().and_then(|mut s| s.take());
    match taken {
        Some(Seen::Key(key)) => return Ok(key),
        Some(Seen::Certificate) => {
            return Err(ScanError::Certificate {
                address: address.to_string(),
            })
        }
        None => {}
    }
    match result {
        Err(_) => Err(ScanError::Timeout {
            address: address.to_string(),
            timeout,
        }),
        Ok(Err(e)) => Err(ScanError::Failed {
            address: address.to_string(),
            reason: e.to_string(),
        }),
        Ok(Ok(_handle)) => Err(ScanError::Failed {
            address: address.to_string(),
            reason: "the server was accepted without showing a host key".into(),
        }),
    }
}

/// [`scan_host_key`] on a private single-thread runtime, for synchronous callers.
pub fn scan_host_key_blocking(address: &str, timeout: Duration) -> Result<PublicKey, ScanError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ScanError::Runtime)?;
    rt.block_on(scan_host_key(address, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkeys::USER_PRIV;
    use russh::keys::PrivateKey;
    use russh::server::{self, Server as _};

    #[derive(Clone)]
    struct NoAuth;
    impl server::Handler for NoAuth {
        type Error = russh::Error;
    }
    impl server::Server for NoAuth {
        type Handler = NoAuth;
        fn new_client(&mut self, _: Option<std::net::SocketAddr>) -> NoAuth {
            NoAuth
        }
    }

    #[tokio::test]
    async fn scans_an_ed25519_host_key() {
        let key = PrivateKey::from_openssh(USER_PRIV).expect("key");
        let expected = key.public_key().clone();
        let config = Arc::new(server::Config {
            keys: vec![key],
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = NoAuth.run_on_socket(config, &listener).await;
        });
        let got = scan_host_key(&addr.to_string(), Duration::from_secs(5))
            .await
            .expect("scan");
        assert_eq!(got.key_data(), expected.key_data());
        assert!(crate::validate::key_fingerprint(&got).starts_with("ssh-ed25519 SHA256:"));
        server.abort();
    }

    #[tokio::test]
    async fn unreachable_is_a_clear_error() {
        // bind then drop: nothing listens on this port any more
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let e = scan_host_key(&addr, Duration::from_secs(2))
            .await
            .expect_err("nothing listens");
        assert!(
            e.to_string().starts_with(&format!("cannot scan {addr}")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let hold = tokio::spawn(async move {
            let _conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let e = scan_host_key(&addr, Duration::from_millis(500))
            .await
            .expect_err("silent");
        assert!(matches!(e, ScanError::Timeout { .. }), "{e}");
        hold.abort();
    }
}
