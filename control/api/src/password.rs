//! The password verifier both sides agree on: argon2id, and legacy PBKDF2-HMAC-SHA256.

use crate::ApiError;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;

/// A password verifier: argon2id for every password set or changed now, PBKDF2-HMAC-SHA256
/// for those stored before (still verified, and rehashed on the next successful login).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PasswordHash {
    /// argon2id, as a PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
    Argon2 {
        /// The PHC string.
        argon2id: String,
    },
    /// PBKDF2-HMAC-SHA256 (psm before 0.2).
    Pbkdf2 {
        /// Iteration count.
        iterations: u32,
        /// Salt, base64.
        salt: String,
        /// Derived key, base64.
        hash: String,
    },
}

/// Iterations of the legacy PBKDF2 verifier (kept to verify old hashes and for tests).
pub const PASSWORD_ITERATIONS: u32 = 100_000;

/// argon2id cost for new hashes: 19 MiB, 2 passes, 1 lane (OWASP's minimum recommendation).
fn argon2_hasher() -> argon2::Argon2<'static> {
    let params = argon2::Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

impl PasswordHash {
    /// Hashes `password` with argon2id and a fresh random salt.
    pub fn new(password: &str) -> Result<Self, ApiError> {
        use argon2::PasswordHasher as _;
        use ring::rand::SecureRandom as _;
        let mut salt = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| ApiError::Random)?;
        let salt =
            argon2::password_hash::SaltString::encode_b64(&salt).map_err(|_| ApiError::Random)?;
        let phc = argon2_hasher()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|_| ApiError::Random)?;
        Ok(PasswordHash::Argon2 {
            argon2id: phc.to_string(),
        })
    }

    /// A legacy PBKDF2 verifier (what psm wrote before argon2id), for migration tests.
    pub fn pbkdf2(password: &str, iterations: u32) -> Result<Self, ApiError> {
        use ring::rand::SecureRandom as _;
        let mut salt = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| ApiError::Random)?;
        let mut out = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(iterations).ok_or(ApiError::Random)?,
            &salt,
            password.as_bytes(),
            &mut out,
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(PasswordHash::Pbkdf2 {
            iterations,
            salt: b64.encode(salt),
            hash: b64.encode(out),
        })
    }

    /// Whether this verifier should be replaced by an argon2id one after a successful login.
    pub fn needs_rehash(&self) -> bool {
        matches!(self, PasswordHash::Pbkdf2 { .. })
    }

    /// Whether the verifier is well formed (a stored or imported one).
    pub fn well_formed(&self) -> bool {
        match self {
            PasswordHash::Argon2 { argon2id } => argon2::password_hash::PasswordHash::new(argon2id)
                .is_ok_and(|p| {
                    p.algorithm.as_str() == "argon2id" && p.hash.is_some() && p.salt.is_some()
                }),
            PasswordHash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let b64 = base64::engine::general_purpose::STANDARD;
                *iterations > 0
                    && b64.decode(salt).map(|s| s.len() >= 8).unwrap_or(false)
                    && b64.decode(hash).map(|s| s.len() == 32).unwrap_or(false)
            }
        }
    }

    /// Constant-time check of `password` against this verifier.
    pub fn verify(&self, password: &str) -> bool {
        match self {
            PasswordHash::Argon2 { argon2id } => {
                use argon2::PasswordVerifier as _;
                let Ok(parsed) = argon2::password_hash::PasswordHash::new(argon2id) else {
                    return false;
                };
                argon2_hasher()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            }
            PasswordHash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let b64 = base64::engine::general_purpose::STANDARD;
                let (Ok(salt), Ok(hash), Some(iter)) = (
                    b64.decode(salt),
                    b64.decode(hash),
                    NonZeroU32::new(*iterations),
                ) else {
                    return false;
                };
                ring::pbkdf2::verify(
                    ring::pbkdf2::PBKDF2_HMAC_SHA256,
                    iter,
                    &salt,
                    password.as_bytes(),
                    &hash,
                )
                .is_ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_verifies() {
        let h = PasswordHash::new("correct horse").expect("hash");
        assert!(
            matches!(&h, PasswordHash::Argon2 { argon2id } if argon2id.starts_with("$argon2id$"))
        );
        assert!(h.verify("correct horse") && h.well_formed() && !h.needs_rehash());
        assert!(!h.verify("wrong"));
        // the legacy verifier still works, and asks to be replaced
        let old = PasswordHash::pbkdf2("correct horse", 1000).expect("hash");
        assert!(old.verify("correct horse") && old.needs_rehash() && old.well_formed());
        assert!(!old.verify("wrong"));
        // both forms round-trip through the stored JSON
        for h in [&h, &old] {
            let json = serde_json::to_string(h).expect("json");
            assert_eq!(
                &serde_json::from_str::<PasswordHash>(&json).expect("back"),
                h
            );
        }
        let stored = r#"{"iterations":1000,"salt":"!!","hash":"AAAA"}"#;
        let broken: PasswordHash = serde_json::from_str(stored).expect("parses");
        assert!(!broken.verify("correct horse") && !broken.well_formed());
        let broken = PasswordHash::Argon2 {
            argon2id: "$argon2id$nonsense".into(),
        };
        assert!(!broken.verify("x") && !broken.well_formed());
    }
}
