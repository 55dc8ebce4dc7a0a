//! The login dialogue after the first factor: the target menu (a login without a target), the
//! TOTP second factor and the reason the grant may ask for, all through SSH
//! keyboard-interactive, so stock OpenSSH (also with SSH_ASKPASS), PuTTY and library clients
//! answer them. Each step is asked only when the policy wants it; the dialogue then accepts
//! the login as if the user had named `user@account@target`.

use std::borrow::Cow;

use psm_control_api::{decide, now_ms, AuditKind, Escaped, Login, RelayToControl};
use russh::server::Auth;

use crate::end::Side;
use tracing::{debug, info};

use super::{logged_login, reject, second_factor, Conn, Counters};

/// Verification codes one connection may try.
pub(super) const MAX_MFA_TRIES: u32 = 3;
/// Longest reason kept.
pub const MAX_REASON: usize = 512;
/// The menu prompt.
pub const MENU_PROMPT: &str = "psm: choose an account (number): ";

/// What the dialogue still has to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// Which account (a login without a target).
    Menu(Vec<(String, String)>),
    /// The TOTP code.
    Code,
    /// The reason or ticket.
    Reason,
    /// Dual control: the request (None until it is made).
    Approval(Option<u64>),
    /// The login is refused: the message is shown, then the refusal.
    Refused(String),
}

/// A login between its first factor and its acceptance.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    /// The login string the client sent.
    pub login: String,
    /// psm user.
    pub user: String,
    /// The first factor (`publickey`, `password`).
    pub first: &'static str,
    /// The account chosen from the menu, or named in the login.
    pub chosen: Option<(String, String)>,
    /// The second factor passed.
    pub mfa_done: bool,
    /// Dual control passed.
    pub approved: bool,
    /// The step asked now.
    pub stage: Option<Stage>,
}

impl Conn {
    /// Refuses any attempt while the source or the user is over the rate limit, and users
    /// that are disabled or locked (with the same refusal as a wrong password).
    pub(super) fn refused_early(&self, login: &str, method: &str) -> Option<Auth> {
        let user = Login::user_part(login);
        let now = now_ms();
        if self.ctx.throttle.limited(self.shared.peer.ip(), user, now) {
            Counters::bump(&self.ctx.counters.auth_failures);
            info!(peer = %self.shared.peer, login = %Escaped(&logged_login(login)), method, "authentication rate limited");
            self.ctx.audit.emit(AuditKind::AuthFailure {
                protocol: psm_control_api::Protocol::Ssh,
                login: logged_login(login),
                method: method.to_string(),
                source: self.source(),
                reason: "rate limited: too many failed logins from this address or for this user"
                    .into(),
                side: String::new(),
            });
            return Some(reject());
        }
        if let Err(d) = psm_control_api::policy::user_usable(&self.ctx.policy.get(), user, now) {
            let why = match d {
                psm_control_api::Denial::UserLocked { .. } => "locked",
                psm_control_api::Denial::UserDisabled { .. } => "disabled",
                _ => return None,
            };
            self.auth_failed(login, method, why);
            return Some(reject());
        }
        None
    }

    /// The first factor passed: accept, or start the dialogue for what the policy still wants.
    pub(super) fn first_factor(&mut self, login: &str, user: &str, method: &'static str) -> Auth {
        let chosen = Login::parse(login).ok().map(|l| (l.account, l.target));
        let plain = !login.contains('@') || (chosen.is_none() && login == user);
        self.pending = Some(Pending {
            login: login.to_string(),
            user: user.to_string(),
            first: method,
            chosen: if plain { None } else { chosen },
            mfa_done: false,
            approved: false,
            stage: None,
        });
        if !plain && self.pending.as_ref().is_some_and(|p| p.chosen.is_none()) {
            // a malformed login: accepted, and told why on its first channel
            self.pending = None;
            return self.auth_ok(login, user, method);
        }
        match self.next_stage() {
            None => self.finish_dialogue(),
            Some(stage) => {
                debug!(peer = %self.shared.peer, user = %Escaped(user), ?stage, "first factor passed; keyboard-interactive follows");
                if let Some(p) = &mut self.pending {
                    p.stage = Some(stage);
                }
                Auth::Reject {
                    proceed_with_methods: Some(second_factor()),
                    partial_success: true,
                }
            }
        }
    }

