//! Dual control: the requests a session waits on, and the messages that carry them between
//! the relays and psm-control (which keeps them and counts the votes).

use serde::{Deserialize, Serialize};

use crate::conditions::ApprovalRule;

/// Where a request stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for votes.
    Pending {
        /// Who approved so far.
        approvals: Vec<String>,
    },
    /// Enough approvals.
    Approved {
        /// Who approved.
        by: Vec<String>,
    },
    /// Someone denied it.
    Denied {
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
    /// Nobody decided in time.
    Expired,
}

impl ApprovalState {
    /// Whether the request is decided (approved, denied or expired).
    pub fn is_final(&self) -> bool {
        !matches!(self, ApprovalState::Pending { .. })
    }
}

/// One access request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// Request id (what approvers name).
    pub id: u64,
    /// The requesting psm user.
    pub user: String,
    /// Account asked for.
    pub account: String,
    /// Target asked for.
    pub target: String,
    /// The client's address.
    pub source: String,
    /// The reason the user gave, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// The group whose members may approve.
    pub approvers: String,
    /// Approvals needed.
    pub needed: u32,
    /// When it was made, ms since the epoch.
    pub created_ms: u64,
    /// When it expires.
    pub expires_ms: u64,
    /// Where it stands.
    #[serde(flatten)]
    pub state: ApprovalState,
}

/// What a relay asks psm-control about approvals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ApprovalOp {
    /// A session needs approval (answered at once when an earlier approval still covers it).
    Request {
        /// psm user.
        user: String,
        /// Account.
        account: String,
        /// Target.
        target: String,
        /// Client address.
        source: String,
        /// The user's reason.
        #[serde(default)]
        justification: Option<String>,
        /// The grant's rule.
        rule: ApprovalRule,
    },
    /// The requests `user` may decide.
    List {
        /// The approver.
        user: String,
    },
    /// `user` approves or denies request `id`.
    Vote {
        /// The approver.
        user: String,
        /// Request id.
        id: u64,
        /// Approve (true) or deny.
        approve: bool,
        /// The reason given.
        #[serde(default)]
        reason: Option<String>,
    },
}

/// psm-control's answer to one [`ApprovalOp`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalReply {
    /// Whether the operation was done.
    pub ok: bool,
    /// What to tell the user.
    pub message: String,
    /// The request concerned (Request, Vote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<ApprovalRequest>,
    /// The requests listed (List).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub list: Vec<ApprovalRequest>,
}
