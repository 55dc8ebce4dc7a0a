//! Dual control in psm-control: the open access requests, the votes, the approvals that cover
//! later sessions, and expiry. Relays ask over `policy.sock` ([`RelayToControl::Approval`](psm_control_api::RelayToControl::Approval));
//! every change is audited and broadcast to the relays ([`ControlToRelay::ApprovalUpdate`]).

use std::collections::{BTreeMap, HashSet};

use psm_control_api::{
    encode_line, now_ms, ApprovalOp, ApprovalReply, ApprovalRequest, ApprovalState, AuditKind,
    ControlToRelay,
};
use tracing::{error, info};

use super::{lock, Shared};

/// Requests kept once decided, for `requests list` (the newest).
const KEEP_DECIDED: usize = 256;

/// The open requests and the approvals that still cover later sessions.
#[derive(Default)]
pub(super) struct Approvals {
    next_id: u64,
    requests: BTreeMap<u64, (ApprovalRequest, HashSet<String>)>,
    /// (user, account, target, until_ms)
    covers: Vec<(String, String, String, u64)>,
    /// How long each request's approval covers later sessions, ms.
    covers_ms: std::collections::HashMap<u64, u64>,
}

impl Shared {
    fn audit_approval(
        &self,
        r: &ApprovalRequest,
        action: &str,
        by: Option<String>,
        reason: Option<String>,
    ) {
        if let Err(e) = lock(&self.audit).append_control(AuditKind::Approval {
            request: r.id,
            action: action.to_string(),
            user: r.user.clone(),
            account: r.account.clone(),
            target: r.target.clone(),
            by,
            reason,
        }) {
            error!(error = %e, "approval not audited");
        }
    }

    fn broadcast(&self, msg: &ControlToRelay) {
        let _ = self.kills.send(std::sync::Arc::new(encode_line(msg)));
    }

    /// Whether `user` belongs to group `group`, by the store.
    fn in_group(&self, user: &str, group: &str) -> bool {
        lock(&self.store)
            .list_groups()
            .map(|gs| {
                gs.iter()
                    .any(|g| g.name == group && g.members.iter().any(|m| m == user))
            })
            .unwrap_or(false)
    }

    /// Answers one relay's approval operation.
    pub(super) fn approval(&self, relay_id: &str, corr: u64, op: ApprovalOp) {
        let reply = self.approval_op(op);
        self.broadcast(&ControlToRelay::ApprovalReply {
            relay_id: relay_id.to_string(),
            corr,
            reply,
        });
    }

    fn approval_op(&self, op: ApprovalOp) -> ApprovalReply {
        let now = now_ms();
        match op {
            ApprovalOp::Request {
                user,
                account,
                target,
                source,
                justification,
                rule,
            } => {
                let mut a = lock(&self.approvals);
                a.covers.retain(|c| c.3 > now);
                // ids stay unique across restarts of psm-control: they start from the clock
                a.next_id = a.next_id.max(now / 1000 * 1000) + 1;
                let id = a.next_id;
                let covered = a
                    .covers
                    .iter()
                    .any(|c| c.0 == user && c.1 == account && c.2 == target);
                let r = ApprovalRequest {
                    id,
                    user,
                    account,
                    target,
                    source,
                    justification,
                    approvers: rule.approvers.clone(),
                    needed: rule.count,
                    created_ms: now,
                    expires_ms: now.saturating_add(rule.timeout_ms),
                    state: if covered {
                        ApprovalState::Approved { by: Vec::new() }
                    } else {
                        ApprovalState::Pending {
                            approvals: Vec::new(),
                        }
                    },
                };
                if !covered {
                    a.requests.insert(id, (r.clone(), HashSet::new()));
                    // how long an approval covers later sessions, granted on approval
                    a.covers_ms.insert(id, rule.covers_ms);
                }
                drop(a);
                self.audit_approval(
                    &r,
                    if covered { "covered" } else { "requested" },
                    None,
                    r.justification.clone(),
                );
                info!(request = id, user = %psm_control_api::escape(&r.user), covered, "approval requested");
                let message = if covered {
                    "covered by an earlier approval".to_string()
                } else {
                    format!(
                        "waiting for approval of request {id} ({} of @{} needed)",
                        r.needed, r.approvers
                    )
                };
                ApprovalReply {
                    ok: true,
                    message,
                    request: Some(r),
                    list: Vec::new(),
                }
            }
            ApprovalOp::List { user } => {
                let a = lock(&self.approvals);
                let list = a
                    .requests
                    .values()
                    .map(|(r, _)| r.clone())
                    .filter(|r| !r.state.is_final() && r.user != user)
                    .collect::<Vec<_>>();
                drop(a);
                let list: Vec<ApprovalRequest> = list
                    .into_iter()
                    .filter(|r| self.in_group(&user, &r.approvers))
                    .collect();
                ApprovalReply {
                    ok: true,
                    message: format!("{} pending request(s)", list.len()),
                    request: None,
                    list,
                }
            }
            ApprovalOp::Vote {
                user,
                id,
                approve,
                reason,
            } => self.vote(&user, id, approve, reason),
        }
    }

