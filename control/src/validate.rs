//! Checks and normal forms for what an administrator types: names, addresses, OpenSSH keys,
//! RDP certificate fingerprints and Windows domains.
//!
//! Both psmctl (early, friendly errors) and the daemon (the authority) call these.
//!
//! What it does not do: touch the store or the network.

use russh::keys::{HashAlg, PrivateKey, PublicKey};

/// A value that does not pass a check; the message says which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn bad(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

fn check_common(what: &str, name: &str, max: usize) -> Result<(), Invalid> {
    if name.is_empty() {
        return Err(bad(format!("{what} name must not be empty")));
    }
    if name.len() > max {
        return Err(bad(format!(
            "{what} name '{name}' is longer than {max} bytes"
        )));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!(
            "{what} name '{}' must not contain spaces or control characters",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// A psm user name: printable, no spaces; may contain `@` (e-mail addresses).
pub fn user_name(name: &str) -> Result<(), Invalid> {
    check_common("user", name, 128)
}

/// A target name: letters, digits, `.`, `-` and `_`.
pub fn target_name(name: &str) -> Result<(), Invalid> {
    check_common("target", name, 128)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(bad(format!(
            "target name '{name}' may only contain letters, digits, '.', '-' and '_'"
        )));
    }
    Ok(())
}

/// An account (login name on a target): printable, no spaces, no `@`.
pub fn account_name(name: &str) -> Result<(), Invalid> {
    check_common("account", name, 128)?;
    if name.contains('@') {
        return Err(bad(format!("account name '{name}' must not contain '@'")));
    }
    Ok(())
}

/// Splits `<username>@<target>` on the last `@` into `(username, target)`.
pub fn split_account(spec: &str) -> Result<(String, String), Invalid> {
    match spec.rsplit_once('@') {
        Some((user, target)) if !user.is_empty() && !target.is_empty() => {
            account_name(user)?;
            target_name(target)?;
            Ok((user.to_string(), target.to_string()))
        }
        _ => Err(bad(format!(
            "malformed account '{spec}': expected <username>@<target>"
        ))),
    }
}

/// A `host:port` address (`[v6]:port` for IPv6 literals); returns it trimmed.
pub fn address(addr: &str) -> Result<String, Invalid> {
    let addr = addr.trim();
    let err = |why: &str| bad(format!("invalid address '{addr}': {why}"));
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| err("expected HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|_| err("port must be 1-65535"))?;
    if port == 0 {
        return Err(err("port must be 1-65535"));
    }
    if host.is_empty() {
        return Err(err("empty host"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(err("unbalanced '['"));
        };
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err("not an IPv6 address inside [ ]"));
        }
    } else if host.contains(':') {
        return Err(err("write IPv6 addresses as [ADDR]:PORT"));
    } else if host
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | '[' | ']'))
    {
        return Err(err("invalid host name"));
    }
    Ok(addr.to_string())
}

/// Parses an OpenSSH public key line (`type base64 [comment]`).
pub fn public_key(line: &str) -> Result<PublicKey, Invalid> {
    PublicKey::from_openssh(line.trim())
        .map_err(|e| bad(format!("not an OpenSSH public key ({e})")))
}

/// The `type base64` form of a key, without its comment.
pub fn key_material(key: &PublicKey) -> Result<String, Invalid> {
    let mut k = key.clone();
    k.set_comment("");
    k.to_openssh()
        .map(|s| s.trim().to_string())
        .map_err(|e| bad(format!("cannot encode public key ({e})")))
}

/// Checks a host key and returns its normal form `type base64` (comment dropped).
pub fn host_key(line: &str) -> Result<String, Invalid> {
    let key = public_key(line).map_err(|e| bad(format!("invalid host key: {e}")))?;
    key_material(&key)
}

/// Checks a user's authorized key and returns `(line, material)`: the line in normal form with
/// its comment, and the `type base64` material used to spot duplicates.
pub fn user_key(line: &str) -> Result<(String, String), Invalid> {
    let key = public_key(line)?;
    let material = key_material(&key)?;
    let full = key
        .to_openssh()
        .map(|s| s.trim().to_string())
        .map_err(|e| bad(format!("cannot encode public key ({e})")))?;
    Ok((full, material))
}

/// `ssh-ed25519 SHA256:…` for a public key line, or the error text when it does not parse. An
/// RDP target's pin (`SHA256:…`, see [`cert_fingerprint`]) is its own fingerprint.
pub fn fingerprint(line: &str) -> String {
    if let Ok(fp) = cert_fingerprint(line) {
        return fp;
    }
    match public_key(line) {
        Ok(k) => key_fingerprint(&k),
        Err(e) => format!("<{e}>"),
    }
}

