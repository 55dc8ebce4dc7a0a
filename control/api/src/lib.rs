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
mod audit;
pub mod commands;
pub mod conditions;
pub mod escape;
pub mod fuzz;
mod password;
pub mod policy;
pub mod scp;
mod secret;
mod snapshot;
mod wire;

pub use approvals::{ApprovalOp, ApprovalReply, ApprovalRequest, ApprovalState};
pub use audit::{now_ms, AuditEvent, AuditKind, AuditSegment};
pub use commands::{CommandAction, CommandPolicy, CommandRule, CommandVerdict, RuleScope};
pub use conditions::{ChannelKind, ClipboardRule, Conditions, RdpChannels, TimeWindow};
pub use escape::{escape, Escaped};
pub use password::{PasswordHash, PASSWORD_ITERATIONS};
pub use policy::{decide, Attempt, Denial, Governor, Permit, PolicyStop, Satisfied, Step, Verdict};
pub use secret::Secret;
pub use snapshot::{
    cert_fingerprint, Account, Credential, Grant, Login, PolicySnapshot, Protocol, Target, Totp,
    User, TCP_ACCOUNT,
};
pub use wire::{
    decode_line, encode_line, ControlToRelay, LiveSession, RelayStats, RelayToControl,
    SessionProgress,
};

/// Longest line either side accepts on the policy socket (a snapshot for thousands of targets
/// fits easily; a peer that sends more is cut off).
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// Name of the control socket that psmctl talks to, inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Name of the socket relays connect to for policy snapshots and audit events.
pub const POLICY_SOCKET: &str = "policy.sock";

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
