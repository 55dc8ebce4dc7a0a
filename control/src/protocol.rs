//! The psmctl <-> psm-control protocol on `control.sock`.
//!
//! JSON lines: the client writes one [`Request`] per line, the daemon answers each with one
//! [`Response`] line, in order, on the same connection. A request is an object tagged by `cmd`
//! (`{"cmd":"grant_add","user":"alice","target":"web01","account":"root"}`); a response is
//! `{"ok":true,"result":…}` or `{"ok":false,"error":"unknown user 'bob'"}`. What `result` holds
//! depends on the request (see each variant). Only the uid that owns the data directory may
//! connect; anyone else gets one error response and the connection is closed.
//!
//! Secrets travel only towards the daemon: an account's credential in [`Request::AccountAdd`],
//! a psm user's password in [`Request::UserAdd`] and [`Request::UserPasswd`] (the daemon checks
//! its length and hashes it, so no client can skip the minimum). They are [`Secret`]s, redacted
//! in `Debug` and wiped when dropped; no response ever carries one.
//!
//! What it does not do: I/O (see [`crate::client`] and [`crate::daemon`]).

use psm_control_api::{Conditions, Credential, Protocol, Secret};
use serde::{Deserialize, Serialize};

/// Longest request line the daemon accepts.
pub const MAX_REQUEST: usize = 1024 * 1024;

