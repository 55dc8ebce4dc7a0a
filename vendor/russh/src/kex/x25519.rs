//! psm patch 10: X25519 for the key exchanges (`curve25519-sha256` and the X25519 half of
//! `mlkem768x25519-sha256`) through the crypto backend's `agreement` API when the backend is
//! ring, whose x86-64 scalar multiplication (ADX and BMI2) costs a fraction of
//! curve25519-dalek's portable Montgomery ladder; curve25519-dalek otherwise, as before.
//!
//! Either way a shared secret of all zeros (the peer sent a point of small order) is refused,
//! as RFC 7748 section 6.1 and RFC 8731 ask.

use crate::Error;

/// An ephemeral X25519 private key: made for one key exchange and consumed by it.
pub(crate) struct EphemeralKey(Inner);

#[cfg(all(not(feature = "aws-lc-rs"), feature = "ring"))]
type Inner = ring::agreement::EphemeralPrivateKey;
#[cfg(feature = "aws-lc-rs")]
type Inner = [u8; 32];

/// An X25519 shared secret.
pub(crate) type Shared = [u8; 32];

impl EphemeralKey {
    /// A new private key and its public key.
    #[cfg(all(not(feature = "aws-lc-rs"), feature = "ring"))]
    pub(crate) fn generate() -> Result<(Self, [u8; 32]), Error> {
        use ring::agreement;
        let rng = ring::rand::SystemRandom::new();
        let key = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| Error::KexInit)?;
        let public = key.compute_public_key().map_err(|_| Error::KexInit)?;
        let public: [u8; 32] = public.as_ref().try_into().map_err(|_| Error::KexInit)?;
        Ok((EphemeralKey(key), public))
    }

    /// A new private key and its public key.
    #[cfg(feature = "aws-lc-rs")]
    pub(crate) fn generate() -> Result<(Self, [u8; 32]), Error> {
        let secret = rand::random::<[u8; 32]>();
        let public = curve25519_dalek::montgomery::MontgomeryPoint::mul_base_clamped(secret);
        Ok((EphemeralKey(secret), public.0))
    }

    /// The secret shared with the peer whose public key is `peer`; `Error::Kex` for a key that
    /// is not 32 bytes or a point of small order.
    #[cfg(all(not(feature = "aws-lc-rs"), feature = "ring"))]
    pub(crate) fn agree(self, peer: &[u8]) -> Result<Shared, Error> {
        use ring::agreement;
        if peer.len() != 32 {
            return Err(Error::Kex);
        }
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
        // ring refuses an all-zero result itself (a point of small order)
        agreement::agree_ephemeral(self.0, &peer, |k| <[u8; 32]>::try_from(k))
            .map_err(|_| Error::Kex)?
            .map_err(|_| Error::Kex)
    }

    /// The secret shared with the peer whose public key is `peer`; `Error::Kex` for a key that
    /// is not 32 bytes or a point of small order.
    #[cfg(feature = "aws-lc-rs")]
    pub(crate) fn agree(self, peer: &[u8]) -> Result<Shared, Error> {
        let peer: [u8; 32] = peer.try_into().map_err(|_| Error::Kex)?;
        let shared = curve25519_dalek::montgomery::MontgomeryPoint(peer).mul_clamped(self.0);
        if shared.0 == [0u8; 32] {
            return Err(Error::Kex);
        }
        Ok(shared.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree() {
        let (a, a_pub) = EphemeralKey::generate().unwrap();
        let (b, b_pub) = EphemeralKey::generate().unwrap();
        let ab = a.agree(&b_pub).unwrap();
        let ba = b.agree(&a_pub).unwrap();
        assert_eq!(ab, ba);
        assert_ne!(ab, [0u8; 32]);
    }

    #[test]
    fn a_point_of_small_order_is_refused() {
        // u = 0 (order 2) and u = 1 (order 4), and a key of 31 bytes
        let (a, _) = EphemeralKey::generate().unwrap();
        assert!(matches!(a.agree(&[0u8; 32]), Err(Error::Kex)));
        let mut one = [0u8; 32];
        one[0] = 1;
        let (b, _) = EphemeralKey::generate().unwrap();
        assert!(matches!(b.agree(&one), Err(Error::Kex)));
        let (c, _) = EphemeralKey::generate().unwrap();
        assert!(matches!(c.agree(&[0u8; 31]), Err(Error::Kex)));
    }

    #[test]
    fn agrees_with_curve25519_dalek() {
        // the public key and the shared secret are those of the reference implementation
        let secret = rand::random::<[u8; 32]>();
        let theirs = curve25519_dalek::montgomery::MontgomeryPoint::mul_base_clamped(secret);
        let (ours, ours_pub) = EphemeralKey::generate().unwrap();
        let shared = ours.agree(&theirs.0).unwrap();
        let expected = curve25519_dalek::montgomery::MontgomeryPoint(ours_pub).mul_clamped(secret);
        assert_eq!(shared, expected.0);
    }
}
