//! The contract between psm-control and psm-relay.
//!
//! What it holds: the versioned [`PolicySnapshot`] that control pushes to every relay, the typed
//! [`AuditEvent`]s that relays send back, the messages both sides exchange
//! ([`ControlToRelay`], [`RelayToControl`]), their newline-delimited JSON codec, the password hash
//! both sides agree on, and the sans-IO access decision ([`policy::decide`]) and
//! the running session's policy checks ([`policy::Governor`]).
//!
//! What it does not do: any I/O. It never opens a socket or a file; the daemons do that.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod approvals;
pub mod commands;
pub mod conditions;
pub mod escape;
pub mod fuzz;
pub mod policy;

pub use approvals::{ApprovalOp, ApprovalReply, ApprovalRequest, ApprovalState};
pub use commands::{CommandAction, CommandPolicy, CommandRule, CommandVerdict, RuleScope};
pub use conditions::{ChannelKind, ClipboardRule, Conditions, RdpChannels, TimeWindow};
pub use escape::{escape, Escaped};
pub use policy::{decide, Attempt, Denial, Governor, Permit, PolicyStop, Verdict};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::num::NonZeroU32;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Longest line either side accepts on the policy socket (a snapshot for thousands of targets
/// fits easily; a peer that sends more is cut off).
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// Name of the control socket that psmctl talks to, inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Name of the socket relays connect to for policy snapshots and audit events.
pub const POLICY_SOCKET: &str = "policy.sock";

/// A string that must never be printed, logged or written to the relay's disk.
///
/// `Debug` and `Display` print `<redacted>`; the memory is wiped when the value is dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The secret itself; call only where it is handed to the peer that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

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

/// One audit event. Relays fill everything but `seq`; control assigns `seq` when it appends the
/// event to the log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// Position in the audit log (set by control).
    #[serde(default)]
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Which process reported it (`relay-<id>`, `control`).
    pub origin: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: AuditKind,
}

