//! The daemon's governance requests (groups, user state, MFA enrolment, live kill, policy
//! questions) and what it does with the relays' authentication reports (lockout, TOTP replay,
//! password rehash).

use std::net::IpAddr;

use psm_control_api::policy::{self, covering_grants, user_usable, Attempt};
use psm_control_api::{encode_line, now_ms, AuditKind, ControlToRelay, Login, PolicySnapshot};
use tracing::{error, info, warn};

use super::requests::removed_suffix;
use super::{lock, Actor, Shared};
use crate::protocol::{Changed, MfaEnrolment, PolicyAnswer, Reach, Request, Response};
use crate::store::StoreError;

/// The failed logins the lockout counts: a wrong secret (password, key signature, code), not a
/// key an agent offered, a rate-limited attempt or a refused approval.
fn counts_toward_lockout(reason: &str) -> bool {
    matches!(
        reason,
        "wrong password"
            | "wrong verification code"
            | "verification code already used"
            | "malformed verification code"
    )
}

/// A fresh TOTP secret: 20 random bytes (RFC 4226's recommended length), base32.
fn new_totp_secret() -> Result<String, String> {
    use ring::rand::SecureRandom as _;
    let mut raw = zeroize::Zeroizing::new([0u8; 20]);
    ring::rand::SystemRandom::new()
        .fill(&mut raw[..])
        .map_err(|_| "system random source failed".to_string())?;
    Ok(totp_rs::Secret::Raw(raw.to_vec()).to_encoded().to_string())
}

/// The `otpauth://` URI authenticator apps read.
pub fn otpauth_uri(user: &str, secret_b32: &str) -> Result<String, String> {
    let raw = totp_rs::Secret::Encoded(secret_b32.to_string())
        .to_bytes()
        .map_err(|e| format!("bad TOTP secret: {e:?}"))?;
    let totp = totp_rs::TOTP::new_unchecked(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        raw,
        Some("psm".into()),
        user.to_string(),
    );
    Ok(totp.get_url())
}

impl Shared {
    /// The snapshot as relays get it, for the policy questions.
    fn current_snapshot(&self) -> Result<PolicySnapshot, StoreError> {
        let mut snap = lock(&self.store).snapshot(&self.vault)?;
        snap.mfa_required = self.options.mfa_required;
        Ok(snap)
    }