/// `ssh-ed25519 SHA256:…` for a public key.
pub fn key_fingerprint(key: &PublicKey) -> String {
    format!("{} {}", key.algorithm(), key.fingerprint(HashAlg::Sha256))
}

/// Checks that `pem` is an unencrypted OpenSSH private key. A public key (a `.pub` file given
/// by mistake) is named as such.
pub fn private_key(pem: &str) -> Result<(), Invalid> {
    if !pem.contains("-----BEGIN") && pem.lines().any(|l| public_key(l).is_ok()) {
        return Err(bad(
            "this is a public key, not a private key: give the private key file \
             (e.g. id_ed25519, not id_ed25519.pub)",
        ));
    }
    let key = PrivateKey::from_openssh(pem.trim())
        .map_err(|e| bad(format!("not an OpenSSH private key ({e})")))?;
    if key.is_encrypted() {
        return Err(bad(
            "the private key is encrypted with a passphrase; store an unencrypted key \
             (ssh-keygen -p -N '' -f FILE on a copy)",
        ));
    }
    Ok(())
}

/// Checks an RDP target's pinned certificate fingerprint and returns its normal form:
/// `SHA256:` and the unpadded standard base64 of the SHA-256 digest of the leaf certificate's
/// DER (what `psmctl target add --scan` prints). Also accepted: the same with `=` padding, and
/// the 64 hex digits `openssl x509 -fingerprint -sha256` prints (colons optional).
pub fn cert_fingerprint(s: &str) -> Result<String, Invalid> {
    use base64::Engine as _;
    let s = s.trim();
    let err = || {
        bad(format!(
            "invalid certificate fingerprint '{}': expected SHA256:<base64 of the SHA-256 digest>",
            s.escape_debug()
        ))
    };
    let digest: Vec<u8> = if let Some(b64) = s.strip_prefix("SHA256:") {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .map_err(|_| err())?
    } else {
        let hex: String = s
            .strip_prefix("sha256 Fingerprint=")
            .unwrap_or(s)
            .chars()
            .filter(|c| *c != ':')
            .collect();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err()))
            .collect::<Result<_, _>>()?
    };
    if digest.len() != 32 {
        return Err(err());
    }
    Ok(der_fingerprint_of_digest(&digest))
}

/// `SHA256:<unpadded base64>` of a SHA-256 digest.
fn der_fingerprint_of_digest(digest: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// The pin of an RDP target for a leaf certificate: `SHA256:` and the unpadded base64 of the
/// SHA-256 digest of its DER.
pub fn der_fingerprint(der: &[u8]) -> String {
    psm_control_api::cert_fingerprint(der)
}

/// Checks a target's pin for its protocol: an OpenSSH host key for SSH, a certificate
/// fingerprint for RDP. Returns the normal form.
pub fn pin(protocol: psm_control_api::Protocol, s: &str) -> Result<String, Invalid> {
    match protocol {
        psm_control_api::Protocol::Ssh => host_key(s),
        psm_control_api::Protocol::Rdp => cert_fingerprint(s),
        // plain TCP carries no identity to pin
        psm_control_api::Protocol::Tcp if s.trim().is_empty() => Ok(String::new()),
        psm_control_api::Protocol::Tcp => Err(bad(
            "a tcp target has no identity to pin: give no host key or certificate",
        )),
    }
}

/// The address psm listens on for a `tcp` target: `IP:PORT` (`0.0.0.0:15432`,
/// `[::]:15432`), port 1-65535, no host name (psm binds it).
pub fn listen_address(addr: &str) -> Result<String, Invalid> {
    let a = addr.trim();
    match a.parse::<std::net::SocketAddr>() {
        Ok(s) if s.port() != 0 => Ok(s.to_string()),
        Ok(_) => Err(bad(format!(
            "invalid listen address '{a}': port must be 1-65535"
        ))),
        Err(_) => Err(bad(format!(
            "invalid listen address '{}': expected IP:PORT (0.0.0.0:15432 or [::]:15432)",
            a.escape_debug()
        ))),
    }
}

/// A Windows domain of an RDP account (`CORP`, `corp.example.com`): letters, digits, `.`, `-`
/// and `_`, at most 255 bytes.
pub fn domain(d: &str) -> Result<(), Invalid> {
    if d.is_empty() || d.len() > 255 {
        return Err(bad("domain must be 1 to 255 characters"));
    }
    if !d
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(bad(format!(
            "domain '{}' may only contain letters, digits, '.', '-' and '_'",
            d.escape_debug()
        )));
    }
    Ok(())
}

/// An address for `protocol`, with RDP's port 3389 added when none is given.
pub fn address_for(protocol: psm_control_api::Protocol, addr: &str) -> Result<String, Invalid> {
    let a = addr.trim();
    let has_port = if a.starts_with('[') {
        a.contains("]:")
    } else {
        a.contains(':')
    };
    if protocol == psm_control_api::Protocol::Rdp && !has_port && !a.is_empty() {
        return address(&format!("{a}:3389"));
    }
    address(a)
}