    /// What still has to be asked, given what was answered.
    fn next_stage(&self) -> Option<Stage> {
        let p = self.pending.as_ref()?;
        let snap = self.ctx.policy.get();
        let now = now_ms();
        let ip = self.shared.peer.ip();
        let Some((account, target)) = &p.chosen else {
            // an approver logs in without a target to decide requests (`requests …`), so
            // approvers get no menu: they name the account for their own sessions
            let approver = snap.user(&p.user).is_some_and(|u| {
                snap.grants.iter().any(|g| {
                    g.conditions
                        .approval
                        .as_ref()
                        .is_some_and(|a| u.groups.contains(&a.approvers))
                })
            });
            let menu = psm_control_api::policy::reachable(&snap, &p.user, ip, now);
            if menu.is_empty() || approver {
                // nothing to choose: accepted, and told on the first channel. An approver's
                // vote opens sessions for others: it takes a second factor whenever MFA is
                // required, or the approver has enrolled one
                let enrolled = snap.user(&p.user).is_some_and(|u| u.totp.is_some());
                if !p.mfa_done && (snap.mfa_required || (approver && enrolled)) {
                    return Some(Stage::Code);
                }
                return None;
            }
            return Some(Stage::Menu(menu));
        };
        match decide(&snap, &self.attempt(&p.user, account, target)) {
            Ok(permit) => {
                if permit.mfa && !p.mfa_done && !self.mfa_cached(&p.user, &permit) {
                    return Some(Stage::Code);
                }
                if permit.conditions().reason_required && self.reason.is_none() {
                    return Some(Stage::Reason);
                }
                if permit.conditions().approval.is_some() && !p.approved {
                    return Some(Stage::Approval(None));
                }
                None
            }
            // a refused session is told why on its first channel; a second factor only if
            // required globally
            Err(_) if snap.mfa_required && !p.mfa_done => Some(Stage::Code),
            Err(_) => None,
        }
    }

    /// The dialogue is over: the login as the user named it, or as chosen from the menu.
    fn finish_dialogue(&mut self) -> Auth {
        let Some(p) = self.pending.take() else {
            return reject();
        };
        let login = match &p.chosen {
            Some((account, target)) => format!("{}@{account}@{target}", p.user),
            None => p.login.clone(),
        };
        let method = match (p.first, p.mfa_done) {
            ("password", true) => "password+totp",
            (_, true) => "publickey+totp",
            (m, false) => m,
        };
        self.satisfied = psm_control_api::Satisfied {
            mfa: p.mfa_done || self.chosen_mfa_cached(&p),
            reason: self.reason.is_some(),
            approval: p.approved,
        };
        self.auth_ok(&login, &p.user, method)
    }

    /// Whether the MFA cache stands in for a second factor for the account `p` chose, now.
    fn chosen_mfa_cached(&self, p: &Pending) -> bool {
        let Some((account, target)) = &p.chosen else {
            return false;
        };
        let snap = self.ctx.policy.get();
        decide(&snap, &self.attempt(&p.user, account, target))
            .is_ok_and(|permit| self.mfa_cached(&p.user, &permit))
    }

    fn prompt(&self, stage: &Stage) -> Auth {
        let (instructions, prompt): (String, Cow<'static, str>) = match stage {
            Stage::Menu(menu) => {
                let mut text = String::from("psm: accounts you may use now:\r\n");
                for (i, (account, target)) in menu.iter().enumerate() {
                    text.push_str(&format!("  {}) {account}@{target}\r\n", i + 1));
                }
                (text, Cow::Borrowed(MENU_PROMPT))
            }
            Stage::Code => (String::new(), Cow::Borrowed(crate::mfa::PROMPT)),
            Stage::Reason => {
                let (a, t) = self
                    .pending
                    .as_ref()
                    .and_then(|p| p.chosen.clone())
                    .unwrap_or_default();
                (
                    String::new(),
                    Cow::Owned(format!("psm: reason or ticket for {a}@{t}: ")),
                )
            }
            Stage::Approval(id) => {
                return Auth::Partial {
                    name: "psm".into(),
                    instructions: format!(
                        "psm: waiting for approval of request {}…\r\n",
                        id.unwrap_or_default()
                    )
                    .into(),
                    prompts: Vec::new().into(),
                }
            }
            Stage::Refused(message) => {
                return Auth::Partial {
                    name: "psm".into(),
                    instructions: format!("{message}\r\n").into(),
                    prompts: Vec::new().into(),
                }
            }
        };
        Auth::Partial {
            name: "psm".into(),
            instructions: instructions.into(),
            prompts: vec![(prompt, true)].into(),
        }
    }

    /// Moves the dialogue on after a step: the next question, or the acceptance.
    fn advance(&mut self) -> Auth {
        match self.next_stage() {
            None => self.finish_dialogue(),
            Some(stage) => {
                let ask = self.prompt(&stage);
                if let Some(p) = &mut self.pending {
                    p.stage = Some(stage);
                }
                ask
            }
        }
    }

