//! Why a session ended, typed, with the side at fault.
//!
//! `Display` is the audit log's `reason`; [`EndReason::code`] is a stable short code beside it;
//! [`EndReason::user_line`] is the one line the user is told, when there is one to tell.

use std::fmt;

/// Which party a session end or an error comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The user's client.
    Client,
    /// The target server.
    Target,
    /// psm-recorder.
    Recorder,
    /// psm-control (the one call a login waits on: dual control).
    Control,
    /// psm itself (shutdown, limits).
    Internal,
    /// The policy (a limit reached, a grant revoked, a window closed).
    Policy,
    /// An operator (`psmctl sessions kill`).
    Operator,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Target => "target",
            Side::Recorder => "recorder",
            Side::Control => "control",
            Side::Internal => "internal",
            Side::Policy => "policy",
            Side::Operator => "operator",
        })
    }
}

/// Why a session, a channel or a forward was refused before it ran: the side at fault, a stable
/// code for SIEM rules, the full reason for the audit log (`Display`) and the one line the user
/// is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Who is at fault (the policy, the user's client, the target, psm-recorder).
    pub side: Side,
    /// Stable short code (`no_grant`, `host_key_mismatch`, `recording_unavailable`, …).
    pub code: &'static str,
    /// The full reason, for the audit log.
    pub reason: String,
    /// The user's line.
    pub user_line: String,
}

impl Refusal {
    /// A refusal with its parts.
    pub fn new(side: Side, code: &'static str, reason: String, user_line: String) -> Refusal {
        Refusal {
            side,
            code,
            reason,
            user_line,
        }
    }

    /// The access decision said no.
    pub fn policy(d: &psm_control_api::Denial) -> Refusal {
        Refusal::new(
            Side::Policy,
            d.code(),
            d.to_string(),
            format!("psm: {}", d.client_message()),
        )
    }

    /// The target leg could not be set up.
    pub fn target(e: &crate::upstream::UpstreamError) -> Refusal {
        Refusal::new(Side::Target, e.code(), e.to_string(), e.client_message())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// How the target leg of a channel was lost, as russh reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetLoss {
    /// No answer to keepalives.
    Unresponsive,
    /// The TCP connection was closed or reset, or the target sent a disconnect.
    Closed(String),
    /// The target broke the SSH protocol (an oversized or malformed packet).
    Violation(String),
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The user closed the session (or its last channel).
    ClientClosed,
    /// The user's connection failed.
    ClientError(String),
    /// The user's client broke the protocol (data beyond its window, a request flood).
    ClientViolation(String),
    /// The target ended the session normally (the shell or command exited).
    TargetEnded,
    /// The target stopped answering keepalives.
    TargetUnresponsive,
    /// The target's connection closed or reset without ending the session.
    TargetClosed(String),
    /// The target broke the protocol.
    TargetViolation(String),
    /// The recorder link dropped.
    RecordingLost,
    /// psm-recorder could no longer write this session's recording.
    RecordingFailed(String),
    /// The relay is stopping.
    Shutdown,
    /// The policy ended it.
    Policy(psm_control_api::PolicyStop),
    /// An operator ended it.
    Operator {
        /// The reason given.
        reason: String,
        /// Who.
        actor: String,
    },
}

impl EndReason {
    /// The side at fault (or that ended it).
    pub fn side(&self) -> Side {
        match self {
            EndReason::ClientClosed | EndReason::ClientError(_) | EndReason::ClientViolation(_) => {
                Side::Client
            }
            EndReason::TargetEnded
            | EndReason::TargetUnresponsive
            | EndReason::TargetClosed(_)
            | EndReason::TargetViolation(_) => Side::Target,
            EndReason::RecordingLost | EndReason::RecordingFailed(_) => Side::Recorder,
            EndReason::Shutdown => Side::Internal,
            EndReason::Policy(_) => Side::Policy,
            EndReason::Operator { .. } => Side::Operator,
        }
    }

    /// The side whose failure ended the session, where one did: a target lost, closed or
    /// broken, a recording lost. None for a session that ended as someone meant it to (the
    /// user or the target closing it, the policy, an operator, psm shutting down).
    pub fn fault(&self) -> Option<Side> {
        match self {
            EndReason::TargetUnresponsive
            | EndReason::TargetClosed(_)
            | EndReason::TargetViolation(_) => Some(Side::Target),
            EndReason::RecordingLost | EndReason::RecordingFailed(_) => Some(Side::Recorder),
            EndReason::ClientClosed
            | EndReason::ClientError(_)
            | EndReason::ClientViolation(_)
            | EndReason::TargetEnded
            | EndReason::Shutdown
            | EndReason::Policy(_)
            | EndReason::Operator { .. } => None,
        }
    }