/// An environment variable name or prefix pattern a grant may allow: `[A-Za-z_][A-Za-z0-9_]*`,
/// optionally ending in `*`.
pub fn env_pattern(p: &str) -> bool {
    let name = p.strip_suffix('*').unwrap_or(p);
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkeys::{ENCRYPTED_PRIV, USER_PRIV, USER_PUB as TEST_PUB};

    #[test]
    fn names() {
        assert!(user_name("alice").is_ok());
        assert!(user_name("a.b@corp.com").is_ok());
        assert!(user_name("").is_err());
        assert!(user_name("al ice").is_err());
        assert!(target_name("web-01.prod").is_ok());
        assert!(target_name("web@01").is_err());
        assert!(account_name("root").is_ok());
        assert!(account_name("ro@ot").is_err());
        assert_eq!(
            split_account("root@web01").expect("ok"),
            ("root".to_string(), "web01".to_string())
        );
        assert!(split_account("root").is_err());
        assert!(split_account("@web01").is_err());
        assert!(split_account("root@").is_err());
        // split on the last '@': the account part then holds an '@', which accounts may not
        assert!(split_account("a@b@web01").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(address(" 127.0.0.1:22 ").expect("ok"), "127.0.0.1:22");
        assert!(address("web01.example.com:2222").is_ok());
        assert!(address("[::1]:22").is_ok());
        assert!(address("::1:22").is_err());
        assert!(address("host").is_err());
        assert!(address("host:0").is_err());
        assert!(address("host:70000").is_err());
        assert!(address(":22").is_err());
        assert!(address("[zz]:22").is_err());
    }

    #[test]
    fn rdp_pins_domains_and_addresses() {
        use psm_control_api::Protocol;
        let fp = der_fingerprint(b"not really a certificate");
        assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 43, "{fp}");
        assert_eq!(cert_fingerprint(&format!(" {fp} ")).expect("ok"), fp);
        assert_eq!(cert_fingerprint(&format!("{fp}=")).expect("padded"), fp);
        // the openssl form of the same digest
        let digest = ring::digest::digest(&ring::digest::SHA256, b"not really a certificate");
        let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(cert_fingerprint(&hex.join(":")).expect("hex"), fp);
        assert_eq!(
            cert_fingerprint(&format!("sha256 Fingerprint={}", hex.join(":"))).expect("openssl"),
            fp
        );
        assert!(cert_fingerprint("SHA256:AAAA").is_err());
        assert!(cert_fingerprint(TEST_PUB).is_err());
        assert_eq!(fingerprint(&fp), fp);
        assert_eq!(pin(Protocol::Rdp, &fp).expect("rdp"), fp);
        assert!(pin(Protocol::Ssh, &fp).is_err());
        assert!(pin(Protocol::Rdp, TEST_PUB).is_err());
        assert!(domain("CORP").is_ok() && domain("corp.example.com").is_ok());
        assert!(domain("").is_err() && domain("CO RP").is_err() && domain("a\\b").is_err());
        assert_eq!(
            address_for(Protocol::Rdp, "10.0.0.7").expect("rdp"),
            "10.0.0.7:3389"
        );
        assert_eq!(
            address_for(Protocol::Rdp, "[::1]").expect("rdp"),
            "[::1]:3389"
        );
        assert_eq!(
            address_for(Protocol::Rdp, "win01:3390").expect("rdp"),
            "win01:3390"
        );
        assert!(address_for(Protocol::Ssh, "10.0.0.7").is_err());
    }

    #[test]
    fn keys() {
        let (full, material) = user_key(TEST_PUB).expect("parses");
        assert_eq!(full, TEST_PUB);
        assert!(!material.contains("alice@laptop"));
        assert_eq!(host_key(TEST_PUB).expect("host key"), material);
        assert!(fingerprint(TEST_PUB).starts_with("ssh-ed25519 SHA256:"));
        assert!(host_key("ssh-ed25519 AAAA").is_err());
        assert!(user_key("not a key").is_err());
        assert!(private_key("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n").is_err());
        assert!(private_key(USER_PRIV).is_ok());
        let e = private_key(ENCRYPTED_PRIV).expect_err("encrypted");
        assert!(e.to_string().contains("encrypted"), "{e}");
        // a .pub file given for a private key says so, rather than "PEM preamble …"
        for public in [TEST_PUB.to_string(), format!("\n# alice\n{TEST_PUB}\n")] {
            let e = private_key(&public).expect_err("public key");
            assert_eq!(
                e.to_string(),
                "this is a public key, not a private key: give the private key file \
                 (e.g. id_ed25519, not id_ed25519.pub)"
            );
        }
    }
}