    /// Answers the governance requests; gives the others back.
    // The request given back is moved, not copied: its size does not matter.
    #[allow(clippy::result_large_err)]
    pub(super) fn handle_governance(
        &self,
        req: Request,
        actor: &Actor,
    ) -> Result<Response, Request> {
        Ok(match req {
            Request::UserDisable { name, disabled } => {
                let action = if disabled {
                    "user disable"
                } else {
                    "user enable"
                };
                self.change(actor, action, name.clone(), |s, _| {
                    let v = s.set_disabled(&name, disabled)?;
                    Ok((
                        v,
                        format!(
                            "{} user {name}",
                            if disabled { "disabled" } else { "enabled" }
                        ),
                    ))
                })
            }
            Request::UserUnlock { name } => {
                self.change(actor, "user unlock", name.clone(), |s, _| {
                    Ok((s.unlock(&name)?, format!("unlocked user {name}")))
                })
            }
            Request::UserMfaEnroll { name } => {
                let secret = match new_totp_secret() {
                    Ok(s) => zeroize::Zeroizing::new(s),
                    Err(e) => return Ok(Response::error(e)),
                };
                let uri = match otpauth_uri(&name, &secret) {
                    Ok(u) => u,
                    Err(e) => return Ok(Response::error(e)),
                };
                let resp = self.change(actor, "user mfa enroll", name.clone(), |s, _| {
                    Ok((
                        s.set_totp(&self.vault, &name, &secret)?,
                        format!("enrolled user {name} for TOTP"),
                    ))
                });
                if !resp.ok {
                    return Ok(resp);
                }
                let version = resp
                    .result
                    .get("version")
                    .and_then(|v| v.as_u64())
                    .unwrap_or_default();
                Response::ok(&MfaEnrolment { version, uri })
            }
            Request::UserMfaReset { name } => {
                self.change(actor, "user mfa reset", name.clone(), |s, _| {
                    Ok((
                        s.reset_totp(&name)?,
                        format!("removed the TOTP enrolment of {name}"),
                    ))
                })
            }
            Request::GroupAdd { name, targets } => {
                let (action, what) = if targets {
                    ("target-group add", "target group")
                } else {
                    ("group add", "group")
                };
                self.change(actor, action, format!("@{name}"), |s, _| {
                    let v = if targets {
                        s.add_target_group(&name)?
                    } else {
                        s.add_group(&name)?
                    };
                    Ok((v, format!("added {what} @{name}")))
                })
            }
            Request::GroupRemove { name, targets } => {
                let (action, what) = if targets {
                    ("target-group remove", "target group")
                } else {
                    ("group remove", "group")
                };
                self.change(actor, action, format!("@{name}"), |s, _| {
                    let r = if targets {
                        s.remove_target_group(&name)?
                    } else {
                        s.remove_group(&name)?
                    };
                    Ok((
                        r.version,
                        format!("removed {what} @{name}{}", removed_suffix(&r)),
                    ))
                })
            }
            Request::GroupList { targets } => {
                if targets {
                    self.read(|s| s.list_target_groups())
                } else {
                    self.read(|s| s.list_groups())
                }
            }
            Request::GroupMember {
                group,
                member,
                add,
                targets,
            } => {
                let action = match (targets, add) {
                    (false, true) => "group member add",
                    (false, false) => "group member remove",
                    (true, true) => "target-group member add",
                    (true, false) => "target-group member remove",
                };
                let object = format!("{member} in @{group}");
                self.change(actor, action, object, |s, _| {
                    let v = if targets {
                        s.target_group_member(&group, &member, add)?
                    } else {
                        s.group_member(&group, &member, add)?
                    };
                    Ok((
                        v,
                        if add {
                            format!("added {member} to @{group}")
                        } else {
                            format!("removed {member} from @{group}")
                        },
                    ))
                })
            }
            Request::SessionKill { session_id, reason } => self.kill(actor, session_id, reason),
            Request::CommandRuleAdd {
                scope,
                pattern,
                action,
            } => {
                let object = format!("{scope}: {action} {pattern:?}");
                self.change(actor, "command-rule add", object.clone(), |s, obj| {
                    let (v, id) = s.add_command_rule(&scope, &pattern, action)?;
                    *obj = format!("{id} ({object})");
                    Ok((v, format!("added command rule {id}: {object}")))
                })
            }
            Request::CommandRuleRemove { id } => {
                self.change(actor, "command-rule remove", id.to_string(), |s, _| {
                    Ok((
                        s.remove_command_rule(id)?,
                        format!("removed command rule {id}"),
                    ))
                })
            }
            Request::CommandRuleList => self.read(|s| s.list_command_rules()),
            Request::RequestsList => Response::ok(&self.approvals_list()),
            Request::PolicyExport => self.read(|s| s.export()),
            Request::PolicyImport {
                doc,
                dry_run,
                force,
            } => {
                if dry_run {
                    return Ok(self.read(|s| {
                        // a dry run reads; it never writes (the import rolls nothing back)
                        let mut copy = crate::store::Store::open(s.path())?;
                        copy.import(&doc, true, force)
                    }));
                }
                let mut report = None;
                let object = format!(
                    "{} users, {} targets, {} grants, {} command rules",
                    doc.users.len(),
                    doc.targets.len(),
                    doc.grants.len(),
                    doc.command_rules.len()
                );
                let resp = self.change(actor, "policy import", object, |s, obj| {
                    let r = s.import(&doc, false, force)?;
                    if !r.applied {
                        // nothing to change: say so without a new version
                        report = Some(r.clone());
                        return Err(StoreError::Conflict("NOCHANGE".into()));
                    }
                    obj.push_str(&format!(": {}", r.changes.join("; ")));
                    let v = r.version;
                    report = Some(r);
                    Ok((v, "imported".into()))
                });
                match (resp.ok, report) {
                    (true, Some(r)) => Response::ok(&r),
                    (false, Some(r)) if !r.applied => Response::ok(&r),
                    _ => resp,
                }
            }
            Request::PolicyCheck {
                user,
                account,
                target,
                from,
                at_ms,
            } => {
                let source: IpAddr = match from.as_deref().unwrap_or("127.0.0.1").parse() {
                    Ok(ip) => ip,
                    Err(_) => {
                        return Ok(Response::error(format!(
                            "--from {}: not an IP address",
                            psm_control_api::escape(from.as_deref().unwrap_or_default())
                        )))
                    }
                };
                let snap = match self.current_snapshot() {
                    Ok(s) => s,
                    Err(e) => return Ok(Response::error(e.to_string())),
                };
                let attempt = Attempt {
                    user: &user,
                    account: &account,
                    target: &target,
                    source,
                    now_ms: at_ms.unwrap_or_else(now_ms),
                };
                let answer = match policy::decide(&snap, &attempt) {
                    Ok(p) => {
                        let mut conditions = p.conditions().describe();
                        if p.mfa && !p.conditions().mfa {
                            conditions.push("mfa (required globally)".into());
                        }
                        PolicyAnswer {
                            allowed: true,
                            grant: Some(format!(
                                "{} -> {}@{}",
                                p.grant.user, p.grant.account, p.grant.target
                            )),
                            via: Some(p.via.to_string()),
                            conditions,
                            reason: None,
                            code: None,
                        }
                    }
                    Err(d) => PolicyAnswer {
                        allowed: false,
                        grant: None,
                        via: None,
                        conditions: Vec::new(),
                        reason: Some(d.to_string()),
                        code: Some(d.code().into()),
                    },
                };
                Response::ok(&answer)
            }
            Request::WhoCanReach { account, target } => {
                let snap = match self.current_snapshot() {
                    Ok(s) => s,
                    Err(e) => return Ok(Response::error(e.to_string())),
                };
                let Some(t) = snap.targets.iter().find(|t| t.name == target) else {
                    return Ok(Response::error(format!("unknown target '{target}'")));
                };
                if !snap
                    .accounts
                    .iter()
                    .any(|a| a.target == target && a.username == account)
                {
                    return Ok(Response::error(format!(
                        "unknown account '{account}@{target}'"
                    )));
                }
                let now = now_ms();
                let mut out = Vec::new();
                for u in &snap.users {
                    for (g, via) in covering_grants(&snap, u, &account, t) {
                        out.push(Reach {
                            user: u.name.clone(),
                            grant: format!("{} -> {}@{}", g.user, g.account, g.target),
                            via: via.to_string(),
                            conditions: g.conditions.describe(),
                            blocked: user_usable(&snap, &u.name, now)
                                .err()
                                .map(|d| d.to_string()),
                        });
                    }
                }
                Response::ok(&out)
            }
            other => return Err(other),
        })
    }