/// One request from psmctl.
// Decoded once per request line: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Daemon status. Result: [`StatusInfo`].
    Status,
    /// Adds a user. Result: [`Changed`].
    UserAdd {
        /// User name.
        name: String,
        /// The user's password (the daemon checks its length and stores only a hash).
        #[serde(default)]
        password: Option<Secret>,
        /// Authorized keys, OpenSSH one-line form.
        #[serde(default)]
        ssh_keys: Vec<String>,
    },
    /// Removes a user with their keys and grants. Result: [`Changed`].
    UserRemove {
        /// User name.
        name: String,
    },
    /// Sets a user's password (keys and grants stay). Result: [`Changed`].
    UserPasswd {
        /// User name.
        name: String,
        /// The new password (the daemon checks its length and stores only a hash).
        password: Secret,
    },
    /// Lists users. Result: array of [`UserInfo`].
    UserList,
    /// Adds a target. Result: [`Changed`].
    TargetAdd {
        /// Target name.
        name: String,
        /// `host:port`.
        address: String,
        /// Pinned host key, OpenSSH form (SSH); certificate fingerprint `SHA256:…` (RDP).
        host_key: String,
        /// How the relay talks to it (default SSH).
        #[serde(default, skip_serializing_if = "Protocol::is_ssh")]
        protocol: Protocol,
        /// Where psm listens for a `tcp` target (`IP:PORT`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
    },
    /// Removes a target with its accounts and their grants. Result: [`Changed`].
    TargetRemove {
        /// Target name.
        name: String,
    },
    /// Changes a target's address and/or pinned host key; its accounts and grants stay.
    /// Result: [`Changed`].
    TargetUpdate {
        /// Target name.
        name: String,
        /// New `host:port`, if it changes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
        /// New pin, if it changes: host key, OpenSSH form (SSH); certificate fingerprint (RDP).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_key: Option<String>,
    },
    /// Lists targets. Result: array of [`TargetInfo`].
    TargetList,
    /// Adds an account with its credential (sealed by the vault). Result: [`Changed`].
    AccountAdd {
        /// Target name.
        target: String,
        /// Login name on the target.
        username: String,
        /// The credential.
        credential: Credential,
        /// Windows domain (accounts on RDP targets only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        domain: Option<String>,
    },
    /// Removes an account and the grants on it. Result: [`Changed`].
    AccountRemove {
        /// Target name.
        target: String,
        /// Login name on the target.
        username: String,
    },
    /// Lists accounts (never their secrets). Result: array of [`AccountInfo`].
    AccountList,
    /// Grants `user` the account `account@target`. Result: [`Changed`].
    GrantAdd {
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// Environment variables the grant lets through beyond `LANG` and `LC_*`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allow_env: Vec<String>,
        /// The grant's other conditions (validated by the daemon as well as by psmctl).
        #[serde(default)]
        conditions: Conditions,
    },
    /// Removes a grant. Result: [`Changed`].
    GrantRemove {
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
    },
    /// Lists grants. Result: array of [`GrantInfo`].
    GrantList,
    /// Lists live sessions. Result: array of [`SessionInfo`].
    SessionsList,
    /// Ends a live session within a second; the user sees the reason. Result: [`Changed`]
    /// (the version does not change).
    SessionKill {
        /// Session id.
        session_id: String,
        /// What the user and the audit log are told.
        #[serde(default)]
        reason: Option<String>,
    },
    /// Disables (`disabled: true`) or enables a user; disabling ends their live sessions.
    /// Result: [`Changed`].
    UserDisable {
        /// User name.
        name: String,
        /// Disable or enable.
        disabled: bool,
    },
    /// Lifts a user's lockout. Result: [`Changed`].
    UserUnlock {
        /// User name.
        name: String,
    },
    /// Enrols a user for TOTP with a fresh secret. Result: [`MfaEnrolment`].
    UserMfaEnroll {
        /// User name.
        name: String,
    },
    /// Removes a user's TOTP enrolment. Result: [`Changed`].
    UserMfaReset {
        /// User name.
        name: String,
    },
    /// Adds a group (`targets`: a target group). Result: [`Changed`].
    GroupAdd {
        /// Group name, without `@`.
        name: String,
        /// A target group rather than a group of users.
        #[serde(default)]
        targets: bool,
    },
    /// Removes a group and the grants naming it. Result: [`Changed`].
    GroupRemove {
        /// Group name.
        name: String,
        /// A target group.
        #[serde(default)]
        targets: bool,
    },
    /// Lists groups. Result: array of [`crate::store::GroupInfo`].
    GroupList {
        /// Target groups.
        #[serde(default)]
        targets: bool,
    },
    /// Adds a member to a group or removes it. Result: [`Changed`].
    GroupMember {
        /// Group name.
        group: String,
        /// User (or target, for a target group).
        member: String,
        /// Add or remove.
        add: bool,
        /// A target group.
        #[serde(default)]
        targets: bool,
    },
    /// Would `user` be allowed `account@target` from `from` at `at_ms`? Result: [`PolicyAnswer`].
    PolicyCheck {
        /// psm user.
        user: String,
        /// Account.
        account: String,
        /// Target.
        target: String,
        /// Source address (default 127.0.0.1).
        #[serde(default)]
        from: Option<String>,
        /// When (default now), ms since the epoch.
        #[serde(default)]
        at_ms: Option<u64>,
    },
    /// Adds a command rule. Result: [`Changed`].
    CommandRuleAdd {
        /// What it is attached to.
        scope: psm_control_api::RuleScope,
        /// Regular expression.
        pattern: String,
        /// Action.
        action: psm_control_api::CommandAction,
    },
    /// Removes a command rule. Result: [`Changed`].
    CommandRuleRemove {
        /// Rule id.
        id: u64,
    },
    /// Lists command rules. Result: array of [`psm_control_api::CommandRule`].
    CommandRuleList,
    /// The whole policy as a document. Result: [`crate::store::PolicyDoc`].
    PolicyExport,
    /// Applies a policy document atomically. Result: [`crate::store::ImportReport`].
    PolicyImport {
        /// The document.
        doc: crate::store::PolicyDoc,
        /// Only say what would change.
        #[serde(default)]
        dry_run: bool,
        /// Apply even a document that would leave no grant or no user.
        #[serde(default)]
        force: bool,
    },
    /// Lists access requests (dual control). Result: array of
    /// [`psm_control_api::ApprovalRequest`].
    RequestsList,
    /// Who can reach `account@target`, through which grant. Result: array of [`Reach`].
    WhoCanReach {
        /// Account.
        account: String,
        /// Target.
        target: String,
    },
}

/// A new TOTP enrolment, shown once to the operator to hand to the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MfaEnrolment {
    /// Policy version after the change.
    pub version: u64,
    /// `otpauth://totp/psm:NAME?secret=…&issuer=psm`.
    pub uri: String,
}

/// The answer to [`Request::PolicyCheck`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyAnswer {
    /// Allowed or not.
    pub allowed: bool,
    /// The grant that decided (`alice -> root@web01`), when allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// How the user is covered (`directly`, `through group @ops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Conditions that apply, one per line.
    #[serde(default)]
    pub conditions: Vec<String>,
    /// Why not, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The refusal's code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// One answer of [`Request::WhoCanReach`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    /// psm user.
    pub user: String,
    /// The grant (`@ops -> root@@prod`).
    pub grant: String,
    /// How the user is covered.
    pub via: String,
    /// The grant's conditions.
    pub conditions: Vec<String>,
    /// Whether the user is disabled or locked now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

