//! The credential vault: AES-256-GCM (ring) under the 32-byte `master.key`.
//!
//! A sealed value is `nonce (12 bytes) || ciphertext || tag (16 bytes)`, with a fresh random
//! nonce per seal. The additional authenticated data binds a ciphertext to the row it belongs to
//! (see [`account_aad`]), so a ciphertext copied onto another account does not open.
//!
//! What it does not do: store anything, or log plaintexts; opened values come back in buffers
//! that are wiped on drop.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use zeroize::Zeroizing;

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The key was not a valid AES-256 key.
    #[error("invalid vault key")]
    BadKey,
    /// The system random source failed.
    #[error("system random source failed")]
    Random,
    /// Encryption failed.
    #[error("encryption failed")]
    Seal,
    /// The ciphertext did not authenticate: wrong key, wrong row, or corrupted data.
    #[error("cannot decrypt {0}: wrong master key or corrupted data")]
    Open(String),
}

/// The additional authenticated data for a user's TOTP secret.
pub fn totp_aad(user: &str) -> String {
    format!("totp:{user}")
}

/// The additional authenticated data for a user's NT hash (RDP, see [`crate::ntlm`]).
pub fn nt_hash_aad(user: &str) -> String {
    format!("nthash:{user}")
}

/// The additional authenticated data for an account credential.
pub fn account_aad(target: &str, username: &str) -> String {
    format!("account:{target}/{username}")
}

/// Seals and opens secrets under one key.
pub struct Vault {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Vault { .. }")
    }
}

impl Vault {
    /// A vault under `key` (the contents of `master.key`).
    pub fn new(key: &[u8; 32]) -> Result<Self, VaultError> {
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| VaultError::BadKey)?;
        Ok(Vault {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    /// Encrypts `plaintext`, binding it to `aad`; returns `nonce || ciphertext || tag`.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| VaultError::Random)?;
        let mut buf = Zeroizing::new(plaintext.to_vec());
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut *buf,
            )
            .map_err(|_| VaultError::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Decrypts a value made by [`Vault::seal`] with the same `aad`.
    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let fail = || VaultError::Open(aad.to_string());
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(fail());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut buf = Zeroizing::new(body.to_vec());
        let len = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf[..])
            .map_err(|_| fail())?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = Vault::new(&[7u8; 32]).expect("vault");
        let aad = account_aad("web01", "root");
        let sealed = v.seal(&aad, b"hunter2").expect("seal");
        assert_eq!(sealed.len(), 12 + 7 + 16);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(&v.open(&aad, &sealed).expect("open")[..], b"hunter2");
        // fresh nonce every time
        let again = v.seal(&aad, b"hunter2").expect("seal");
        assert_ne!(sealed, again);
        // empty secrets work too
        let empty = v.seal(&aad, b"").expect("seal");
        assert!(v.open(&aad, &empty).expect("open").is_empty());
    }

    #[test]
    fn wrong_key_aad_or_tampering_fails() {
        let v = Vault::new(&[7u8; 32]).expect("vault");
        let other = Vault::new(&[8u8; 32]).expect("vault");
        let aad = account_aad("web01", "root");
        let sealed = v.seal(&aad, b"hunter2").expect("seal");
        assert!(other.open(&aad, &sealed).is_err());
        let e = v
            .open(&account_aad("web02", "root"), &sealed)
            .expect_err("wrong aad");
        assert_eq!(
            e.to_string(),
            "cannot decrypt account:web02/root: wrong master key or corrupted data"
        );
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(v.open(&aad, &bad).is_err());
        assert!(v.open(&aad, &sealed[..10]).is_err());
    }
}