    /// Refuses the login, showing `message` first (the client displays it).
    fn refuse_with(&mut self, login: &str, message: String, audit: &str, side: Side) -> Auth {
        // not a wrong secret: audited, not counted toward the lockout
        self.auth_refused_by(login, "keyboard-interactive", audit, Some(side));
        let stage = Stage::Refused(message);
        let ask = self.prompt(&stage);
        if let Some(p) = &mut self.pending {
            p.stage = Some(stage);
        }
        ask
    }

    /// Makes the access request psm-control keeps; an earlier approval may still cover it.
    async fn request_approval(&mut self, login: &str) -> Auth {
        let Some(p) = self.pending.clone() else {
            return reject();
        };
        let Some((account, target)) = p.chosen.clone() else {
            return reject();
        };
        let snap = self.ctx.policy.get();
        let rule = decide(&snap, &self.attempt(&p.user, &account, &target))
            .ok()
            .and_then(|permit| permit.conditions().approval.clone());
        let Some(rule) = rule else {
            return self.advance();
        };
        let op = psm_control_api::ApprovalOp::Request {
            user: p.user.clone(),
            account,
            target,
            source: self.source(),
            justification: self.reason.clone(),
            rule,
        };
        match self.ctx.approvals.call(&self.ctx.audit, op).await {
            Ok(reply) => match reply.request {
                Some(r) if matches!(r.state, psm_control_api::ApprovalState::Approved { .. }) => {
                    if let Some(p) = &mut self.pending {
                        p.approved = true;
                    }
                    self.advance()
                }
                Some(r) => {
                    // watch from now on, so no decision is missed
                    self.approval_watch =
                        Some((r.id, self.ctx.approvals.watch(r.id), r.expires_ms));
                    self.shared.awaiting_until.store(
                        r.expires_ms + crate::control_link::APPROVAL_DECIDED_SLACK_MS,
                        std::sync::atomic::Ordering::Release,
                    );
                    let stage = Stage::Approval(Some(r.id));
                    let ask = self.prompt(&stage);
                    if let Some(p) = &mut self.pending {
                        p.stage = Some(stage);
                    }
                    ask
                }
                None => self.refuse_with(
                    login,
                    format!("psm: {}", reply.message),
                    "approval request refused",
                    Side::Policy,
                ),
            },
            Err(e) => self.refuse_with(
                login,
                "psm: approvals are unavailable; try again later".into(),
                &format!("approval request failed: psm-control did not answer: {e}"),
                Side::Control,
            ),
        }
    }