/// What an audit event records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditKind {
    /// A psm user proved their identity.
    AuthSuccess {
        /// Login string as sent by the client.
        login: String,
        /// psm user.
        user: String,
        /// `publickey` or `password`.
        method: String,
        /// Client `ip:port`.
        source: String,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// An authentication attempt failed.
    AuthFailure {
        /// Login string as sent by the client.
        login: String,
        /// `publickey` or `password`.
        method: String,
        /// Client `ip:port`.
        source: String,
        /// Full reason (for auditors only).
        reason: String,
        /// The side at fault when it is not the client's own attempt: `control` when
        /// psm-control did not answer an approval call, `policy` when dual control refused.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        side: String,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// An authenticated user was refused a session.
    SessionDenied {
        /// Login string as sent by the client.
        login: String,
        /// psm user.
        user: String,
        /// Client `ip:port`.
        source: String,
        /// Full reason.
        reason: String,
        /// Stable short code of the reason (`no_grant`, `host_key_mismatch`, …).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason_code: String,
        /// The side at fault: `policy`, `client`, `target` or `recorder`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        side: String,
        /// What the client was told.
        client_message: String,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// A session to a target started.
    SessionStart {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Client `ip:port`.
        source: String,
        /// Target name.
        target: String,
        /// Target `host:port`.
        target_address: String,
        /// Account on the target.
        account: String,
        /// Recording id.
        recording_id: String,
        /// Start, ms since the epoch.
        start_ms: u64,
        /// The reason or ticket the user gave, when the grant asks for one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        justification: Option<String>,
        /// The relay worker (core) serving it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<usize>,
        /// Whether the session is recorded (written only when it is not: under a grant that
        /// says `--unrecorded`, or when recording is optional and psm-recorder was unavailable;
        /// `recording_id` then names no recording).
        #[serde(default = "recorded_default", skip_serializing_if = "Clone::clone")]
        recorded: bool,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// A session ended.
    SessionEnd {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Client `ip:port`.
        source: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// Start, ms since the epoch.
        start_ms: u64,
        /// End, ms since the epoch.
        end_ms: u64,
        /// Duration in ms.
        duration_ms: u64,
        /// Bytes from the user to the target.
        bytes_up: u64,
        /// Bytes from the target to the user.
        bytes_down: u64,
        /// Exit status of the last command or shell, when the target sent one.
        exit_status: Option<u32>,
        /// Exit signal, when the target sent one.
        exit_signal: Option<String>,
        /// Recording id.
        recording_id: String,
        /// Why it ended (`client closed the session`, `target stopped responding`, …).
        reason: String,
        /// A stable code for the reason (`client_closed`, `target_unresponsive`, `relay_lost`, …).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason_code: String,
        /// The side the end came from: `client`, `target`, `recorder`, `policy`, `operator`,
        /// `relay` or `internal`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        side: String,
        /// The reason or ticket the user gave, when the grant asks for one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        justification: Option<String>,
        /// Relayed bytes psm-recorder never confirmed durable (0 in the normal case; more when
        /// the recorder link dropped mid-session). Absent when the session was not recorded or
        /// its relay vanished.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unconfirmed_bytes: Option<u64>,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// An RDP session's virtual channel was refused (removed or answered by the relay), or a
    /// refused use of an allowed one (a clipboard transfer the wrong way) was stopped.
    RdpChannel {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// Channel name as the client offered it (escaped), e.g. `cliprdr`, `rdpdr`.
        channel: String,
        /// What was refused: `channel` (the whole channel), `to-target` or `from-target` (a
        /// clipboard transfer that way), or a redirected device's kind: `drive`, `printer`,
        /// `smartcard`, `serial`, `parallel`, `device`.
        what: String,
        /// Why, for auditors (`grant allows clipboard none`).
        reason: String,
    },
    /// The user started a shell, a command or a subsystem on a channel of a session.
    ChannelRequest {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// `shell`, `exec` or `subsystem`.
        request: String,
        /// The command line (exec) or subsystem name; empty for a shell.
        command: String,
        /// Whether the target accepted it.
        accepted: bool,
    },
    /// A command the user submitted (an exec request, or a line typed in a shell), with the
    /// command-control decision.
    Command {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// The command line as reconstructed.
        line: String,
        /// `allow`, `deny`, `terminate` or `alert`.
        decision: String,
        /// The rule that decided (None: the grant's default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<u64>,
        /// How the line was read: `exec`, `shell` (screen model) or `stdin` (a shell without a
        /// terminal).
        source: String,
    },
    /// Dual control: a request was made, voted on, approved, denied or expired.
    Approval {
        /// Request id.
        request: u64,
        /// `requested`, `approve`, `deny`, `approved`, `denied`, `expired`, `covered`.
        action: String,
        /// The requesting user.
        user: String,
        /// Account.
        account: String,
        /// Target.
        target: String,
        /// Who voted (for votes and decisions).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// The reason given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A local port forward (`direct-tcpip`) ended: where it went and what it moved.
    Forward {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name (the forward leaves from there).
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// `local` (`ssh -L`/`-W`), `remote` (`ssh -R`) or `agent` (`ssh -A`).
        #[serde(default = "local_forward")]
        kind: String,
        /// `host:port` (local), `address:port from originator:port` (remote), or
        /// `auth-agent@openssh.com`.
        destination: String,
        /// Bytes from the user.
        bytes_up: u64,
        /// Bytes to the user.
        bytes_down: u64,
        /// How long it was open, ms.
        duration_ms: u64,
    },
    /// An exec command ended (one per exec channel that started, after its `command` event):
    /// how it ended, as the target reported it. Interactive shells have none per line.
    CommandEnd {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// The command line, as in its `command` event (cut at 4096 bytes).
        line: String,
        /// Exit status, when the target sent one.
        #[serde(default)]
        exit_status: Option<u32>,
        /// Exit signal, when the target sent one.
        #[serde(default)]
        exit_signal: Option<String>,
        /// How long the command ran (from its start to the channel's end), ms.
        #[serde(default)]
        duration_ms: u64,
        /// Bytes from the user on this channel.
        #[serde(default)]
        bytes_up: u64,
        /// Bytes to the user on this channel.
        #[serde(default)]
        bytes_down: u64,
    },
    /// One file operation over SFTP (OpenSSH's `sftp`, and `scp`, which speaks SFTP since
    /// OpenSSH 9) or the legacy SCP protocol (`scp -O`), read by the relay from the channel's
    /// bytes as they passed. A file opened, read or written and closed is one event, sent when
    /// it is closed (or when the channel ends).
    FileTransfer {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// `sftp` or `scp` (the legacy protocol).
        protocol: String,
        /// `read` (file content went to the user: a download), `write` (from the user: an
        /// upload), `open` (opened, or refused, with nothing moved), `remove`, `rename`,
        /// `mkdir`, `rmdir`, `setstat`, `symlink` or `link`.
        operation: String,
        /// The path as the client (or, for downloads with `scp -O`, the target) named it.
        path: String,
        /// The second path: a rename's new name, the link of a symlink or hard link (`path`
        /// is what it points to); with `scp -O`, the file name the sending side gave.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path2: Option<String>,
        /// Bytes of file content that passed.
        #[serde(default)]
        bytes: u64,
        /// SHA-256 (hex) of the content as it passed, when it passed whole and in order from
        /// the start of the file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// The content that passed is not the file from its start, in order (random access, a
        /// resumed transfer, one cut short): no hash.
        #[serde(default)]
        partial: bool,
        /// Why there is no hash, or anything else worth knowing about the operation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// Whether it succeeded, as the peers reported it.
        ok: bool,
        /// What the peer reported when it failed (`permission denied: …`, scp's error line).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<String>,
    },
    /// An administrative change through psmctl.
    AdminChange {
        /// What was done (`user add`, `grant remove`, …).
        action: String,
        /// The object it was done to.
        object: String,
        /// Uid of the process that asked for the change (the control socket's peer
        /// credentials); absent in events written before psm recorded it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        actor_uid: Option<u32>,
        /// User name of `actor_uid`, when the system knows it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        actor: Option<String>,
    },
    /// A process-level or session-level event (refused forwarding, refused environment
    /// variables, channels a target opened unasked, …). Repeats within a session are aggregated:
    /// the first is audited with `count` 1, and one more event at the end carries the total.
    Notice {
        /// Message.
        message: String,
        /// The session (connection) it concerns, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        /// What kind of notice (`port forwarding refused`, …), for aggregation and search.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// How many of this kind the session had: 1 on the first, the total on the summary.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
    },
    /// Retention deleted a recording or a closed audit segment (written just before the file
    /// is removed).
    Retention {
        /// The recording deleted (empty when an audit segment was).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        recording_id: String,
        /// Its size.
        bytes: u64,
        /// `max_age` or `max_bytes`.
        reason: String,
        /// When it was last written, ms since the epoch.
        modified_ms: u64,
        /// The audit segment deleted, when it is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit_segment: Option<AuditSegment>,
    },
}

/// A closed segment of the audit log, as a `retention` event names it: what the verifier
/// needs to tell "deleted by retention" from "missing".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSegment {
    /// Its file name (in the data directory's `audit/`).
    pub file: String,
    /// Its first `seq`.
    pub first_seq: u64,
    /// Its last `seq` (its rotation checkpoint).
    pub last_seq: u64,
    /// SHA-256 (hex) of its last line: what the next segment's first line carries.
    pub last_hash: String,
}

/// Messages from control to a relay.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlToRelay {
    /// A complete policy snapshot; replaces whatever the relay had.
    Snapshot(PolicySnapshot),
    /// The answer to a relay's [`RelayToControl::Approval`].
    ApprovalReply {
        /// The relay that asked (other relays ignore it).
        relay_id: String,
        /// The relay's correlation number.
        corr: u64,
        /// The answer.
        reply: ApprovalReply,
    },
    /// A request changed state (every relay gets it; the one whose session waits acts).
    ApprovalUpdate(ApprovalRequest),
    /// An operator ends a live session (`psmctl sessions kill`).
    Kill {
        /// Session id.
        session_id: String,
        /// The reason the operator gave (shown to the user).
        reason: String,
        /// Who asked (`root (uid 0)`).
        actor: String,
    },
}

/// A session running on a relay, as announced in [`RelayToControl::Hello`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveSession {
    /// Session id.
    pub session_id: String,
    /// psm user.
    pub user: String,
    /// Client `ip:port`.
    pub source: String,
    /// Target name.
    pub target: String,
    /// Target `host:port`.
    pub target_address: String,
    /// Account on the target.
    pub account: String,
    /// Recording id (no recording has it when `recorded` is false).
    pub recording_id: String,
    /// Whether the session is recorded: false only under a grant with `--unrecorded` (absent
    /// on the wire when true, as relays before the field sent it).
    #[serde(default = "recorded_default", skip_serializing_if = "Clone::clone")]
    pub recorded: bool,
    /// Start, ms since the epoch.
    pub start_ms: u64,
    /// The reason or ticket the user gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// The relay worker (core) serving it.
    #[serde(default)]
    pub worker: Option<usize>,
}

/// A relay's counters, reported to control every few seconds ([`RelayToControl::Stats`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RelayStats {
    /// TCP connections accepted since the relay started.
    pub connections: u64,
    /// Connections refused before their handshake (`max_startups`, per-source limit).
    pub startups_refused: u64,
    /// Connections that failed before authenticating (bad handshake, garbage, login grace
    /// time exceeded).
    pub preauth_failures: u64,
    /// Failed authentication attempts.
    pub auth_failures: u64,
    /// Sessions started.
    pub sessions_started: u64,
    /// Unauthenticated connections held now.
    pub unauthenticated: u64,
    /// Whether the relay's link to psm-recorder is up.
    pub recorder_connected: bool,
    /// The policy version the relay applies now.
    pub policy_version: u64,
}

/// How far a running session has got, as last reported by its relay.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionProgress {
    /// Session id.
    pub session_id: String,
    /// Bytes from the user to the target so far.
    pub bytes_up: u64,
    /// Bytes from the target to the user so far.
    pub bytes_down: u64,
}