    fn vote(&self, user: &str, id: u64, approve: bool, reason: Option<String>) -> ApprovalReply {
        let refuse = |m: String| ApprovalReply {
            ok: false,
            message: m,
            ..ApprovalReply::default()
        };
        let approvers = {
            let a = lock(&self.approvals);
            match a.requests.get(&id) {
                None => return refuse(format!("no request {id}")),
                Some((r, _)) if r.state.is_final() => {
                    return refuse(format!("request {id} is already decided"))
                }
                Some((r, _)) if r.user == user => {
                    return refuse("you cannot decide your own request".into())
                }
                Some((r, voted)) if voted.contains(user) => {
                    return refuse(format!("you already voted on request {id} ({})", r.user))
                }
                Some((r, _)) => r.approvers.clone(),
            }
        };
        if !self.in_group(user, &approvers) {
            return refuse(format!(
                "you are not in @{approvers}, who decide request {id}"
            ));
        }
        let reason = reason
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty());
        let mut a = lock(&self.approvals);
        let r = match record_vote(&mut a, user, id, approve, reason.clone(), now_ms()) {
            Ok(r) => r,
            Err(m) => return refuse(m),
        };
        prune(&mut a);
        drop(a);
        self.audit_approval(
            &r,
            if approve { "approve" } else { "deny" },
            Some(user.to_string()),
            reason,
        );
        match &r.state {
            ApprovalState::Approved { by } => {
                self.audit_approval(&r, "approved", Some(by.join(",")), None)
            }
            ApprovalState::Denied { by, reason } => {
                self.audit_approval(&r, "denied", Some(by.clone()), Some(reason.clone()))
            }
            _ => {}
        }
        self.broadcast(&ControlToRelay::ApprovalUpdate(r.clone()));
        ApprovalReply {
            ok: true,
            message: match &r.state {
                ApprovalState::Approved { .. } => format!("request {id} approved"),
                ApprovalState::Denied { .. } => format!("request {id} denied"),
                ApprovalState::Pending { approvals } => format!(
                    "approval recorded for request {id} ({} of {})",
                    approvals.len(),
                    r.needed
                ),
                ApprovalState::Expired => format!("request {id} expired"),
            },
            request: Some(r),
            list: Vec::new(),
        }
    }

    /// Expires the requests nobody decided in time.
    pub(super) fn approvals_sweep(&self) {
        let now = now_ms();
        let expired: Vec<ApprovalRequest> = {
            let mut a = lock(&self.approvals);
            let mut out = Vec::new();
            for (r, _) in a.requests.values_mut() {
                if !r.state.is_final() && r.expires_ms <= now {
                    r.state = ApprovalState::Expired;
                    out.push(r.clone());
                }
            }
            prune(&mut a);
            out
        };
        for r in expired {
            self.audit_approval(&r, "expired", None, None);
            self.broadcast(&ControlToRelay::ApprovalUpdate(r));
        }
    }

    /// Every request, for `psmctl requests list`.
    pub(super) fn approvals_list(&self) -> Vec<ApprovalRequest> {
        lock(&self.approvals)
            .requests
            .values()
            .map(|(r, _)| r.clone())
            .collect()
    }
}

