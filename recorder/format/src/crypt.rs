//! Encryption of recordings at rest: the recording key, its file, and how one chunk is
//! encrypted with it (AES-256-GCM, `ring::aead`).
//!
//! The recording key is 32 random bytes, apart from the vault's master key and from the
//! evidence key: whoever may verify recordings needs neither it nor the vault, and whoever
//! may replay them needs it and nothing else. Its file holds the 64 hex digits and a newline,
//! mode 0600 (a key file that the group or others may read is refused). Its *key id* is the
//! first 8 bytes of `SHA-256("psm recording key id v1\0" || key)`, in hex: recordings name the
//! key they need by it, in the clear.
//!
//! # Nonces
//!
//! Each recording has a random 32-byte *salt* in its (clear) header. The chunk key is
//! `HKDF-SHA256(salt, key, info "psm recording chunk key v2")`, so every recording encrypts with
//! a key of its own; within a recording the nonce is the chunk number (`[0; 4] || u64`), which
//! the writer counts up from 1 and never repeats. A (key, nonce) pair therefore never repeats:
//! two recordings would need the same 256-bit salt. The additional data of chunk `n` is
//! `u64 n || SHA-256(the header record)`, so a chunk moved to another place, or a header whose
//! meta was changed, does not decrypt.
//!
//! What it does not do: read recordings (see [`crate::file`]). ring's key schedules are not
//! wiped when dropped (ring offers no way to); the raw key is.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use psm_evidence::{Hash, KeyId};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::digest;
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Length of a recording key.
pub const KEY_LEN: usize = 32;
/// Length of a recording's salt (in its header).
pub const SALT_LEN: usize = 32;
/// Length of the AES-GCM tag after each encrypted chunk.
pub const TAG_LEN: usize = 16;
const KEY_ID_DOMAIN: &[u8] = b"psm recording key id v1\0";
const CHUNK_KEY_INFO: &[u8] = b"psm recording chunk key v2";

/// Why a recording key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("recording key {}: {source}", .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The group or others may read or write it.
    #[error("recording key {}: mode {mode:04o} lets others read it (chmod 600)", .path.display())]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It does not hold 64 hex digits.
    #[error("recording key {}: not a recording key (expected 64 hex digits)", .path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
    /// The system random source failed.
    #[error("cannot generate a recording key: the system random source failed")]
    Random,
}

/// The key that encrypts recordings at rest. Wiped when dropped; its `Debug` shows the key id
/// only.
pub struct RecordingKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
}

impl fmt::Debug for RecordingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordingKey({})", self.id)
    }
}