/// Messages from a relay to control.
// Audit events dominate the traffic; boxing them would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayToControl {
    /// First message on a connection.
    Hello {
        /// Relay id (stable per relay process).
        relay_id: String,
        /// Snapshot version the relay holds, if any.
        have_version: Option<u64>,
        /// Sessions running on the relay now (so a restarted control knows them).
        #[serde(default)]
        live: Vec<LiveSession>,
    },
    /// An audit event.
    Audit(AuditEvent),
    /// An approval operation; answered by [`ControlToRelay::ApprovalReply`] with `corr`.
    Approval {
        /// Correlation number, unique on this relay.
        corr: u64,
        /// What is asked.
        op: ApprovalOp,
    },
    /// A TOTP code was accepted: its time step may never be accepted again for this user.
    MfaUsed {
        /// psm user.
        user: String,
        /// RFC 6238 time step of the accepted code.
        step: u64,
    },
    /// A user logged in with a legacy password verifier; here is its argon2id replacement.
    Rehash {
        /// psm user.
        user: String,
        /// The verifier the relay checked against.
        old: PasswordHash,
        /// Its replacement.
        new: PasswordHash,
    },
    /// The relay's counters and the progress of its running sessions.
    Stats {
        /// Counters.
        stats: RelayStats,
        /// One entry per running session.
        #[serde(default)]
        sessions: Vec<SessionProgress>,
    },
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A line on the wire was not valid JSON for the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A line was longer than [`MAX_LINE`].
    #[error("message longer than {MAX_LINE} bytes")]
    TooLong,
    /// The login string was not `<user>@<account>@<target>`.
    #[error("malformed login '{0}': expected <user>@<account>@<target>")]
    MalformedLogin(String),
    /// The system random source failed.
    #[error("system random source failed")]
    Random,
}

