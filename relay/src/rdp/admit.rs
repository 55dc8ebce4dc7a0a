//! Admission of a user NLA verified: the second factor (the TOTP code from the NTLM domain),
//! the access decision, the recording (fail closed) and the target login, in that order. Each
//! refusal is audited here; the caller turns it into a logon failure on the client.

use psm_control_api::{
    decide, now_ms, Account, Attempt, AuditKind, Escaped, Login, Protocol, RelayToControl, Target,
};
use psm_recorder_format::RecordingMeta;
use tracing::info;

use super::credssp::NlaLogin;
use super::session::{Fail, Phase, METHOD, METHOD_TOTP};
use super::target::{self, TargetLeg};
use crate::end::{Refusal, Side};
use crate::recording::Unstarted;
use crate::session::{logged_login, open_recording, MAX_REASON};
use crate::startups::UserPermit;

/// What an admitted login may use.
pub(super) struct Granted {
    pub(super) user: String,
    pub(super) target: Target,
    pub(super) account: Account,
    pub(super) rules: psm_control_api::RdpChannels,
    /// The reason the user gave (grants with `--reason-required`).
    pub(super) justification: Option<String>,
    /// What the login gave beyond the first factor.
    pub(super) satisfied: psm_control_api::Satisfied,
    pub(super) recording: Unstarted,
    pub(super) leg: TargetLeg,
    pub(super) user_permit: UserPermit,
}

impl Phase<'_> {
    /// The second factor, the decision, the recording and the target login.
    pub(super) async fn admit(&self, login: &NlaLogin) -> Result<Granted, Fail> {
        let text = login.login.as_str();
        let user = Login::user_part(text).to_string();
        let snap = self.ctx.policy.get();
        let parsed = Login::parse(text);
        let now = now_ms();
        let ip = self.peer.ip();
        let decision = parsed.as_ref().ok().map(|l| {
            decide(
                &snap,
                &Attempt {
                    user: &user,
                    account: &l.account,
                    target: &l.target,
                    source: ip,
                    now_ms: now,
                },
            )
        });
        let need_code = match &decision {
            Some(Ok(p)) => {
                p.mfa
                    && !p
                        .conditions()
                        .mfa_cache_ms
                        .is_some_and(|ms| self.ctx.mfa.cached(&user, ip, ms, now))
            }
            _ => snap.mfa_required,
        };
        // a second factor given now, or one the cache stands in for
        let mfa_given = need_code || matches!(&decision, Some(Ok(p)) if p.mfa);
        let mut method = METHOD;
        if need_code {
            method = METHOD_TOTP;
            let Some(code) = &login.code else {
                self.auth_failure(
                    text,
                    method,
                    "second factor missing: give the verification code as the domain (/d:123456)",
                    None,
                    true,
                );
                return Err(Fail);
            };
            let verdict = match snap.user(&user) {
                Some(u) => self.ctx.mfa.verify(u, code, now),
                None => Err(crate::mfa::MfaFailure::NotEnrolled),
            };
            match verdict {
                Ok(step) => {
                    self.ctx.audit.report(RelayToControl::MfaUsed {
                        user: user.clone(),
                        step,
                    });
                    self.ctx.mfa.remember(&user, ip, now);
                }
                Err(f) => {
                    self.auth_failure(text, method, f.reason(), None, true);
                    return Err(Fail);
                }
            }
        }
        let user_permit = match self.ctx.user_slots.admit(&user) {
            Ok(p) => p,
            Err(refusal) => {
                self.auth_failure(
                    text,
                    method,
                    &format!("connection refused: {refusal}"),
                    // a configured cap on connections: the policy's, not a failure
                    Some(Side::Policy),
                    false,
                );
                return Err(Fail);
            }
        };
        info!(peer = %self.peer, login = %Escaped(text), user = %Escaped(&user), method, protocol = "rdp", "authenticated");
        self.ctx.audit.emit(AuditKind::AuthSuccess {
            protocol: psm_control_api::Protocol::Rdp,
            login: logged_login(text),
            user: user.clone(),
            method: method.to_string(),
            source: self.source(),
        });
        let deny = |r: Refusal| {
            self.denied(text, &user, &r);
            Fail
        };
        let permit = match decision {
            Some(Ok(p)) => p,
            Some(Err(d)) => return Err(deny(Refusal::policy(&d))),
            None => {
                let why = parsed.err().map(|e| e.to_string()).unwrap_or_default();
                return Err(deny(Refusal::new(
                    Side::Client,
                    "malformed_login",
                    why,
                    format!(
                        "psm: malformed login '{}': use /u:<user>@<account>@<target>",
                        crate::escape_short(text)
                    ),
                )));
            }
        };
        let (target, account) = (permit.target.clone(), permit.account.clone());
        let conditions = permit.conditions().clone();
        if target.protocol != Protocol::Rdp {
            return Err(deny(Refusal::new(
                Side::Policy,
                "protocol_mismatch",
                format!(
                    "target {} is a {} target, not rdp",
                    target.name, target.protocol
                ),
                format!("psm: {} is not an RDP target", target.name),
            )));
        }
        let justification = if conditions.reason_required {
            match login.reason(need_code) {
                Some(r) => {
                    let (kept, _) = psm_control_api::escape::truncate(r, MAX_REASON);
                    Some(kept.to_string())
                }
                None => {
                    return Err(deny(Refusal::new(
                        Side::Client,
                        "reason_missing",
                        format!(
                            "the grant for {}@{} needs a reason and the domain field gave none",
                            account.username, target.name
                        ),
                        format!(
                            "psm: give a reason or ticket for {}@{} in the domain field (/d:\"CHG-42\"{})",
                            account.username,
                            target.name,
                            if need_code { ", after the code: /d:\"123456 CHG-42\"" } else { "" }
                        ),
                    )))
                }
            }
        } else {
            None
        };
        if let Some(rule) = conditions.approval.clone() {
            self.approval(&user, &account, &target, justification.clone(), rule)
                .await
                .map_err(deny)?;
        }
        // the recording is confirmed open before the target sees the login
        let meta = RecordingMeta {
            protocol: psm_recorder_format::wire::rdp::PROTOCOL.to_string(),
            recording_id: self.session_id.clone(),
            session_id: self.session_id.clone(),
            user: user.clone(),
            target: target.name.clone(),
            account: account.username.clone(),
            source: self.source(),
            start_ms: self.start_ms,
        };
        // discarded if this is dropped before the session starts (the connection phase
        // abandoned while the target is dialled, or later)
        let recording = Unstarted::new(
            open_recording(
                &self.ctx.recorder,
                conditions.unrecorded,
                snap.recording_required,
                meta,
            )
            .await
            .map_err(deny)?,
        );
        match target::connect(&target, &account).await {
            Ok(leg) => Ok(Granted {
                user: user.clone(),
                target,
                account,
                rules: conditions.rdp,
                satisfied: psm_control_api::Satisfied {
                    mfa: mfa_given,
                    reason: justification.is_some(),
                    approval: conditions.approval.is_some(),
                },
                justification,
                recording,
                leg,
                user_permit,
            }),
            Err(e) => {
                recording.discard().await;
                Err(deny(Refusal::new(
                    Side::Target,
                    e.code(),
                    format!("{}: {e}", target.name),
                    e.user_line(&target.name),
                )))
            }
        }
    }
}

