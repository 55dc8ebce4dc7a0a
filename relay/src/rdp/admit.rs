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
use crate::recording::RecordingStream;
use crate::session::{logged_login, RECORDING_UNAVAILABLE};
use crate::startups::UserPermit;

/// What an admitted login may use.
pub(super) struct Granted {
    pub(super) user: String,
    pub(super) target: Target,
    pub(super) account: Account,
    pub(super) rules: psm_control_api::RdpChannels,
    pub(super) recording: Option<RecordingStream>,
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
                    Some(Side::Internal),
                    false,
                );
                return Err(Fail);
            }
        };
        info!(peer = %self.peer, login = %Escaped(text), user = %Escaped(&user), method, protocol = "rdp", "authenticated");
        self.ctx.audit.emit(AuditKind::AuthSuccess {
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
        if conditions.approval.is_some() {
            return Err(deny(Refusal::new(
                Side::Policy,
                "approval_unsupported",
                format!(
                    "the grant for {}@{} needs an approval, which RDP logins cannot ask for yet",
                    account.username, target.name
                ),
                "psm: this account needs an approval; request it over SSH first".into(),
            )));
        }
        if conditions.reason_required {
            return Err(deny(Refusal::new(
                Side::Policy,
                "reason_unsupported",
                format!(
                    "the grant for {}@{} needs a reason, which RDP logins cannot give yet",
                    account.username, target.name
                ),
                "psm: this account needs a reason, which RDP cannot give yet".into(),
            )));
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
        let recording = match self.ctx.recorder.open(meta).await {
            Ok(r) => Some(r),
            Err(e) if snap.recording_required => {
                return Err(deny(Refusal::new(
                    Side::Recorder,
                    "recording_unavailable",
                    format!("session recording unavailable: {e}"),
                    RECORDING_UNAVAILABLE.into(),
                )));
            }
            Err(e) => {
                tracing::debug!(error = %e, "recording not required; the session runs unrecorded");
                None
            }
        };
        match target::connect(&target, &account).await {
            Ok(leg) => Ok(Granted {
                user: user.clone(),
                target,
                account,
                rules: conditions.rdp,
                recording,
                leg,
                user_permit,
            }),
            Err(e) => {
                if let Some(rec) = recording {
                    rec.discard().await;
                }
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