    /// A stable short code for the reason.
    pub fn code(&self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::ClientError(_) => "client_error",
            EndReason::ClientViolation(_) => "client_violation",
            EndReason::TargetEnded => "target_ended",
            EndReason::TargetUnresponsive => "target_unresponsive",
            EndReason::TargetClosed(_) => "target_closed",
            EndReason::TargetViolation(_) => "target_violation",
            EndReason::RecordingLost => "recording_lost",
            EndReason::RecordingFailed(_) => "recording_failed",
            EndReason::Shutdown => "shutdown",
            EndReason::Policy(p) => p.code(),
            EndReason::Operator { .. } => "operator_kill",
        }
    }

    /// What the user is told (one line on stderr or in the disconnect message), if anything.
    pub fn user_line(&self) -> Option<String> {
        match self {
            EndReason::Policy(p) => Some(p.user_line()),
            EndReason::Operator { reason, .. } => Some(format!(
                "psm: session ended by an operator: {}",
                crate::escape_short(reason)
            )),
            other => other.static_line().map(String::from),
        }
    }

    fn static_line(&self) -> Option<&'static str> {
        match self {
            EndReason::ClientClosed | EndReason::ClientError(_) | EndReason::TargetEnded => None,
            EndReason::ClientViolation(_) => {
                Some("psm: protocol violation by the client; the connection was closed")
            }
            EndReason::TargetUnresponsive => {
                Some("psm: the target stopped responding; the session was closed")
            }
            EndReason::TargetClosed(_) => {
                Some("psm: the target closed the connection; the session was closed")
            }
            EndReason::TargetViolation(_) => {
                Some("psm: the target broke the SSH protocol; the session was closed")
            }
            EndReason::RecordingLost | EndReason::RecordingFailed(_) => {
                Some("psm: session recording was lost; the session was closed")
            }
            EndReason::Shutdown => Some("psm: the gateway is shutting down"),
            EndReason::Policy(_) | EndReason::Operator { .. } => None,
        }
    }
}

impl From<TargetLoss> for EndReason {
    fn from(l: TargetLoss) -> Self {
        match l {
            TargetLoss::Unresponsive => EndReason::TargetUnresponsive,
            TargetLoss::Closed(d) => EndReason::TargetClosed(d),
            TargetLoss::Violation(d) => EndReason::TargetViolation(d),
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::ClientClosed => f.write_str("client closed the session"),
            EndReason::ClientError(d) => write!(f, "client connection error: {d}"),
            EndReason::ClientViolation(d) => write!(f, "client protocol violation: {d}"),
            EndReason::TargetEnded => f.write_str("target ended the session"),
            EndReason::TargetUnresponsive => f.write_str("target stopped responding"),
            EndReason::TargetClosed(d) if d.is_empty() => {
                f.write_str("target closed the connection")
            }
            EndReason::TargetClosed(d) => write!(f, "target closed the connection: {d}"),
            EndReason::TargetViolation(d) => write!(f, "target protocol violation: {d}"),
            EndReason::RecordingLost => f.write_str("session recording was lost"),
            EndReason::RecordingFailed(d) => write!(f, "session recording was lost: {d}"),
            EndReason::Shutdown => f.write_str("gateway shutting down"),
            EndReason::Policy(p) => write!(f, "{p}"),
            EndReason::Operator { reason, actor } => {
                write!(
                    f,
                    "ended by operator {actor}: {}",
                    crate::escape_short(reason)
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_their_side_and_read_as_the_audit_log_says() {
        let r = EndReason::from(TargetLoss::Unresponsive);
        assert_eq!(r.to_string(), "target stopped responding");
        assert_eq!(r.side(), Side::Target);
        assert_eq!(r.fault(), Some(Side::Target));
        // a target that ends the session as asked is its side, and no failure
        assert_eq!(EndReason::TargetEnded.side(), Side::Target);
        assert_eq!(EndReason::TargetEnded.fault(), None);
        assert_eq!(EndReason::RecordingLost.fault(), Some(Side::Recorder));
        assert_eq!(EndReason::Shutdown.fault(), None);
        assert_eq!(r.code(), "target_unresponsive");
        assert!(r
            .user_line()
            .is_some_and(|l| l.contains("stopped responding")));
        let c = EndReason::TargetClosed("connection reset by peer".into());
        assert_eq!(
            c.to_string(),
            "target closed the connection: connection reset by peer"
        );
        assert_eq!(
            EndReason::TargetClosed(String::new()).to_string(),
            "target closed the connection"
        );
        assert_eq!(EndReason::ClientClosed.user_line(), None);
        assert_eq!(EndReason::RecordingLost.side(), Side::Recorder);
        assert_eq!(EndReason::Shutdown.to_string(), "gateway shutting down");
    }
}
