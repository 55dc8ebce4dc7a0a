//! The rustls client configuration of a TLS sink (RFC 5425): the receiver's certificate must
//! chain to the configured CA and carry the configured name; a client certificate is offered
//! when one is configured. TLS 1.2 and 1.3, ring as the crypto provider.
//!
//! What it does not do: connect (that is [`super::transport`]), or trust the system's CAs.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::config::TlsFiles;

/// A TLS file that cannot be used: the config field it came from and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TlsFileError {
    /// `ca`, `client_cert` or `client_key`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn certs(
    field: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let err = |message: String| TlsFileError { field, message };
    let bytes =
        std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            err(format!(
                "{}: not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(err(format!("{}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

/// Reads the sink's files and builds its client configuration.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("ca", &files.ca)? {
        roots.add(cert).map_err(|e| TlsFileError {
            field: "ca",
            message: format!("{}: unusable CA certificate: {e}", files.ca.display()),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError {
            field: "ca",
            message: format!("TLS setup failed: {e}"),
        })?
        .with_root_certificates(roots);
    let config = match &files.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs("client_cert", cert)?;
            let key_bytes = std::fs::read(key).map_err(|e| TlsFileError {
                field: "client_key",
                message: format!("cannot read {}: {e}", key.display()),
            })?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsFileError {
                field: "client_key",
                message: format!("{}: no usable PEM private key: {e}", key.display()),
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsFileError {
                    field: "client_key",
                    message: format!("{} does not go with {}: {e}", key.display(), cert.display()),
                })?
        }
    };
    Ok(Arc::new(config))
}