/// Encodes a message as one JSON line (with the trailing newline).
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail (no maps with non-string keys).
    let mut v = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

/// Decodes one JSON line (with or without its newline).
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, ApiError> {
    if line.len() > MAX_LINE {
        return Err(ApiError::TooLong);
    }
    serde_json::from_slice(line).map_err(|e| ApiError::Malformed(e.to_string()))
}

/// The `kind` of a `forward` event written before there were other kinds.
fn local_forward() -> String {
    "local".into()
}

/// Milliseconds since the Unix epoch, for event timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn recorded_default() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> PolicySnapshot {
        PolicySnapshot {
            version: 3,
            users: vec![User {
                name: "alice".into(),
                ..User::default()
            }],
            targets: vec![Target {
                protocol: Default::default(),
                name: "web01".into(),
                address: "127.0.0.1:22".into(),
                host_key: "ssh-ed25519 AAAA".into(),
                groups: vec![],
                listen: None,
            }],
            accounts: vec![Account {
                domain: None,
                target: "web01".into(),
                username: "root".into(),
                credential: Credential::Password(Secret::new("hunter2".into())),
            }],
            grants: vec![Grant {
                user: "alice".into(),
                target: "web01".into(),
                account: "root".into(),
                conditions: Conditions::default(),
            }],
            recording_required: true,
            mfa_required: false,
            command_rules: vec![],
        }
    }

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

    #[test]
    fn snapshot_round_trip_and_secret_redaction() {
        let s = snap();
        let line = encode_line(&ControlToRelay::Snapshot(s.clone()));
        assert_eq!(line.last(), Some(&b'\n'));
        let back: ControlToRelay = decode_line(&line).expect("decodes");
        let ControlToRelay::Snapshot(b) = back else {
            panic!("not a snapshot");
        };
        assert_eq!(b.accounts, s.accounts);
        assert_eq!(b.grants, s.grants);
        assert!(!format!("{:?}", s.accounts).contains("hunter2"));
        assert!(decode_line::<ControlToRelay>(b"{not json").is_err());
    }

    #[test]
    fn audit_event_round_trip() {
        let e = AuditEvent {
            seq: 0,
            ts_ms: 1,
            origin: "relay-1".into(),
            kind: AuditKind::AuthFailure {
                protocol: Protocol::Ssh,
                login: "alice@root@web01".into(),
                method: "password".into(),
                source: "127.0.0.1:5000".into(),
                reason: "wrong password".into(),
                side: String::new(),
            },
        };
        let line = encode_line(&RelayToControl::Audit(e.clone()));
        let text = String::from_utf8_lossy(&line);
        assert!(text.contains("\"event\":\"auth_failure\""), "{text}");
        match decode_line::<RelayToControl>(&line).expect("decodes") {
            RelayToControl::Audit(b) => assert_eq!(b, e),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn admin_change_actor_is_optional_on_the_wire() {
        // a line written before the actor was recorded still parses
        let old = br#"{"seq":4,"ts_ms":1,"origin":"control","event":"admin_change","action":"user add","object":"alice"}"#;
        let e: AuditEvent = decode_line(old).expect("old line decodes");
        assert_eq!(
            e.kind,
            AuditKind::AdminChange {
                action: "user add".into(),
                object: "alice".into(),
                actor_uid: None,
                actor: None,
            }
        );
        // absent fields are not written, present ones round-trip
        let text = String::from_utf8_lossy(&encode_line(&e)).into_owned();
        assert!(!text.contains("actor"), "{text}");
        let with = AuditEvent {
            kind: AuditKind::AdminChange {
                action: "user add".into(),
                object: "alice".into(),
                actor_uid: Some(0),
                actor: Some("root".into()),
            },
            ..e
        };
        let line = encode_line(&with);
        let text = String::from_utf8_lossy(&line);
        assert!(
            text.contains(r#""actor_uid":0"#) && text.contains(r#""actor":"root""#),
            "{text}"
        );
        assert_eq!(decode_line::<AuditEvent>(&line).expect("decodes"), with);
    }

    #[test]
    fn file_transfer_and_command_end_on_the_wire() {
        let line = br#"{"seq":7,"ts_ms":1,"origin":"relay-a","event":"file_transfer","session_id":"s","user":"alice","target":"web01","account":"root","channel":2,"protocol":"scp","operation":"write","path":"/tmp/a\nb","ok":true}"#;
        let e = decode_line::<AuditEvent>(line).expect("decodes");
        let AuditKind::FileTransfer {
            path,
            bytes,
            sha256,
            partial,
            ..
        } = &e.kind
        else {
            panic!("{e:?}");
        };
        assert_eq!(
            (path.as_str(), *bytes, sha256, *partial),
            ("/tmp/a\nb", 0, &None, false)
        );
        assert_eq!(
            decode_line::<AuditEvent>(&encode_line(&e)).expect("again"),
            e
        );
        let end = br#"{"seq":8,"ts_ms":1,"origin":"relay-a","event":"command_end","session_id":"s","user":"alice","target":"web01","account":"root","channel":2,"line":"exit 3","exit_status":3}"#;
        let e = decode_line::<AuditEvent>(end).expect("decodes");
        assert!(matches!(
            e.kind,
            AuditKind::CommandEnd {
                exit_status: Some(3),
                exit_signal: None,
                ..
            }
        ));
        let text = String::from_utf8_lossy(&encode_line(&e)).into_owned();
        assert!(text.contains(r#""exit_signal":null"#), "{text}");
    }

    #[test]
    fn hello_without_live_sessions_still_decodes() {
        let old = br#"{"type":"hello","relay_id":"r1","have_version":3}"#;
        match decode_line::<RelayToControl>(old).expect("decodes") {
            RelayToControl::Hello { live, .. } => assert!(live.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }

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
