//! psm-evidence: what makes psm's recordings and audit log hold up as evidence.
//!
//! - The evidence key ([`EvidenceKey`]): one Ed25519 key pair per data directory,
//!   `evidence.key` (PKCS#8, mode 0600), created by whichever of psm-recorder or psm-control
//!   starts first; its public half is written to `evidence.pub` (`ed25519:<hex>`) for auditors.
//!   psm-recorder signs recording trailers with it, psm-control signs audit checkpoints.
//! - The audit log's hash chain and signed checkpoints ([`audit`]): each line carries the
//!   SHA-256 of the line before it; a checkpoint line signs the chain's head. [`audit::verify_log`]
//!   checks a log and says where it was changed.
//! - SHA-256, hex and UTC-time helpers shared by the recording format and the verifiers.
//!
//! What it does not do: open sockets, or read any file but the key files it is pointed at. The
//! recording seals and trailer live with the recording format (`psm-recorder-format`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod fuzz;

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::signature::{self, Ed25519KeyPair, KeyPair as _};

/// File name of the evidence key (PKCS#8 Ed25519 private key) inside the data directory.
pub const KEY_FILE: &str = "evidence.key";
/// File name of the evidence public key (`ed25519:<64 hex digits>`) inside the data directory.
pub const PUB_FILE: &str = "evidence.pub";
/// Length of a SHA-256 hash.
pub const HASH_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIG_LEN: usize = 64;

/// A SHA-256 hash.
pub type Hash = [u8; HASH_LEN];

/// Errors about the evidence key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("evidence key {}: {source}", .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// There is no key yet.
    #[error("no evidence key at {} (psm-recorder or psm-control creates it on first start)", .0.display())]
    Missing(PathBuf),
    /// A key file holds something that is not a key.
    #[error("evidence key {}: {reason}", .path.display())]
    Invalid {
        /// The key file (or `-` for a key given on the command line).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// An Ed25519 public key that checks evidence signatures.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

/// The short name of a public key: the first 8 bytes of its SHA-256, in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl PublicKey {
    /// The raw 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }

    /// Parses `ed25519:<64 hex digits>` (or the bare hex), surrounding white space allowed.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let t = text.trim();
        let h = t.strip_prefix("ed25519:").unwrap_or(t);
        let bytes = unhex(h).ok_or_else(|| {
            "not an evidence public key (expected ed25519:<64 hex digits>)".to_string()
        })?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "an Ed25519 public key has 32 bytes (64 hex digits)".to_string())?;
        Ok(PublicKey(arr))
    }

    /// Reads a public key file (`evidence.pub`), or a private key file (`evidence.key`) whose
    /// public half is then used.
    pub fn read(path: &Path) -> Result<PublicKey, KeyError> {
        let bytes = fs::read(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                KeyError::Missing(path.to_path_buf())
            } else {
                KeyError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        if let Ok(text) = std::str::from_utf8(&bytes) {
            if let Ok(k) = PublicKey::parse(text) {
                return Ok(k);
            }
        }
        match Ed25519KeyPair::from_pkcs8(&bytes) {
            Ok(pair) => Ok(public_of(&pair)),
            Err(_) => Err(KeyError::Invalid {
                path: path.to_path_buf(),
                reason: "neither ed25519:<hex> nor a PKCS#8 Ed25519 key".into(),
            }),
        }
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Its short name.
    pub fn key_id(&self) -> KeyId {
        let h = sha256(&[&self.0]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[..8]);
        KeyId(id)
    }

    /// Whether `sig` is this key's signature of `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

fn public_of(pair: &Ed25519KeyPair) -> PublicKey {
    let mut b = [0u8; 32];
    b.copy_from_slice(pair.public_key().as_ref());
    PublicKey(b)
}

/// The evidence signing key of a data directory.
pub struct EvidenceKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl fmt::Debug for EvidenceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EvidenceKey({})", self.public)
    }
}

