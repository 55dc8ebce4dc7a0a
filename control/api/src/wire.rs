//! The messages control and a relay exchange on the policy socket ([`ControlToRelay`],
//! [`RelayToControl`]), and their newline-delimited JSON codec.

use crate::audit::recorded_default;
use crate::{
    ApiError, ApprovalOp, ApprovalReply, ApprovalRequest, AuditEvent, PasswordHash, PolicySnapshot,
    MAX_LINE,
};
use serde::{Deserialize, Serialize};

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
        /// The running sessions that moved bytes since the relay's last report on this
        /// connection (all of them in its first): the others' figures stand.
        #[serde(default)]
        sessions: Vec<SessionProgress>,
    },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Account, Conditions, Credential, Grant, Secret, Target, User};

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
    fn hello_without_live_sessions_still_decodes() {
        let old = br#"{"type":"hello","relay_id":"r1","have_version":3}"#;
        match decode_line::<RelayToControl>(old).expect("decodes") {
            RelayToControl::Hello { live, .. } => assert!(live.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