    /// Waits for the request's decision (the client shows "waiting for approval …").
    async fn await_approval(&mut self, login: &str, id: u64) -> Auth {
        use psm_control_api::ApprovalState;
        let (watch, expires_ms) = match self.approval_watch.take() {
            Some((w, rx, exp)) if w == id => (rx, exp),
            _ => (self.ctx.approvals.watch(id), now_ms() + 600_000),
        };
        let decided = self.ctx.approvals.decided(id, watch, expires_ms).await;
        self.shared
            .awaiting_until
            .store(0, std::sync::atomic::Ordering::Release);
        match decided.map(|r| r.state) {
            Some(ApprovalState::Approved { by }) => {
                info!(peer = %self.shared.peer, request = id, by = %by.join(","), "access request approved");
                if let Some(p) = &mut self.pending {
                    p.approved = true;
                }
                self.advance()
            }
            Some(ApprovalState::Denied { by, reason }) => {
                let shown = if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", crate::escape_short(&reason))
                };
                self.refuse_with(
                    login,
                    format!("psm: request {id} was denied by {by}{shown}"),
                    &format!("approval request {id} denied by {by}"),
                    Side::Policy,
                )
            }
            _ => self.refuse_with(
                login,
                format!("psm: request {id} was not approved in time"),
                &format!("approval request {id} timed out"),
                Side::Policy,
            ),
        }
    }

    /// One keyboard-interactive round: the first call asks, each answer is checked and the
    /// next question (or the acceptance) follows.
    pub(super) async fn keyboard_interactive(
        &mut self,
        login: &str,
        response: Option<russh::server::Response<'_>>,
    ) -> Auth {
        // Keyboard-interactive is only ever psm's dialogue after a key or a password.
        let Some(p) = self.pending.clone() else {
            return reject();
        };
        if p.login != login {
            self.auth_failed(
                login,
                "keyboard-interactive",
                "login changed between the factors",
            );
            self.pending = None;
            return reject();
        }
        let Some(stage) = p.stage.clone() else {
            return reject();
        };
        if let Stage::Refused(_) = &stage {
            if response.is_some() {
                self.pending = None;
                return reject();
            }
        }
        if let Stage::Approval(None) = &stage {
            return self.request_approval(login).await;
        }
        if let (Stage::Approval(Some(id)), Some(_)) = (&stage, &response) {
            return self.await_approval(login, *id).await;
        }
        let Some(mut response) = response else {
            return self.prompt(&stage);
        };
        let answer = zeroize::Zeroizing::new(
            response
                .next()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
        );
        match stage {
            Stage::Menu(menu) => {
                let pick = answer
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| n.checked_sub(1))
                    .and_then(|i| menu.get(i).cloned());
                match pick {
                    Some(choice) => {
                        if let Some(p) = &mut self.pending {
                            p.chosen = Some(choice);
                        }
                    }
                    None => return self.prompt(&Stage::Menu(menu)),
                }
            }
            Stage::Code => {
                let method = if p.first == "password" {
                    "password+totp"
                } else {
                    "publickey+totp"
                };
                if let Some(r) = self.refused_early(login, method) {
                    return r;
                }
                let snap = self.ctx.policy.get();
                let now = now_ms();
                let verdict = match snap.user(&p.user) {
                    Some(u) => self.ctx.mfa.verify(u, &answer, now),
                    None => Err(crate::mfa::MfaFailure::NotEnrolled),
                };
                match verdict {
                    Ok(step) => {
                        self.ctx.audit.report(RelayToControl::MfaUsed {
                            user: p.user.clone(),
                            step,
                        });
                        self.ctx.mfa.remember(&p.user, self.shared.peer.ip(), now);
                        if let Some(p) = &mut self.pending {
                            p.mfa_done = true;
                        }
                    }
                    Err(f) => {
                        self.auth_failed(login, method, f.reason());
                        self.mfa_tries += 1;
                        if self.mfa_tries >= MAX_MFA_TRIES {
                            // no more codes on this connection (the lockout counts them all)
                            self.pending = None;
                        }
                        return Auth::Reject {
                            proceed_with_methods: Some(second_factor()),
                            partial_success: false,
                        };
                    }
                }
            }
            Stage::Approval(_) | Stage::Refused(_) => return reject(),
            Stage::Reason => {
                let reason = answer.trim();
                if reason.is_empty() {
                    return self.prompt(&Stage::Reason);
                }
                let (kept, _) = psm_control_api::escape::truncate(reason, MAX_REASON);
                self.reason = Some(kept.to_string());
            }
        }
        self.advance()
    }
}

impl Conn {
    /// `ssh approver@gateway requests list|approve R|deny R [--reason TEXT]`: psm's own
    /// commands for approvers, run on a login without a target.
    pub(super) async fn approver_command(&mut self, command: &str) -> (u32, String) {
        use psm_control_api::{ApprovalOp, ApprovalState};
        let Some(user) = self.user.clone() else {
            return (1, "psm: not logged in\n".into());
        };
        let words: Vec<&str> = command.split_whitespace().collect();
        let reason = words
            .iter()
            .position(|w| *w == "--reason")
            .map(|i| words[i + 1..].join(" "));
        let op = match words.as_slice() {
            ["requests", "list"] | ["requests"] => ApprovalOp::List { user: user.clone() },
            ["requests", verb @ ("approve" | "deny"), id, ..] => match id.parse::<u64>() {
                Ok(id) => ApprovalOp::Vote {
                    user: user.clone(),
                    id,
                    approve: *verb == "approve",
                    reason,
                },
                Err(_) => return (2, format!("psm: '{}' is not a request number\n", crate::escape_short(id))),
            },
            _ => {
                return (
                    2,
                    "usage: requests list | requests approve ID [--reason TEXT] | requests deny ID [--reason TEXT]\n"
                        .into(),
                )
            }
        };
        let reply = match self.ctx.approvals.call(&self.ctx.audit, op).await {
            Ok(r) => r,
            Err(e) => return (1, format!("psm: {e}\n")),
        };
        let mut out = String::new();
        for r in &reply.list {
            let state = match &r.state {
                ApprovalState::Pending { approvals } => {
                    format!("pending ({} of {})", approvals.len(), r.needed)
                }
                other => format!("{other:?}"),
            };
            out.push_str(&format!(
                "{}\t{}\t{}@{}\t{}\t{}\t{}\n",
                r.id,
                r.user,
                r.account,
                r.target,
                r.source,
                state,
                r.justification
                    .as_deref()
                    .map(crate::escape_short)
                    .unwrap_or_default()
            ));
        }
        out.push_str(&format!("psm: {}\n", reply.message));
        (if reply.ok { 0 } else { 1 }, out)
    }
}
