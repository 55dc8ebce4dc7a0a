//! The NT hash of a psm user's password, which RDP's NLA (CredSSP/NTLM) checks a user against.
//!
//! NTLM never shows the relay the password itself, only a response keyed by the NT hash (MD4 of
//! the password in UTF-16LE), so the relay needs that hash. It is password-equivalent for NTLM:
//! psm-control seals it in the vault like an account credential (see
//! [`crate::vault::nt_hash_aad`]), puts it in the snapshot as a [`Secret`], and never logs it.
//!
//! What it does not do: store anything, or check a password's length (the daemon does).

use md4::{Digest, Md4};
use psm_control_api::Secret;
use zeroize::Zeroizing;

/// The NT hash of `password`: 32 lowercase hex digits of MD4 over its UTF-16LE form.
pub fn nt_hash(password: &str) -> Secret {
    let mut utf16 = Zeroizing::new(Vec::with_capacity(password.len() * 2));
    for unit in password.encode_utf16() {
        utf16.extend_from_slice(&unit.to_le_bytes());
    }
    let digest = Md4::digest(&utf16[..]);
    let mut hex = String::with_capacity(32);
    for b in digest.iter() {
        hex.push_str(&format!("{b:02x}"));
    }
    Secret::new(hex)
}

/// Whether `s` has the form of an NT hash (32 lowercase hex digits).
pub fn well_formed(s: &str) -> bool {
    s.len() == 32 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // `winpr-hash -u psmshadow -p 'Shad0w-Pass'`
        assert_eq!(
            nt_hash("Shad0w-Pass").expose(),
            "58ade4f200760fa5454e8ab24bdedc5f"
        );
        // MS-NLMP 4.2.2.1.2: NTOWFv1("Password")
        assert_eq!(
            nt_hash("Password").expose(),
            "a4f49c406510bdcab6824ee7c30fd852"
        );
        // beyond ASCII: UTF-16LE, not UTF-8
        let e = nt_hash("pässwörd");
        assert!(well_formed(e.expose()));
        assert_ne!(e.expose(), nt_hash("passwoerd").expose());
        assert!(!well_formed("58ADE4F200760FA5454E8AB24BDEDC5F"));
        assert!(!format!("{:?}", nt_hash("x")).contains(nt_hash("x").expose()));
    }
}
