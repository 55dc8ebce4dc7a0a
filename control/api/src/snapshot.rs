//! The policy snapshot that control pushes to every relay: users, targets, accounts and their
//! credentials, grants; and the login string that names a user, an account and a target.

use crate::{
    decide, now_ms, ApiError, Attempt, CommandRule, Conditions, Denial, PasswordHash, Secret,
};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Everything a relay needs to decide and broker sessions, as of one version.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicySnapshot {
    /// Monotonic version; each change made through psmctl bumps it.
    pub version: u64,
    /// psm users (the people who log in to the gateway).
    pub users: Vec<User>,
    /// Target hosts.
    pub targets: Vec<Target>,
    /// Accounts on targets, with their vaulted credentials.
    pub accounts: Vec<Account>,
    /// Who may use which account.
    pub grants: Vec<Grant>,
    /// Whether sessions must be recorded (fail closed when the recorder is unavailable).
    pub recording_required: bool,
    /// Whether every session needs a second factor (`[policy] mfa = "required"`), whatever
    /// its grant says.
    #[serde(default)]
    pub mfa_required: bool,
    /// Command rules, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_rules: Vec<CommandRule>,
}

/// A psm user.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    /// Login name at the gateway.
    pub name: String,
    /// Password verifier, when the user may log in with a password.
    pub password: Option<PasswordHash>,
    /// Authorized public keys in OpenSSH one-line form (`ssh-ed25519 AAAA… comment`).
    pub ssh_keys: Vec<String>,
    /// Groups the user belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Disabled by an operator: no login, and live sessions end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Locked after too many failed logins, until this time (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_ms: Option<u64>,
    /// The TOTP second factor, once enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<Totp>,
    /// The NT hash of the user's psm password (32 hex digits, MD4 of its UTF-16LE form), which
    /// RDP's NLA (CredSSP/NTLM) needs to check the user. Password-equivalent: vaulted at rest
    /// like account credentials, only in memory on the relay. None for users without a
    /// password, and for passwords set before psm kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nt_hash: Option<Secret>,
}

/// A user's TOTP enrolment (RFC 6238: SHA-1, 6 digits, 30 s steps).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totp {
    /// The shared secret, base32 (vaulted at rest, only ever in memory on the relay).
    pub secret: Secret,
    /// The last time step a code was accepted for (a code is accepted once).
    #[serde(default)]
    pub last_step: u64,
}

/// A target host reachable through the gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    /// Short name used in the login string (`alice@root@web01`).
    pub name: String,
    /// `host:port` the relay connects to.
    pub address: String,
    /// The pinned identity: for SSH the host key in OpenSSH form (`ssh-ed25519 AAAA…`); for
    /// RDP the SHA-256 fingerprint of the target's TLS leaf certificate (`SHA256:` + unpadded
    /// base64 of the digest of its DER), as `psmctl target add --scan` prints it.
    pub host_key: String,
    /// Target groups it belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// How the relay talks to it.
    #[serde(default, skip_serializing_if = "Protocol::is_ssh")]
    pub protocol: Protocol,
    /// For a `tcp` target: the address psm listens on for it (`0.0.0.0:15432`); connections
    /// there are relayed, while a lease of their source address is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// The pin of an RDP target, and psm's own RDP certificate fingerprint: `SHA256:` and the
/// unpadded base64 of the SHA-256 of the leaf certificate's DER. One function for psmctl's
/// `--scan` and the relay's check, so the two always agree.
pub fn cert_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref())
    )
}

/// The one account of a `tcp` target: grants name it (`alice tcp@db01`), and a login to it
/// opens a lease instead of a shell.
pub const TCP_ACCOUNT: &str = "tcp";

/// The protocol of a target.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// SSH (the default).
    #[default]
    Ssh,
    /// RDP: TLS with a pinned certificate, then NLA (CredSSP/NTLM) when the target asks for it.
    Rdp,
    /// Plain TCP, passed through unread and unrecorded (splice) on a psm port of its own while
    /// the user holds a lease: an SSH login to the target's `tcp` account.
    Tcp,
}