impl RecordingKey {
    /// The key made of these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> RecordingKey {
        let bytes = Zeroizing::new(bytes);
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(&bytes[..]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&ctx.finish().as_ref()[..8]);
        RecordingKey {
            bytes,
            id: KeyId(id),
        }
    }

    /// A new key from the system random source.
    pub fn generate() -> Result<RecordingKey, KeyFileError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| KeyFileError::Random)?;
        Ok(RecordingKey::from_bytes(*bytes))
    }

    /// Its short public name.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Parses the text of a key file: 64 hex digits, surrounding white space allowed.
    pub fn parse(text: &str) -> Option<RecordingKey> {
        let text = text.trim().as_bytes();
        if text.len() != KEY_LEN * 2 {
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
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        for (i, pair) in text.chunks_exact(2).enumerate() {
            bytes[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(RecordingKey::from_bytes(*bytes))
    }

    /// The text of its key file: 64 hex digits and a newline.
    pub fn encode(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(KEY_LEN * 2 + 1));
        s.push_str(&psm_evidence::hex(&self.bytes[..]));
        s.push('\n');
        s
    }

    /// Reads a key file; refuses one that the group or others may read or write.
    pub fn read(path: &Path) -> Result<RecordingKey, KeyFileError> {
        let io_err = |source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = File::open(path).map_err(io_err)?;
        let mode = f.metadata().map_err(io_err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = Zeroizing::new(String::new());
        f.take(1024).read_to_string(&mut text).map_err(io_err)?;
        RecordingKey::parse(&text).ok_or_else(|| KeyFileError::Malformed {
            path: path.to_path_buf(),
        })
    }

    /// Generates a key and writes it to a new file `path`, mode 0600 (never over an existing
    /// file).
    pub fn create(path: &Path) -> Result<RecordingKey, KeyFileError> {
        let key = RecordingKey::generate()?;
        let io_err = |source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        f.write_all(key.encode().as_bytes()).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        Ok(key)
    }

    /// The cipher of the chunks of the recording with this salt and header.
    pub(crate) fn chunk_cipher(&self, salt: &[u8; SALT_LEN], header: Hash) -> ChunkCipher {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&self.bytes[..]);
        // the length asked for is AES_256_GCM's own: expand cannot fail
        let key = match prk.expand(&[CHUNK_KEY_INFO], &AES_256_GCM) {
            Ok(okm) => UnboundKey::from(okm),
            Err(_) => unreachable!("HKDF output of the AEAD's key length"),
        };
        ChunkCipher {
            key: LessSafeKey::new(key),
            header,
        }
    }
}

/// Encrypts and decrypts the chunks of one recording.
pub(crate) struct ChunkCipher {
    key: LessSafeKey,
    header: Hash,
}

/// A chunk that does not decrypt (changed, moved, or of another recording), or one too long
/// to encrypt.
#[derive(Debug)]
pub(crate) struct Unauthentic;

impl ChunkCipher {
    fn nonce_aad(&self, chunk: u64) -> (Nonce, [u8; 8 + 32]) {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&chunk.to_be_bytes());
        let mut aad = [0u8; 40];
        aad[..8].copy_from_slice(&chunk.to_be_bytes());
        aad[8..].copy_from_slice(&self.header);
        (Nonce::assume_unique_for_key(nonce), aad)
    }

    /// Encrypts chunk `chunk` in place and appends its tag. Fails only beyond AES-GCM's
    /// length limit (64 GiB; chunks are far smaller).
    pub(crate) fn seal(&self, chunk: u64, buf: &mut Vec<u8>) -> Result<(), Unauthentic> {
        let (nonce, aad) = self.nonce_aad(chunk);
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(aad), buf)
            .map_err(|_| Unauthentic)
    }

    /// Decrypts chunk `chunk` (ciphertext and tag) in place; returns the plaintext's length.
    pub(crate) fn open(&self, chunk: u64, buf: &mut [u8]) -> Result<usize, Unauthentic> {
        let (nonce, aad) = self.nonce_aad(chunk);
        self.key
            .open_in_place(nonce, Aad::from(aad), buf)
            .map(|plain| plain.len())
            .map_err(|_| Unauthentic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trips_and_bad_text_is_refused() {
        let key = RecordingKey::generate().expect("key");
        let again = RecordingKey::parse(&key.encode()).expect("parse");
        assert_eq!(again.id(), key.id());
        assert_eq!(again.id().to_string().len(), 16);
        assert!(!format!("{key:?}").contains(&key.encode()[..16]));
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(66)] {
            assert!(RecordingKey::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn key_file_is_created_0600_and_readable_only_so() {
        let dir = std::env::temp_dir().join(format!("psm-reckey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("recording.key");
        let key = RecordingKey::create(&path).expect("create");
        assert!(RecordingKey::create(&path).is_err(), "never over a key");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(RecordingKey::read(&path).expect("read").id(), key.id());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = RecordingKey::read(&path).expect_err("group-readable");
        assert!(e.to_string().contains("mode 0640"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_chunk_opens_only_in_its_place_with_its_key() {
        let key = RecordingKey::generate().expect("key");
        let salt = [7u8; SALT_LEN];
        let c = key.chunk_cipher(&salt, [1u8; 32]);
        let mut buf = b"zstd frame".to_vec();
        c.seal(3, &mut buf).expect("seal");
        assert_eq!(buf.len(), 10 + TAG_LEN);
        let sealed = buf.clone();
        assert!(c.open(4, &mut buf.clone()).is_err(), "another place");
        let other_header = key.chunk_cipher(&salt, [2u8; 32]);
        assert!(other_header.open(3, &mut buf.clone()).is_err());
        let other_salt = key.chunk_cipher(&[8u8; SALT_LEN], [1u8; 32]);
        assert!(other_salt.open(3, &mut buf.clone()).is_err());
        let other_key = RecordingKey::generate()
            .expect("key")
            .chunk_cipher(&salt, [1u8; 32]);
        assert!(other_key.open(3, &mut buf.clone()).is_err());
        let n = c.open(3, &mut buf).expect("open");
        assert_eq!(&buf[..n], b"zstd frame");
        // the same plaintext in another recording (another salt) encrypts differently
        let mut again = b"zstd frame".to_vec();
        other_salt.seal(3, &mut again).expect("seal");
        assert_ne!(again, sealed);
    }
}