    /// `psmctl sessions kill`: tells every relay; the one running the session ends it.
    fn kill(&self, actor: &Actor, session_id: String, reason: Option<String>) -> Response {
        let relay = lock(&self.sessions)
            .get(&session_id)
            .filter(|s| s.lost.is_none())
            .map(|s| s.info.relay.clone());
        let Some(relay) = relay else {
            return Response::error(format!(
                "no live session '{}'",
                psm_control_api::escape(&session_id)
            ));
        };
        let who = match &actor.name {
            Some(n) => format!("{n} (uid {})", actor.uid),
            None => format!("uid {}", actor.uid),
        };
        let reason = reason
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "ended by an operator".into());
        let line = std::sync::Arc::new(encode_line(&ControlToRelay::Kill {
            session_id: session_id.clone(),
            reason: reason.clone(),
            actor: who,
        }));
        // kept until the session ends, for a relay that misses the broadcast
        if let Some(s) = lock(&self.sessions).get_mut(&session_id) {
            s.kill = Some(line.clone());
        }
        let _ = self.kills.send(line);
        if let Err(e) = lock(&self.audit).append_control(AuditKind::AdminChange {
            action: "session kill".into(),
            object: format!("{session_id} ({reason})"),
            actor_uid: Some(actor.uid),
            actor: actor.name.clone(),
        }) {
            error!(error = %e, "session kill not audited");
        }
        info!(session = %session_id, %relay, "session kill sent");
        Response::ok(&Changed {
            version: self.snapshot.borrow().version,
            message: format!("kill sent to relay {relay} for session {session_id}"),
        })
    }

    /// Publishes after a change made on a relay's behalf (no psmctl actor).
    fn publish_locked(
        &self,
        what: &str,
        f: impl FnOnce(&mut crate::store::Store) -> Result<Option<u64>, StoreError>,
    ) {
        let mut store = lock(&self.store);
        match f(&mut store) {
            Ok(Some(_)) => {
                if let Err(e) = self.publish(&mut store) {
                    error!(what, error = %e, "snapshot not built");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(what, error = %e, "cannot record"),
        }
    }

    /// What the daemon does with a relay's authentication events, before they are logged:
    /// failures count towards the lockout, a success clears them.
    pub(super) fn auth_event(&self, kind: &AuditKind) {
        match kind {
            AuditKind::AuthFailure { login, reason, .. } if counts_toward_lockout(reason) => {
                let user = Login::user_part(login).to_string();
                let lockout = self.options.lockout;
                let mut locked = None;
                self.publish_locked("auth failure", |s| {
                    let r = s.auth_failed(&user, now_ms(), lockout)?;
                    locked = r.map(|(_, until)| until);
                    Ok(r.map(|(v, _)| v))
                });
                if let Some(until) = locked {
                    warn!(user = %psm_control_api::escape(&user), "user locked after repeated failed logins");
                    let _ = lock(&self.audit).append_control(AuditKind::Notice {
                        message: format!(
                            "user '{}' locked until {} after {} failed logins within {}",
                            psm_control_api::escape(&user),
                            psm_control_api::conditions::format_time(until),
                            lockout.max_failures,
                            psm_control_api::conditions::format_duration(lockout.window_ms)
                        ),
                        session_id: None,
                        kind: Some("user locked".into()),
                        count: None,
                    });
                }
            }
            AuditKind::AuthSuccess { user, method, .. } => {
                // `password+totp`, `publickey+totp`, and RDP's method with a code
                let second = method.contains("totp");
                if let Err(e) = lock(&self.store).auth_succeeded(user, second) {
                    warn!(error = %e, "cannot clear failed logins");
                }
            }
            _ => {}
        }
    }

    /// A relay accepted a TOTP code: remember its step so it is never accepted again.
    pub(super) fn mfa_used(&self, user: &str, step: u64) {
        self.publish_locked("totp used", |s| s.totp_used(user, step));
    }

    /// A relay rehashed a legacy password verifier.
    pub(super) fn rehash(
        &self,
        user: &str,
        old: &psm_control_api::PasswordHash,
        new: &psm_control_api::PasswordHash,
    ) {
        self.publish_locked("password rehash", |s| s.rehash(user, old, new));
        info!(user = %psm_control_api::escape(user), "legacy password verifier replaced by argon2id");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_uri_is_what_authenticators_read() {
        let secret = new_totp_secret().expect("secret");
        assert_eq!(secret.len(), 32, "20 bytes in base32");
        let uri = otpauth_uri("alice", &secret).expect("uri");
        assert!(uri.starts_with("otpauth://totp/psm:alice?secret="), "{uri}");
        assert!(uri.contains(&secret) && uri.contains("issuer=psm"), "{uri}");
    }
}