impl Request {
    /// Whether the request changes the policy.
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            Request::UserAdd { .. }
                | Request::UserRemove { .. }
                | Request::UserPasswd { .. }
                | Request::TargetAdd { .. }
                | Request::TargetUpdate { .. }
                | Request::TargetRemove { .. }
                | Request::AccountAdd { .. }
                | Request::AccountRemove { .. }
                | Request::GrantAdd { .. }
                | Request::GrantRemove { .. }
                | Request::UserDisable { .. }
                | Request::UserUnlock { .. }
                | Request::UserMfaEnroll { .. }
                | Request::UserMfaReset { .. }
                | Request::GroupAdd { .. }
                | Request::GroupRemove { .. }
                | Request::GroupMember { .. }
                | Request::CommandRuleAdd { .. }
                | Request::PolicyImport { .. }
                | Request::CommandRuleRemove { .. }
        )
    }
}

/// One response line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result, when `ok` is true (null for none).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl Response {
    /// A success carrying `result`.
    pub fn ok<T: Serialize>(result: &T) -> Self {
        match serde_json::to_value(result) {
            Ok(result) => Response {
                ok: true,
                error: None,
                result,
            },
            Err(e) => Response::error(format!("cannot encode result: {e}")),
        }
    }
    /// A failure.
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(message.into()),
            result: serde_json::Value::Null,
        }
    }
}

/// The result of a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// Policy version after the change (the snapshot relays now have).
    pub version: u64,
    /// What was done, for the operator (`added user alice`).
    pub message: String,
}

/// A user as listed (no password verifier).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// User name.
    pub name: String,
    /// Whether the user may log in with a password.
    pub has_password: bool,
    /// Authorized keys, OpenSSH one-line form.
    pub ssh_keys: Vec<String>,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Disabled by an operator.
    #[serde(default)]
    pub disabled: bool,
    /// Locked after failed logins until this time.
    #[serde(default)]
    pub locked_until_ms: Option<u64>,
    /// Enrolled for TOTP.
    #[serde(default)]
    pub mfa: bool,
    /// Has the NT hash of the password that RDP logins need (set with the password since
    /// psm supports RDP; older passwords have none until changed).
    #[serde(default)]
    pub rdp: bool,
}

/// A target as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// Target name.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Pinned host key, `type base64` (SSH); certificate fingerprint `SHA256:…` (RDP).
    pub host_key: String,
    /// `ssh-ed25519 SHA256:…` of the pinned key (SSH); the certificate fingerprint (RDP).
    pub fingerprint: String,
    /// Target groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// `ssh`, `rdp` or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where psm listens for a `tcp` target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// Which kind of credential an account holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A password.
    Password,
    /// An OpenSSH private key.
    PrivateKey,
    /// None (the `tcp` account of a pass-through target).
    None,
}

impl CredentialKind {
    /// The name stored in the database and shown in lists.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Password => "password",
            CredentialKind::PrivateKey => "private_key",
            CredentialKind::None => "none",
        }
    }
    /// Parses [`CredentialKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "password" => Some(CredentialKind::Password),
            "private_key" => Some(CredentialKind::PrivateKey),
            "none" => Some(CredentialKind::None),
            _ => None,
        }
    }
    /// The kind of a credential.
    pub fn of(c: &Credential) -> Self {
        match c {
            Credential::Password(_) => CredentialKind::Password,
            Credential::PrivateKey(_) => CredentialKind::PrivateKey,
            Credential::None => CredentialKind::None,
        }
    }
}

/// An account as listed (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// Target name.
    pub target: String,
    /// Login name on the target.
    pub username: String,
    /// Credential kind.
    pub kind: CredentialKind,
    /// Windows domain (RDP accounts; none: a local account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// A grant as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    /// psm user.
    pub user: String,
    /// Target name.
    pub target: String,
    /// Account on the target.
    pub account: String,
    /// Conditions.
    pub conditions: Conditions,
}

/// A live session, from the relays' `session_start` events and hellos.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session, as the relay announced it.
    #[serde(flatten)]
    pub session: psm_control_api::LiveSession,
    /// Relay id that reported it.
    pub relay: String,
    /// Bytes from the user to the target, as last reported by the relay.
    #[serde(default)]
    pub bytes_up: u64,
    /// Bytes from the target to the user, as last reported by the relay.
    #[serde(default)]
    pub bytes_down: u64,
    /// The target's protocol (`ssh` or `rdp`), from the policy as psm-control has it now.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A relay connected to `policy.sock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Relay id from its hello.
    pub relay_id: String,
    /// When it connected, ms since the epoch.
    pub connected_ms: u64,
    /// Its counters and recorder link state, as last reported (every few seconds).
    #[serde(default)]
    pub stats: psm_control_api::RelayStats,
}