/// Forgets the oldest decided requests beyond [`KEEP_DECIDED`].
/// Records `user`'s vote on request `id` under the approvals' lock, checking again what the
/// caller checked before it let the lock go (the request is open; this approver has not voted:
/// two votes of one approver racing on two connections count once); returns the request as
/// it now stands. Approval reaches the count: approved, and any covering approval starts.
fn record_vote(
    a: &mut Approvals,
    user: &str,
    id: u64,
    approve: bool,
    reason: Option<String>,
    now: u64,
) -> Result<ApprovalRequest, String> {
    let Some((r, voted)) = a.requests.get_mut(&id) else {
        return Err(format!("no request {id}"));
    };
    if r.state.is_final() {
        return Err(format!("request {id} is already decided"));
    }
    if r.user == user {
        return Err("you cannot decide your own request".into());
    }
    if !voted.insert(user.to_string()) {
        return Err(format!("you already voted on request {id} ({})", r.user));
    }
    if approve {
        if let ApprovalState::Pending { approvals } = &mut r.state {
            approvals.push(user.to_string());
            if approvals.len() as u32 >= r.needed {
                r.state = ApprovalState::Approved {
                    by: approvals.clone(),
                };
            }
        }
    } else {
        r.state = ApprovalState::Denied {
            by: user.to_string(),
            reason: reason.unwrap_or_default(),
        };
    }
    let r = r.clone();
    if let ApprovalState::Approved { .. } = r.state {
        let covers = a.covers_ms.get(&id).copied().unwrap_or(0);
        if covers > 0 {
            a.covers.push((
                r.user.clone(),
                r.account.clone(),
                r.target.clone(),
                now.saturating_add(covers),
            ));
        }
    }
    Ok(r)
}

fn prune(a: &mut Approvals) {
    let decided: Vec<u64> = a
        .requests
        .iter()
        .filter(|(_, (r, _))| r.state.is_final())
        .map(|(id, _)| *id)
        .collect();
    if decided.len() > KEEP_DECIDED {
        for id in &decided[..decided.len() - KEEP_DECIDED] {
            a.requests.remove(id);
            a.covers_ms.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approvals(needed: u32, covers_ms: u64) -> Approvals {
        let mut a = Approvals::default();
        a.requests.insert(
            7,
            (
                ApprovalRequest {
                    id: 7,
                    user: "alice".into(),
                    account: "root".into(),
                    target: "db01".into(),
                    source: "192.0.2.1:40000".into(),
                    justification: None,
                    approvers: "ops".into(),
                    needed,
                    created_ms: 1_000,
                    expires_ms: 601_000,
                    state: ApprovalState::Pending { approvals: vec![] },
                },
                HashSet::new(),
            ),
        );
        a.covers_ms.insert(7, covers_ms);
        a
    }

    #[test]
    fn one_approver_counts_once_and_a_decided_request_stays_decided() {
        // bob's two votes, as two connections racing past the first check would cast them
        let mut a = approvals(2, 60_000);
        let r = record_vote(&mut a, "bob", 7, true, None, 2_000).expect("first vote");
        assert_eq!(
            r.state,
            ApprovalState::Pending {
                approvals: vec!["bob".into()]
            }
        );
        let again = record_vote(&mut a, "bob", 7, true, None, 2_000);
        assert!(
            again.as_ref().is_err_and(|m| m.contains("already voted")),
            "{again:?}"
        );
        assert!(a.covers.is_empty(), "no covering approval from one vote");
        let r = record_vote(&mut a, "carol", 7, true, None, 3_000).expect("second approver");
        assert_eq!(
            r.state,
            ApprovalState::Approved {
                by: vec!["bob".into(), "carol".into()]
            }
        );
        assert_eq!(a.covers.len(), 1);
        // a late deny does not overturn it, nor does the requester decide
        let late = record_vote(&mut a, "dave", 7, false, Some("no".into()), 4_000);
        assert!(
            late.as_ref().is_err_and(|m| m.contains("already decided")),
            "{late:?}"
        );
        let mut b = approvals(1, 0);
        let own = record_vote(&mut b, "alice", 7, true, None, 2_000);
        assert!(own.is_err(), "{own:?}");
        assert!(record_vote(&mut b, "bob", 8, true, None, 2_000).is_err());
    }
}