impl Protocol {
    /// Whether this is SSH (the serde default, left out of the snapshot).
    pub fn is_ssh(&self) -> bool {
        *self == Protocol::Ssh
    }

    /// `ssh`, `rdp` or `tcp`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Rdp => "rdp",
            Protocol::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ssh" => Ok(Protocol::Ssh),
            "rdp" => Ok(Protocol::Rdp),
            "tcp" => Ok(Protocol::Tcp),
            other => Err(format!("unknown protocol '{other}' (ssh, rdp or tcp)")),
        }
    }
}

/// An account on a target, with the credential the relay injects.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Account {
    /// Target name.
    pub target: String,
    /// Login name on the target.
    pub username: String,
    /// The vaulted credential (only ever in memory on the relay).
    pub credential: Credential,
    /// Windows domain of the account (RDP only; None: a local account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// A credential injected into the target login.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", content = "secret", rename_all = "snake_case")]
pub enum Credential {
    /// Password authentication.
    Password(Secret),
    /// Public-key authentication with an OpenSSH private key (PEM text).
    PrivateKey(Secret),
    /// None: the `tcp` account of a pass-through target, which psm never logs in to.
    None,
}

/// Permission for a user (or a group) to open sessions as an account on a target (or on every
/// target of a target group).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    /// psm user, or `@group`.
    pub user: String,
    /// Target name, or `@targetgroup`.
    pub target: String,
    /// Account name on that target.
    pub account: String,
    /// Conditions that restrict the grant; empty means always.
    #[serde(default)]
    pub conditions: Conditions,
}

impl PolicySnapshot {
    /// Looks up a user by name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// [`decide`] for `user` connecting from the loopback address now: the target and account
    /// it would broker (for tests and tools that ask without a real client).
    pub fn authorize_local(
        &self,
        user: &str,
        account: &str,
        target: &str,
    ) -> Result<(&Target, &Account), Denial> {
        decide(
            self,
            &Attempt {
                user,
                account,
                target,
                source: std::net::IpAddr::from([127, 0, 0, 1]),
                now_ms: now_ms(),
            },
        )
        .map(|p| (p.target, p.account))
    }
}

/// A login string `<psm user>@<account>@<target>`, the CyberArk PSMP connection syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    /// psm user.
    pub user: String,
    /// Target account.
    pub account: String,
    /// Target name.
    pub target: String,
}

impl Login {
    /// Parses a login string. The target and account are the last two `@`-separated fields, so a
    /// psm user name may itself contain `@` (an e-mail address).
    pub fn parse(s: &str) -> Result<Login, ApiError> {
        let mut parts = s.rsplitn(3, '@');
        let target = parts.next().unwrap_or_default();
        let account = parts.next().unwrap_or_default();
        let user = parts.next().unwrap_or_default();
        if user.is_empty() || account.is_empty() || target.is_empty() {
            return Err(ApiError::MalformedLogin(s.to_string()));
        }
        Ok(Login {
            user: user.to_string(),
            account: account.to_string(),
            target: target.to_string(),
        })
    }

    /// The psm user named by a login string, even when the string is malformed: the part before
    /// the first `@`, or the whole string.
    pub fn user_part(s: &str) -> &str {
        match Login::parse(s) {
            Ok(_) => {
                let mut parts = s.rsplitn(3, '@');
                parts.next();
                parts.next();
                parts.next().unwrap_or(s)
            }
            Err(_) => s.split('@').next().unwrap_or(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_parsing() {
        let l = Login::parse("alice@root@web01").expect("valid");
        assert_eq!(
            (l.user.as_str(), l.account.as_str(), l.target.as_str()),
            ("alice", "root", "web01")
        );
        let l = Login::parse("a.b@corp.com@root@web01").expect("email user");
        assert_eq!(l.user, "a.b@corp.com");
        for bad in [
            "alice",
            "alice@web01",
            "@root@web01",
            "alice@@web01",
            "alice@root@",
        ] {
            assert!(Login::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Login::user_part("alice"), "alice");
        assert_eq!(Login::user_part("alice@web01"), "alice");
        assert_eq!(Login::user_part("a@b.c@root@web01"), "a@b.c");
    }
}
