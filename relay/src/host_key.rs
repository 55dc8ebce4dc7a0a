//! The gateway's SSH host key: loaded from the data directory, created on first start.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey};
use zeroize::Zeroize as _;

/// File name of the host key inside the data directory.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// Errors loading or creating the host key.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The file could not be read or written.
    #[error("host key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not an unencrypted OpenSSH private key.
    #[error("host key {path}: not a valid unencrypted OpenSSH private key: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is readable by group or others.
    #[error("host key {path}: permissions {mode:o} are too open (want 0600)")]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Loads `<data_dir>/ssh_host_ed25519_key`, creating a fresh Ed25519 key (mode 0600) when the
/// file does not exist. Returns the key and whether it was created now.
pub fn load_or_create(data_dir: &Path) -> Result<(PrivateKey, bool), HostKeyError> {
    let path = data_dir.join(HOST_KEY_FILE);
    let io = |source| HostKeyError::Io {
        path: path.clone(),
        source,
    };
    match fs::metadata(&path) {
        Ok(md) => {
            let mode = md.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(HostKeyError::TooOpen { path, mode });
            }
            let mut text = fs::read_to_string(&path).map_err(io)?;
            let key = PrivateKey::from_openssh(&text);
            text.zeroize();
            let key = key.map_err(|e| HostKeyError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if key.is_encrypted() {
                return Err(HostKeyError::Invalid {
                    path,
                    reason: "key is passphrase-protected".into(),
                });
            }
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).map_err(
                |_| HostKeyError::Invalid {
                    path: path.clone(),
                    reason: "system random source failed".into(),
                },
            )?;
            let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
            seed.zeroize();
            let pem = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| HostKeyError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            f.write_all(pem.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

/// `SHA256:…` fingerprint of a host key, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

/// The public half in OpenSSH one-line form (`ssh-ed25519 AAAA…`).
pub fn public_openssh(key: &PrivateKey) -> String {
    key.public_key().to_openssh().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k1, created) = load_or_create(dir.path()).expect("create");
        assert!(created);
        let mode = fs::metadata(dir.path().join(HOST_KEY_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (k2, created) = load_or_create(dir.path()).expect("load");
        assert!(!created);
        assert_eq!(fingerprint(&k1), fingerprint(&k2));
        assert!(fingerprint(&k1).starts_with("SHA256:"));
        assert!(public_openssh(&k1).starts_with("ssh-ed25519 "));
    }

    #[test]
    fn broken_or_open_key_is_refused_with_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(HOST_KEY_FILE);
        fs::write(&p, "garbage").expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = load_or_create(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(HOST_KEY_FILE) && e.contains("not a valid"),
            "{e}"
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load_or_create(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("too open"), "{e}");
    }
}