impl EvidenceKey {
    /// A new random key and its PKCS#8 encoding.
    pub fn generate() -> Result<(EvidenceKey, Vec<u8>), KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Invalid {
            path: PathBuf::from("-"),
            reason: "the system random source failed".into(),
        })?;
        let pkcs8 = doc.as_ref().to_vec();
        Ok((EvidenceKey::from_pkcs8(&pkcs8, Path::new("-"))?, pkcs8))
    }

    /// A key from its PKCS#8 encoding (`path` names it in errors).
    pub fn from_pkcs8(bytes: &[u8], path: &Path) -> Result<EvidenceKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(bytes).map_err(|e| KeyError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a PKCS#8 Ed25519 key ({e})"),
        })?;
        let public = public_of(&pair);
        Ok(EvidenceKey { pair, public })
    }

    /// Reads `DIR/evidence.key`.
    pub fn load(data_dir: &Path) -> Result<EvidenceKey, KeyError> {
        let path = data_dir.join(KEY_FILE);
        let bytes = fs::read(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                KeyError::Missing(path.clone())
            } else {
                KeyError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        EvidenceKey::from_pkcs8(&bytes, &path)
    }

    /// Reads `DIR/evidence.key`, creating it (mode 0600) when there is none, and makes sure
    /// `DIR/evidence.pub` holds its public half. Returns the key and whether it was created.
    ///
    /// Two processes starting at once agree on one key: the new key is written to a temporary
    /// file and linked into place, which fails for the second; that one reads the first's.
    pub fn load_or_create(data_dir: &Path) -> Result<(EvidenceKey, bool), KeyError> {
        let path = data_dir.join(KEY_FILE);
        let io_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| KeyError::Io { path: p, source }
        };
        let (key, created) = match EvidenceKey::load(data_dir) {
            Ok(k) => (k, false),
            Err(KeyError::Missing(_)) => {
                let (key, pkcs8) = EvidenceKey::generate()?;
                let tmp = data_dir.join(format!(".{KEY_FILE}.{}", std::process::id()));
                let _ = fs::remove_file(&tmp);
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io_err(&tmp))?;
                f.write_all(&pkcs8)
                    .and_then(|()| f.sync_all())
                    .map_err(io_err(&tmp))?;
                drop(f);
                let linked = fs::hard_link(&tmp, &path);
                let _ = fs::remove_file(&tmp);
                match linked {
                    Ok(()) => (key, true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        (EvidenceKey::load(data_dir)?, false)
                    }
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
            Err(e) => return Err(e),
        };
        let pub_path = data_dir.join(PUB_FILE);
        let line = format!("{}\n", key.public);
        if fs::read_to_string(&pub_path).ok().as_deref() != Some(line.as_str()) {
            let tmp = data_dir.join(format!(".{PUB_FILE}.{}", std::process::id()));
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(line.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io_err(&tmp))?;
            fs::rename(&tmp, &pub_path).map_err(io_err(&pub_path))?;
        }
        Ok((key, created))
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; SIG_LEN] {
        let mut out = [0u8; SIG_LEN];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// SHA-256 of the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case); `None` when it is not an even number of hex digits.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    b.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// `ms` since 1970 as an RFC 3339 UTC time with milliseconds (`2026-12-03T16:20:01.123Z`).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// A duration in microseconds as `H:MM:SS.mmm`.
pub fn offset(us: u64) -> String {
    let ms = us / 1000;
    format!(
        "{}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001ABff").as_deref(), Some(&b[..]));
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn utc_and_offset() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_796_256_000_123), "2026-12-03T00:00:00.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(offset(3_723_004_000), "1:02:03.004");
    }

    #[test]
    fn key_is_created_once_and_reloaded() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (k1, created) = EvidenceKey::load_or_create(tmp.path()).expect("create");
        assert!(created);
        let (k2, created) = EvidenceKey::load_or_create(tmp.path()).expect("load");
        assert!(!created);
        assert_eq!(k1.public(), k2.public());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tmp.path().join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let from_pub = PublicKey::read(&tmp.path().join(PUB_FILE)).expect("pub");
        let from_key = PublicKey::read(&tmp.path().join(KEY_FILE)).expect("key");
        assert_eq!(&from_pub, k1.public());
        assert_eq!(&from_key, k1.public());
        let sig = k1.sign(b"msg");
        assert!(from_pub.verify(b"msg", &sig));
        assert!(!from_pub.verify(b"msh", &sig));
        assert_eq!(
            PublicKey::parse(&k1.public().to_string()).expect("parse"),
            *k1.public()
        );
        assert!(PublicKey::parse("ed25519:abcd").is_err());
        assert!(matches!(
            EvidenceKey::load(&tmp.path().join("nope")),
            Err(KeyError::Missing(_))
        ));
    }
}
