//! TLS for RDP: psm's own certificate toward users (generated on first start, or configured),
//! and toward targets a client that accepts only the pinned certificate.
//!
//! A target's identity is the SHA-256 of its leaf certificate's DER (`Target.host_key` =
//! `SHA256:` + unpadded base64), the same form as the gateway's own fingerprint. CredSSP binds
//! the TLS channel with the certificate's public key: [`subject_public_key`] gives the bytes it
//! hashes (the contents of the SubjectPublicKey bit string).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The certificate file in the data directory.
pub const CERT_FILE: &str = "rdp-cert.pem";
/// The private key file in the data directory (mode 0600).
pub const KEY_FILE: &str = "rdp-key.pem";

/// Why the gateway's RDP certificate could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("rdp certificate {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("rdp certificate {path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Generating the certificate failed.
    #[error("cannot generate the rdp certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate and key.
    #[error("rdp certificate rejected by TLS: {0}")]
    Tls(String),
}

/// The certificate users see, with what the relay derives from it.
pub struct GatewayCert {
    /// The TLS server configuration toward users.
    pub server: Arc<rustls::ServerConfig>,
    /// `SHA256:…` of the leaf certificate.
    pub fingerprint: String,
    /// The leaf's SubjectPublicKey bytes (CredSSP's channel binding).
    pub public_key: Vec<u8>,
}

/// psm's crypto provider (ring), the one used on both legs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `SHA256:` + unpadded base64 of the SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    psm_control_api::cert_fingerprint(der)
}

/// The contents of the leaf certificate's SubjectPublicKey bit string (for RSA the
/// RSAPublicKey DER, for EC the point), which CredSSP binds to.
pub fn subject_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
    use x509_cert::der::Decode as _;
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok(cert
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes()
        .to_vec())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The host name for the generated certificate's CN.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "psm".into())
}

/// Writes a new self-signed certificate (CN = host name) and its key (0600).
fn generate(cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
    let name = hostname();
    let mut params = rcgen::CertificateParams::new(vec![name.clone()])
        .map_err(|e| CertError::Generate(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().map_err(|e| CertError::Generate(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key_path)
            .map_err(io_err(key_path))?;
        f.write_all(key_pem.as_bytes()).map_err(io_err(key_path))?;
        f.sync_all().map_err(io_err(key_path))?;
    }
    std::fs::write(cert_path, cert.pem()).map_err(io_err(cert_path))?;
    Ok(())
}

/// Loads the certificate (`cert`/`key` when given, else `DATA/rdp-cert.pem` and
/// `DATA/rdp-key.pem`, generated when neither exists). Returns it and whether it was created.
pub fn load_or_create(
    data_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<(GatewayCert, bool), CertError> {
    let (cert_path, key_path, configured) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf(), true),
        _ => (data_dir.join(CERT_FILE), data_dir.join(KEY_FILE), false),
    };
    let mut created = false;
    if !configured && !cert_path.exists() && !key_path.exists() {
        generate(&cert_path, &key_path)?;
        created = true;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| CertError::Invalid {
            path: cert_path.clone(),
            why: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Invalid {
            path: cert_path.clone(),
            why: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::Invalid {
            path: cert_path,
            why: "no certificate in the file".into(),
        });
    };
    let key: PrivateKeyDer<'static> =
        PrivateKeyDer::from_pem_file(&key_path).map_err(|e| CertError::Invalid {
            path: key_path.clone(),
            why: e.to_string(),
        })?;
    let fingerprint = fingerprint(leaf);
    let public_key = subject_public_key(leaf).map_err(|why| CertError::Invalid {
        path: cert_path.clone(),
        why,
    })?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    Ok((
        GatewayCert {
            server: Arc::new(server),
            fingerprint,
            public_key,
        },
        created,
    ))
}

/// A TLS client verifier that accepts exactly one certificate: the leaf whose SHA-256 is pinned.
/// No chain, name or validity checks: the pin is the identity, as an SSH host key is.
#[derive(Debug)]
pub struct PinnedCert {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    /// A verifier for `pin` (`SHA256:…`).
    pub fn new(pin: &str) -> PinnedCert {
        PinnedCert {
            pin: pin.trim().to_string(),
            provider: provider(),
        }
    }

    /// Whether `der` is the pinned certificate.
    pub fn matches(&self, der: &[u8]) -> bool {
        let seen = fingerprint(der);
        // both are public; still compare without an early exit
        seen.len() == self.pin.len()
            && seen
                .bytes()
                .zip(self.pin.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    }
}

/// The text rustls carries when the pin does not match (recognised by the target leg).
pub const PIN_MISMATCH: &str = "psm: certificate does not match the pinned fingerprint";

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.matches(end_entity) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "{PIN_MISMATCH}: presented {}",
                fingerprint(end_entity)
            )))
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS client configuration toward a target pinned to `pin`.
pub fn pinned_client(pin: &str) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert::new(pin)))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_is_generated_once_then_reloaded_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, created) = load_or_create(dir.path(), None, None).expect("generated");
        assert!(created);
        assert!(a.fingerprint.starts_with("SHA256:"));
        assert_eq!(a.fingerprint.len(), "SHA256:".len() + 43, "unpadded base64");
        assert!(!a.public_key.is_empty());
        let key = dir.path().join(KEY_FILE);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).expect("key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = load_or_create(dir.path(), None, None).expect("reloaded");
        assert!(!created);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.public_key, b.public_key);
        // configured files are used as given
        let (c, created) = load_or_create(
            Path::new("/nonexistent"),
            Some(&dir.path().join(CERT_FILE)),
            Some(&key),
        )
        .expect("configured");
        assert!(!created);
        assert_eq!(c.fingerprint, a.fingerprint);
        // a missing configured file is an error, not a silent new certificate
        assert!(
            load_or_create(dir.path(), Some(Path::new("/nonexistent.pem")), Some(&key)).is_err()
        );
    }

    #[test]
    fn pin_accepts_only_the_pinned_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (g, _) = load_or_create(dir.path(), None, None).expect("generated");
        let der = CertificateDer::pem_file_iter(dir.path().join(CERT_FILE))
            .expect("pem")
            .next()
            .expect("one")
            .expect("der");
        let name = ServerName::try_from("target").expect("name");
        let ok = PinnedCert::new(&g.fingerprint);
        assert!(ok
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .is_ok());
        let other = PinnedCert::new("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        let err = other
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .expect_err("mismatch");
        assert!(err.to_string().contains(PIN_MISMATCH), "{err}");
        assert!(err.to_string().contains(&g.fingerprint), "{err}");
        assert!(!PinnedCert::new("").matches(&der));
    }
}