impl Phase<'_> {
    /// Asks psm-control for an approval (or finds that an earlier one covers this login) and
    /// waits for the decision, holding the client's NLA meanwhile: the login grace time is
    /// suspended while the request is open, and its own timeout bounds the wait.
    async fn approval(
        &self,
        user: &str,
        account: &Account,
        target: &Target,
        justification: Option<String>,
        rule: psm_control_api::conditions::ApprovalRule,
    ) -> Result<(), Refusal> {
        use psm_control_api::{ApprovalOp, ApprovalState};
        let op = ApprovalOp::Request {
            user: user.to_string(),
            account: account.username.clone(),
            target: target.name.clone(),
            source: self.source(),
            justification,
            rule,
        };
        let reply = self
            .ctx
            .approvals
            .call(&self.ctx.audit, op)
            .await
            .map_err(|e| {
                Refusal::new(
                    Side::Control,
                    "approval_unavailable",
                    format!("approval request failed: psm-control did not answer: {e}"),
                    "psm: approvals are unavailable; try again later".into(),
                )
            })?;
        let request = match reply.request {
            Some(r) if matches!(r.state, ApprovalState::Approved { .. }) => return Ok(()),
            Some(r) => r,
            None => {
                return Err(Refusal::new(
                    Side::Policy,
                    "approval_refused",
                    format!("approval request refused: {}", reply.message),
                    format!("psm: {}", crate::escape_short(&reply.message)),
                ))
            }
        };
        let id = request.id;
        info!(peer = %self.peer, request = id, protocol = "rdp", "waiting for approval");
        let watch = self.ctx.approvals.watch(id);
        self.awaiting
            .store(true, std::sync::atomic::Ordering::Release);
        let decided = self
            .ctx
            .approvals
            .decided(id, watch, request.expires_ms)
            .await;
        self.awaiting
            .store(false, std::sync::atomic::Ordering::Release);
        match decided.map(|r| r.state) {
            Some(ApprovalState::Approved { by }) => {
                info!(peer = %self.peer, request = id, by = %Escaped(&by.join(",")), protocol = "rdp", "access request approved");
                Ok(())
            }
            Some(ApprovalState::Denied { by, reason }) => Err(Refusal::new(
                Side::Policy,
                "approval_denied",
                format!("approval request {id} denied by {by}"),
                format!(
                    "psm: request {id} was denied by {}{}",
                    crate::escape_short(&by),
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", crate::escape_short(&reason))
                    }
                ),
            )),
            _ => Err(Refusal::new(
                Side::Policy,
                "approval_timeout",
                format!("approval request {id} timed out"),
                format!("psm: request {id} was not approved in time"),
            )),
        }
    }
}