/// Space left where recordings are written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpace {
    /// The folder of recordings.
    pub path: String,
    /// Bytes available to psm.
    pub free_bytes: u64,
    /// Size of the file system.
    pub total_bytes: u64,
    /// Inodes (files) still available.
    pub free_inodes: u64,
}

/// Daemon status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Current policy version.
    pub version: u64,
    /// Connected relays.
    pub relays: Vec<RelayInfo>,
    /// Number of live sessions.
    pub sessions: usize,
    /// How many of them are RDP sessions.
    #[serde(default)]
    pub rdp_sessions: usize,
    /// Space left where recordings are written (absent when it cannot be read).
    #[serde(default)]
    pub recordings: Option<DiskSpace>,
    /// Errors reading it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recordings_error: Option<String>,
    /// The SIEM sinks (`[[siem.sink]]` in psm.toml), in configuration order.
    #[serde(default)]
    pub siem: Vec<SinkStatus>,
}

/// One SIEM sink in `psmctl status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SinkStatus {
    /// Its name.
    pub name: String,
    /// `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The receiver, `host:port`.
    pub address: String,
    /// `json`, `cef` or `ocsf`.
    pub format: String,
    /// Whether it holds a connection now (UDP: whether the last send went out).
    pub connected: bool,
    /// Events waiting in its disk queue.
    pub queued: u64,
    /// Their bytes.
    pub queued_bytes: u64,
    /// Events delivered since the sink was first configured.
    pub delivered: u64,
    /// `seq` of the last event delivered.
    pub delivered_seq: u64,
    /// Events dropped because its queue was full (or unwritable).
    pub dropped: u64,
    /// Whether it is dropping now (its queue is at its bound).
    pub dropping: bool,
    /// Why it last failed to connect or send, while it is not delivering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_control_api::Secret;

    #[test]
    fn request_wire_form() {
        let r = Request::GrantAdd {
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            allow_env: Vec::new(),
            conditions: Conditions::default(),
        };
        let line = serde_json::to_string(&r).expect("encode");
        assert_eq!(
            line,
            r#"{"cmd":"grant_add","user":"alice","target":"web01","account":"root","conditions":{}}"#
        );
        let list: Request = serde_json::from_str(r#"{"cmd":"user_list"}"#).expect("decode");
        assert!(matches!(list, Request::UserList));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"nope"}"#).is_err());
        let add = Request::AccountAdd {
            target: "web01".into(),
            username: "root".into(),
            credential: Credential::Password(Secret::new("hunter2".into())),
            domain: None,
        };
        assert!(!format!("{add:?}").contains("hunter2"));
        assert!(add.is_change());
        assert!(!Request::SessionsList.is_change());
        // a user's password crosses the socket as a secret: redacted, never a hash
        let passwd = Request::UserPasswd {
            name: "alice".into(),
            password: Secret::new("correct horse battery".into()),
        };
        assert!(!format!("{passwd:?}").contains("correct horse"));
        assert!(passwd.is_change());
        let line = serde_json::to_string(&passwd).expect("encode");
        assert_eq!(
            line,
            r#"{"cmd":"user_passwd","name":"alice","password":"correct horse battery"}"#
        );
        let update: Request =
            serde_json::from_str(r#"{"cmd":"target_update","name":"web01","address":"h:22"}"#)
                .expect("decode");
        assert!(matches!(
            update,
            Request::TargetUpdate {
                address: Some(_),
                host_key: None,
                ..
            }
        ));
    }

    #[test]
    fn response_wire_form() {
        let ok = serde_json::to_string(&Response::ok(&Changed {
            version: 3,
            message: "m".into(),
        }))
        .expect("encode");
        let back: serde_json::Value = serde_json::from_str(&ok).expect("json");
        assert_eq!(
            back,
            serde_json::json!({"ok": true, "result": {"version": 3, "message": "m"}})
        );
        let err = serde_json::to_string(&Response::error("unknown user 'bob'")).expect("encode");
        assert_eq!(err, r#"{"ok":false,"error":"unknown user 'bob'"}"#);
    }
}
