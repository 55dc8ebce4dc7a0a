//! The sans-IO access decision and the running session's policy checks.
//!
//! [`decide`] answers "may this user, from this address, now, use this account on this
//! target, and under which grant?"; [`Governor::check`] answers "may this running session go on,
//! and when must I ask again?". Both are pure functions of the snapshot, the attempt and `now`:
//! the relay feeds them (at connect time, at every snapshot it receives, at every deadline they
//! return) and carries out what they say. The same functions serve every protocol.

use std::fmt;
use std::net::IpAddr;

use crate::conditions::{canonical_ip, format_duration, format_time, Conditions, TimeWindow};
use crate::{Account, Grant, PolicySnapshot, Target, User};

/// What is asked: `user` from `source` at `now_ms` wants `account@target`.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    /// psm user.
    pub user: &'a str,
    /// Account on the target.
    pub account: &'a str,
    /// Target name.
    pub target: &'a str,
    /// The client's address.
    pub source: IpAddr,
    /// Now, ms since the epoch.
    pub now_ms: u64,
}

/// How the user is covered by a grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// The grant names the user.
    User,
    /// The grant names a group the user belongs to.
    Group(String),
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::User => f.write_str("directly"),
            Via::Group(g) => write!(f, "through group @{g}"),
        }
    }
}

/// A positive decision: what the relay needs to broker the session, and what it must still ask
/// of the user before it starts.
#[derive(Clone, Debug)]
pub struct Permit<'s> {
    /// The grant that decided (the first, in order, whose conditions hold).
    pub grant: &'s Grant,
    /// How the user is covered by it.
    pub via: Via,
    /// The target.
    pub target: &'s Target,
    /// The account, with its credential.
    pub account: &'s Account,
    /// Whether a second factor is required (by the grant or globally).
    pub mfa: bool,
}

impl Permit<'_> {
    /// The grant's conditions.
    pub fn conditions(&self) -> &Conditions {
        &self.grant.conditions
    }
}

/// What a login gave beyond its first factor. The grant that decides a later channel of the
/// connection, or that covers a running session after the policy changed, may ask for more
/// than the one that decided the login did; what it asks is checked against this
/// ([`Satisfied::missing`]), so that no step of the login is skipped by waiting for another
/// grant to apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Satisfied {
    /// A second factor was given at login (or one given shortly before was accepted from the
    /// MFA cache).
    pub mfa: bool,
    /// A reason was given.
    pub reason: bool,
    /// An approval covers the login.
    pub approval: bool,
}

impl Satisfied {
    /// What `permit` asks that the login did not give, if anything.
    pub fn missing(&self, permit: &Permit<'_>) -> Option<Step> {
        let c = permit.conditions();
        if permit.mfa && !self.mfa {
            Some(Step::SecondFactor)
        } else if c.reason_required && !self.reason {
            Some(Step::Reason)
        } else if c.approval.is_some() && !self.approval {
            Some(Step::Approval)
        } else {
            None
        }
    }
}

/// A step of the login beyond the first factor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A verification code.
    SecondFactor,
    /// A reason or ticket.
    Reason,
    /// Another person's approval.
    Approval,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::SecondFactor => "a second factor",
            Step::Reason => "a reason",
            Step::Approval => "an approval",
        })
    }
}

/// Why a session was refused by policy. The `Display` text is the full reason for the audit log;
/// [`Denial::client_message`] is what the user is told; [`Denial::code`] is stable for SIEM
/// rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The user is not (or no longer) registered.
    #[error("user '{user}' does not exist")]
    UnknownUser {
        /// psm user.
        user: String,
    },
    /// The user is disabled (`psmctl user disable`).
    #[error("user '{user}' is disabled")]
    UserDisabled {
        /// psm user.
        user: String,
    },
    /// The user is locked after too many failed logins.
    #[error("user '{user}' is locked until {}", format_time(*.until_ms))]
    UserLocked {
        /// psm user.
        user: String,
        /// When the lock ends, ms since the epoch.
        until_ms: u64,
    },
    /// The target name is not registered.
    #[error("unknown target '{target}' (account '{account}' requested)")]
    UnknownTarget {
        /// Account name requested.
        account: String,
        /// Target name.
        target: String,
    },
    /// The account is not registered on the target.
    #[error("unknown account '{account}' on target '{target}'")]
    UnknownAccount {
        /// Account name.
        account: String,
        /// Target name.
        target: String,
    },
    /// The user has no grant for this account.
    #[error("user '{user}' has no grant for {account}@{target}")]
    NoGrant {
        /// psm user.
        user: String,
        /// Account name.
        account: String,
        /// Target name.
        target: String,
    },
    /// Every grant that covers it is outside its time windows now.
    #[error("{account}@{target} is outside the grant's time windows ({})", windows.iter().map(|w| w.to_string()).collect::<Vec<_>>().join("; "))]
    OutsideWindow {
        /// Account name.
        account: String,
        /// Target name.
        target: String,
        /// The windows of the first grant that covers it.
        windows: Vec<TimeWindow>,
    },
    /// The grant is not valid yet.
    #[error("the grant for {account}@{target} is valid only from {}", format_time(*.from_ms))]
    NotYetValid {
        /// Account name.
        account: String,
        /// Target name.
        target: String,
        /// Validity start.
        from_ms: u64,
    },
    /// The grant has expired.
    #[error("the grant for {account}@{target} expired at {}", format_time(*.at_ms))]
    Expired {
        /// Account name.
        account: String,
        /// Target name.
        target: String,
        /// Expiry.
        at_ms: u64,
    },
    /// The client's address is not in the grant's source networks.
    #[error("{account}@{target} may not be used from {source_ip} (allowed from {allowed})")]
    SourceNotAllowed {
        /// Account name.
        account: String,
        /// Target name.
        target: String,
        /// The client's address.
        source_ip: IpAddr,
        /// The allowed networks, comma separated.
        allowed: String,
    },
    /// A `tcp` target's payload is not recorded, and the grant does not say it may be.
    #[error("the grant for {account}@{target} does not allow unrecorded TCP pass-through (--unrecorded-tcp)")]
    UnrecordedNotAllowed {
        /// Account name.
        account: String,
        /// Target name.
        target: String,
    },
}

impl Denial {
    /// The one line shown to the user: it never says whether the target or account exists, nor
    /// why a user is refused an identity (disabled, locked).
    pub fn client_message(&self) -> String {
        match self {
            Denial::UnknownUser { .. }
            | Denial::UserDisabled { .. }
            | Denial::UserLocked { .. } => "access denied".into(),
            Denial::UnknownTarget { account, target }
            | Denial::UnknownAccount { account, target }
            | Denial::NoGrant {
                account, target, ..
            } => format!("access denied: you have no grant for {account}@{target}"),
            Denial::OutsideWindow {
                account,
                target,
                windows,
            } => format!(
                "access denied: {account}@{target} is not available now (allowed {})",
                windows
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Denial::NotYetValid {
                account,
                target,
                from_ms,
            } => format!(
                "access denied: your grant for {account}@{target} is valid from {}",
                format_time(*from_ms)
            ),
            Denial::Expired {
                account, target, ..
            } => format!("access denied: your grant for {account}@{target} has expired"),
            Denial::SourceNotAllowed {
                account,
                target,
                source_ip,
                ..
            } => format!("access denied: {account}@{target} may not be used from {source_ip}"),
            Denial::UnrecordedNotAllowed { account, target } => format!(
                "access denied: your grant for {account}@{target} does not allow unrecorded pass-through"
            ),
        }
    }

    /// A stable short code.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::UnknownUser { .. } => "unknown_user",
            Denial::UserDisabled { .. } => "user_disabled",
            Denial::UserLocked { .. } => "user_locked",
            Denial::UnknownTarget { .. } => "unknown_target",
            Denial::UnknownAccount { .. } => "unknown_account",
            Denial::NoGrant { .. } => "no_grant",
            Denial::OutsideWindow { .. } => "outside_window",
            Denial::NotYetValid { .. } => "not_yet_valid",
            Denial::Expired { .. } => "expired",
            Denial::SourceNotAllowed { .. } => "source_not_allowed",
            Denial::UnrecordedNotAllowed { .. } => "unrecorded_not_allowed",
        }
    }
}

/// Whether a grant's subject (`alice` or `@ops`) covers `user`.
pub fn subject_covers(subject: &str, user: &User) -> Option<Via> {
    match subject.strip_prefix('@') {
        Some(group) => user
            .groups
            .iter()
            .any(|g| g == group)
            .then(|| Via::Group(group.to_string())),
        None => (subject == user.name).then_some(Via::User),
    }
}

/// Whether a grant's target side (`web01` or `@prod`, a target group) covers `target`.
pub fn target_covers(side: &str, target: &Target) -> bool {
    match side.strip_prefix('@') {
        Some(group) => target.groups.iter().any(|g| g == group),
        None => side == target.name,
    }
}

/// Whether the user may authenticate at all at `now_ms` (exists, enabled, not locked).
pub fn user_usable<'s>(
    snap: &'s PolicySnapshot,
    user: &str,
    now_ms: u64,
) -> Result<&'s User, Denial> {
    let u = snap.user(user).ok_or_else(|| Denial::UnknownUser {
        user: user.to_string(),
    })?;
    if u.disabled {
        return Err(Denial::UserDisabled {
            user: user.to_string(),
        });
    }
    if let Some(until_ms) = u.locked_until_ms.filter(|t| *t > now_ms) {
        return Err(Denial::UserLocked {
            user: user.to_string(),
            until_ms,
        });
    }
    Ok(u)
}

/// The first condition of `c` that refuses the attempt, if any (time windows, validity, source).
fn refusal(c: &Conditions, a: &Attempt<'_>) -> Option<Denial> {
    let (account, target) = (a.account.to_string(), a.target.to_string());
    if let Some(from_ms) = c.not_before_ms.filter(|t| a.now_ms < *t) {
        return Some(Denial::NotYetValid {
            account,
            target,
            from_ms,
        });
    }
    if let Some(at_ms) = c.expires_ms.filter(|t| a.now_ms >= *t) {
        return Some(Denial::Expired {
            account,
            target,
            at_ms,
        });
    }
    let ip = canonical_ip(a.source);
    if !c.from.is_empty() && !c.from.iter().any(|n| n.contains(&ip)) {
        return Some(Denial::SourceNotAllowed {
            account,
            target,
            source_ip: ip,
            allowed: c
                .from
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if !c.in_window(a.now_ms) {
        return Some(Denial::OutsideWindow {
            account,
            target,
            windows: c.windows.clone(),
        });
    }
    None
}

/// Every grant that names this user (directly or by group) for this account on this target, in
/// the snapshot's order, whatever its conditions.
pub fn covering_grants<'s>(
    snap: &'s PolicySnapshot,
    user: &User,
    account: &str,
    target: &Target,
) -> Vec<(&'s Grant, Via)> {
    snap.grants
        .iter()
        .filter(|g| g.account == account && target_covers(&g.target, target))
        .filter_map(|g| subject_covers(&g.user, user).map(|via| (g, via)))
        .collect()
}

/// The access decision. The first covering grant whose conditions hold decides; when none
/// does, the first covering grant's refusal is the reason.
pub fn decide<'s>(snap: &'s PolicySnapshot, a: &Attempt<'_>) -> Result<Permit<'s>, Denial> {
    let user = user_usable(snap, a.user, a.now_ms)?;
    let target = snap
        .targets
        .iter()
        .find(|t| t.name == a.target)
        .ok_or_else(|| Denial::UnknownTarget {
            account: a.account.to_string(),
            target: a.target.to_string(),
        })?;
    let account = snap
        .accounts
        .iter()
        .find(|x| x.target == a.target && x.username == a.account)
        .ok_or_else(|| Denial::UnknownAccount {
            account: a.account.to_string(),
            target: a.target.to_string(),
        })?;
    let mut first_refusal = None;
    for (grant, via) in covering_grants(snap, user, a.account, target) {
        let unrecorded = (target.protocol == crate::Protocol::Tcp
            && !grant.conditions.unrecorded_tcp)
            .then(|| Denial::UnrecordedNotAllowed {
                account: a.account.to_string(),
                target: a.target.to_string(),
            });
        match unrecorded.or_else(|| refusal(&grant.conditions, a)) {
            None => {
                return Ok(Permit {
                    mfa: snap.mfa_required || grant.conditions.mfa,
                    grant,
                    via,
                    target,
                    account,
                })
            }
            Some(d) => {
                first_refusal.get_or_insert(d);
            }
        }
    }
    Err(first_refusal.unwrap_or_else(|| Denial::NoGrant {
        user: a.user.to_string(),
        account: a.account.to_string(),
        target: a.target.to_string(),
    }))
}

/// Every account `user` may use from `source` at `now_ms`, as `(account, target)` pairs in the
/// snapshot's order, each once (the target menu).
pub fn reachable(
    snap: &PolicySnapshot,
    user: &str,
    source: IpAddr,
    now_ms: u64,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for a in &snap.accounts {
        let attempt = Attempt {
            user,
            account: &a.username,
            target: &a.target,
            source,
            now_ms,
        };
        if decide(snap, &attempt).is_ok()
            && !out.iter().any(|(x, t)| *x == a.username && *t == a.target)
        {
            out.push((a.username.clone(), a.target.clone()));
        }
    }
    out
}

/// Why policy ends a running session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyStop {
    /// The session would no longer be allowed to start: revoked grant, disabled or locked user,
    /// closed window, expiry.
    Denied(Denial),
    /// The grant's maximum duration was reached.
    MaxDuration(u64),
    /// No input from the user for the grant's idle timeout.
    IdleTimeout(u64),
    /// A command rule with the `terminate` action matched.
    CommandTerminated {
        /// The command line.
        line: String,
        /// The rule.
        rule: Option<u64>,
    },
    /// The session runs unrecorded under a grant that said `unrecorded`, and the grant in force
    /// now records (that grant was revoked, expired or left its window, or another one comes
    /// first): an unrecorded session cannot become recorded, so it ends.
    RecordingRequired,
    /// The grant in force now asks for a step of the login that this session's login did not
    /// give (another grant decided it, or the grant changed).
    Unsatisfied(Step),
}

impl fmt::Display for PolicyStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyStop::Denied(d) => write!(f, "policy: {d}"),
            PolicyStop::MaxDuration(ms) => {
                write!(f, "maximum duration of {} reached", format_duration(*ms))
            }
            PolicyStop::IdleTimeout(ms) => {
                write!(
                    f,
                    "no input for the idle timeout of {}",
                    format_duration(*ms)
                )
            }
            PolicyStop::CommandTerminated { line, rule } => write!(
                f,
                "command {:?} matched {} (terminate)",
                crate::escape(line),
                rule.map(|r| format!("command rule {r}"))
                    .unwrap_or_else(|| "the grant's default".into())
            ),
            PolicyStop::RecordingRequired => write!(
                f,
                "policy: the session is unrecorded and the grant now in force does not allow that (no --unrecorded)"
            ),
            PolicyStop::Unsatisfied(step) => write!(
                f,
                "policy: the grant now in force asks for {step} at login, which this session's login did not give"
            ),
        }
    }
}

impl PolicyStop {
    /// A stable short code.
    pub fn code(&self) -> &'static str {
        match self {
            PolicyStop::Denied(Denial::OutsideWindow { .. }) => "window_closed",
            PolicyStop::Denied(Denial::Expired { .. }) => "grant_expired",
            PolicyStop::Denied(Denial::UserDisabled { .. }) => "user_disabled",
            PolicyStop::Denied(Denial::UserLocked { .. }) => "user_locked",
            PolicyStop::Denied(Denial::UnknownUser { .. }) => "user_removed",
            PolicyStop::Denied(Denial::UnknownTarget { .. } | Denial::UnknownAccount { .. }) => {
                "target_removed"
            }
            PolicyStop::Denied(_) => "grant_revoked",
            PolicyStop::MaxDuration(_) => "max_duration",
            PolicyStop::IdleTimeout(_) => "idle_timeout",
            PolicyStop::CommandTerminated { .. } => "command_terminated",
            PolicyStop::RecordingRequired => "recording_required",
            PolicyStop::Unsatisfied(_) => "login_step_missing",
        }
    }

    /// The line the user sees.
    pub fn user_line(&self) -> String {
        let why = match self {
            PolicyStop::Denied(Denial::OutsideWindow { .. }) => {
                "the permitted time window closed".to_string()
            }
            PolicyStop::Denied(Denial::Expired { .. }) => "the grant expired".into(),
            PolicyStop::Denied(
                Denial::UserDisabled { .. }
                | Denial::UserLocked { .. }
                | Denial::UnknownUser { .. },
            ) => "your psm account was disabled".into(),
            PolicyStop::Denied(_) => "access was revoked".into(),
            PolicyStop::MaxDuration(ms) => {
                format!("maximum duration of {} reached", format_duration(*ms))
            }
            PolicyStop::IdleTimeout(ms) => {
                format!("idle timeout of {} reached", format_duration(*ms))
            }
            PolicyStop::CommandTerminated { line, .. } => {
                let (l, _) = crate::escape::truncate(line, 200);
                format!("command not permitted: {}", crate::escape(l))
            }
            PolicyStop::RecordingRequired => {
                "the session must now be recorded; connect again".into()
            }
            PolicyStop::Unsatisfied(step) => {
                format!("the grant now in force asks for {step} at login; connect again")
            }
        };
        format!("psm: session ended: {why}")
    }
}

/// What [`Governor::check`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The session may go on; ask again at `next_check_ms` at the latest (None: only when the
    /// snapshot changes).
    Continue {
        /// When to check again, ms since the epoch.
        next_check_ms: Option<u64>,
    },
    /// The session must end now.
    End(PolicyStop),
}

/// The policy side of one running session: what it was allowed as, and since when.
#[derive(Clone, Debug)]
pub struct Governor {
    /// psm user.
    pub user: String,
    /// Account on the target.
    pub account: String,
    /// Target name.
    pub target: String,
    /// The client's address.
    pub source: IpAddr,
    /// Start, ms since the epoch.
    pub start_ms: u64,
    /// Whether the session is recorded. An unrecorded one goes on only while the grant in force
    /// says `unrecorded` (or recording is optional).
    pub recorded: bool,
    /// What the login gave beyond the first factor: a grant in force that asks for more ends
    /// the session.
    pub satisfied: Satisfied,
}

impl Governor {
    /// Whether the session may go on at `now_ms` under `snap`, given the last time the user
    /// sent anything. The grant that covers it may change (a new grant, a group membership);
    /// the session goes on as long as one covers it.
    pub fn check(&self, snap: &PolicySnapshot, now_ms: u64, last_input_ms: u64) -> Verdict {
        let attempt = Attempt {
            user: &self.user,
            account: &self.account,
            target: &self.target,
            source: self.source,
            now_ms,
        };
        let permit = match decide(snap, &attempt) {
            Ok(p) => p,
            Err(d) => return Verdict::End(PolicyStop::Denied(d)),
        };
        if let Some(step) = self.satisfied.missing(&permit) {
            return Verdict::End(PolicyStop::Unsatisfied(step));
        }
        let c = permit.conditions();
        if !self.recorded && !c.unrecorded && snap.recording_required {
            return Verdict::End(PolicyStop::RecordingRequired);
        }
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(max) = c.max_duration_ms {
            let end = self.start_ms.saturating_add(max);
            if now_ms >= end {
                return Verdict::End(PolicyStop::MaxDuration(max));
            }
            at(end);
        }
        if let Some(idle) = c.idle_timeout_ms {
            let end = last_input_ms.max(self.start_ms).saturating_add(idle);
            if now_ms >= end {
                return Verdict::End(PolicyStop::IdleTimeout(idle));
            }
            at(end);
        }
        if let Some(t) = c.expires_ms {
            at(t);
        }
        if !c.windows.is_empty() {
            // windows have minute granularity: they can only close on a minute boundary
            at((now_ms / 60_000 + 1) * 60_000);
        }
        Verdict::Continue {
            next_check_ms: next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{parse_cidr, parse_time};
    use crate::{Credential, Secret};

    fn snap() -> PolicySnapshot {
        let user = |name: &str, groups: &[&str]| User {
            name: name.into(),
            password: None,
            ssh_keys: vec![],
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..User::default()
        };
        let target = |name: &str, groups: &[&str]| Target {
            protocol: Default::default(),
            name: name.into(),
            address: "127.0.0.1:22".into(),
            host_key: "ssh-ed25519 AAAA".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            listen: None,
        };
        let account = |t: &str, u: &str| Account {
            domain: None,
            target: t.into(),
            username: u.into(),
            credential: Credential::Password(Secret::new("pw".into())),
        };
        let grant = |u: &str, t: &str, a: &str, c: Conditions| Grant {
            user: u.into(),
            target: t.into(),
            account: a.into(),
            conditions: c,
        };
        PolicySnapshot {
            version: 1,
            users: vec![
                user("alice", &["ops"]),
                user("bob", &[]),
                user("carol", &["ops", "dba"]),
            ],
            targets: vec![target("web01", &["prod"]), target("db01", &["prod"])],
            accounts: vec![
                account("web01", "root"),
                account("db01", "root"),
                account("db01", "postgres"),
            ],
            grants: vec![
                grant("bob", "web01", "root", Conditions::default()),
                grant(
                    "@ops",
                    "@prod",
                    "root",
                    Conditions {
                        windows: vec![
                            TimeWindow::parse("mon-fri", "08:00-18:00", "UTC").expect("w")
                        ],
                        ..Conditions::default()
                    },
                ),
                grant(
                    "@dba",
                    "db01",
                    "postgres",
                    Conditions {
                        from: vec![parse_cidr("10.0.0.0/8").expect("cidr")],
                        expires_ms: Some(parse_time("2027-01-01").expect("t")),
                        max_duration_ms: Some(7_200_000),
                        idle_timeout_ms: Some(900_000),
                        mfa: true,
                        ..Conditions::default()
                    },
                ),
            ],
            recording_required: true,
            mfa_required: false,
            command_rules: vec![],
        }
    }

    fn at(s: &str) -> u64 {
        parse_time(s).expect("time")
    }

    fn attempt<'a>(
        user: &'a str,
        account: &'a str,
        target: &'a str,
        ip: &str,
        now: u64,
    ) -> Attempt<'a> {
        Attempt {
            user,
            account,
            target,
            source: ip.parse().expect("ip"),
            now_ms: now,
        }
    }

    #[test]
    fn a_tcp_target_needs_a_grant_that_allows_it_unrecorded() {
        let mut s = snap();
        s.targets.push(Target {
            name: "pg01".into(),
            address: "127.0.0.1:5432".into(),
            host_key: String::new(),
            groups: vec![],
            protocol: crate::Protocol::Tcp,
            listen: Some("0.0.0.0:15432".into()),
        });
        s.accounts.push(Account {
            target: "pg01".into(),
            username: crate::TCP_ACCOUNT.into(),
            credential: Credential::None,
            domain: None,
        });
        let tcp_grant = |unrecorded_tcp| Grant {
            user: "bob".into(),
            target: "pg01".into(),
            account: crate::TCP_ACCOUNT.into(),
            conditions: Conditions {
                unrecorded_tcp,
                ..Conditions::default()
            },
        };
        let now = at("2026-12-03T12:00:00Z");
        s.grants.push(tcp_grant(false));
        let d = decide(&s, &attempt("bob", "tcp", "pg01", "127.0.0.1", now)).expect_err("plain");
        assert_eq!(d.code(), "unrecorded_not_allowed");
        assert!(d.to_string().contains("--unrecorded-tcp"), "{d}");
        // a later grant that says so decides
        s.grants.push(tcp_grant(true));
        let p = decide(&s, &attempt("bob", "tcp", "pg01", "127.0.0.1", now)).expect("allowed");
        assert!(p.conditions().unrecorded_tcp);
        // the flag means nothing on other targets, and is not needed there
        let p = decide(&s, &attempt("bob", "root", "web01", "127.0.0.1", now)).expect("ssh");
        assert!(!p.conditions().unrecorded_tcp);
    }

    #[test]
    fn groups_target_groups_and_conditions_decide() {
        let s = snap();
        let thu_noon = at("2026-12-03T12:00:00Z");
        let thu_night = at("2026-12-03T22:00:00Z");
        // bob: direct grant, no conditions
        let p = decide(&s, &attempt("bob", "root", "web01", "127.0.0.1", thu_night)).expect("bob");
        assert_eq!(p.via, Via::User);
        assert!(!p.mfa);
        // alice: through @ops on the target group @prod, inside the window
        let p =
            decide(&s, &attempt("alice", "root", "db01", "127.0.0.1", thu_noon)).expect("alice");
        assert_eq!(p.via, Via::Group("ops".into()));
        // ... and refused outside it, with the window in the reason
        let d = decide(
            &s,
            &attempt("alice", "root", "db01", "127.0.0.1", thu_night),
        )
        .expect_err("night");
        assert_eq!(d.code(), "outside_window");
        assert!(
            d.client_message()
                .contains("mon,tue,wed,thu,fri 08:00-18:00 UTC"),
            "{d}"
        );
        // no grant for postgres, however alice is grouped
        let d = decide(
            &s,
            &attempt("alice", "postgres", "db01", "10.1.1.1", thu_noon),
        )
        .expect_err("pg");
        assert_eq!(d.code(), "no_grant");
        // carol: @dba from 10/8 only, mfa, until 2027
        let p = decide(
            &s,
            &attempt("carol", "postgres", "db01", "10.1.1.1", thu_night),
        )
        .expect("carol");
        assert!(p.mfa);
        let d = decide(
            &s,
            &attempt("carol", "postgres", "db01", "192.168.1.1", thu_night),
        )
        .expect_err("src");
        assert_eq!(d.code(), "source_not_allowed");
        // an IPv4-mapped IPv6 source is its IPv4 address
        assert!(decide(
            &s,
            &attempt("carol", "postgres", "db01", "::ffff:10.9.9.9", thu_night)
        )
        .is_ok());
        let d = decide(
            &s,
            &attempt("carol", "postgres", "db01", "10.1.1.1", at("2027-01-01")),
        )
        .expect_err("exp");
        assert_eq!(d.code(), "expired");
        // global MFA
        let mut g = snap();
        g.mfa_required = true;
        assert!(
            decide(&g, &attempt("bob", "root", "web01", "127.0.0.1", thu_night))
                .expect("bob")
                .mfa
        );
        // disabled and locked users, with the generic message
        let mut s2 = snap();
        s2.users[1].disabled = true;
        let d = decide(
            &s2,
            &attempt("bob", "root", "web01", "127.0.0.1", thu_night),
        )
        .expect_err("disabled");
        assert_eq!(
            (d.code(), d.client_message().as_str()),
            ("user_disabled", "access denied")
        );
        s2.users[1].disabled = false;
        s2.users[1].locked_until_ms = Some(thu_night + 1000);
        assert_eq!(
            decide(
                &s2,
                &attempt("bob", "root", "web01", "127.0.0.1", thu_night)
            )
            .expect_err("l")
            .code(),
            "user_locked"
        );
        assert!(decide(
            &s2,
            &attempt("bob", "root", "web01", "127.0.0.1", thu_night + 1000)
        )
        .is_ok());
        // the menu
        assert_eq!(
            reachable(&s, "alice", "127.0.0.1".parse().expect("ip"), thu_noon),
            vec![
                ("root".to_string(), "web01".to_string()),
                ("root".into(), "db01".into())
            ]
        );
        assert!(reachable(&s, "alice", "127.0.0.1".parse().expect("ip"), thu_night).is_empty());
    }

    #[test]
    fn the_governor_ends_sessions_and_names_its_deadlines() {
        let s = snap();
        let start = at("2026-12-03T12:00:00Z");
        let g = Governor {
            user: "carol".into(),
            account: "postgres".into(),
            target: "db01".into(),
            source: "10.1.1.1".parse().expect("ip"),
            start_ms: start,
            recorded: true,
            satisfied: Satisfied {
                mfa: true,
                ..Satisfied::default()
            },
        };
        // idle deadline first (15 min), then the max duration (2 h)
        assert_eq!(
            g.check(&s, start + 1000, start),
            Verdict::Continue {
                next_check_ms: Some(start + 900_000)
            }
        );
        assert_eq!(
            g.check(&s, start + 900_000, start),
            Verdict::End(PolicyStop::IdleTimeout(900_000))
        );
        let late_input = start + 7_000_000;
        assert_eq!(
            g.check(&s, start + 7_200_000, late_input),
            Verdict::End(PolicyStop::MaxDuration(7_200_000))
        );
        assert_eq!(
            PolicyStop::MaxDuration(7_200_000).user_line(),
            "psm: session ended: maximum duration of 2h reached"
        );
        // revocation: the grant is gone from the next snapshot
        let mut revoked = snap();
        revoked.grants.remove(2);
        let v = g.check(&revoked, start + 1000, start);
        assert!(
            matches!(&v, Verdict::End(p) if p.code() == "grant_revoked"),
            "{v:?}"
        );
        // a window closing ends a session that started inside it; checks fall on minute marks
        let a = Governor {
            user: "alice".into(),
            account: "root".into(),
            target: "web01".into(),
            source: "127.0.0.1".parse().expect("ip"),
            start_ms: at("2026-12-03T17:58:30Z"),
            recorded: true,
            satisfied: Satisfied::default(),
        };
        assert_eq!(
            a.check(&s, at("2026-12-03T17:58:30Z"), 0),
            Verdict::Continue {
                next_check_ms: Some(at("2026-12-03T17:59:00Z"))
            }
        );
        let v = a.check(&s, at("2026-12-03T18:00:00Z"), 0);
        assert!(
            matches!(&v, Verdict::End(p) if p.code() == "window_closed"),
            "{v:?}"
        );
        // disabling the user ends it too
        let mut off = snap();
        off.users[0].disabled = true;
        let v = a.check(&off, at("2026-12-03T17:58:31Z"), 0);
        assert!(
            matches!(&v, Verdict::End(p) if p.code() == "user_disabled"),
            "{v:?}"
        );
    }

    #[test]
    fn a_session_ends_when_the_grant_in_force_asks_for_a_login_step_it_did_not_give() {
        // alice's grant (ops, web01, office hours) asks for nothing beyond the first factor
        let start = at("2026-12-03T12:00:00Z");
        let g = Governor {
            user: "alice".into(),
            account: "root".into(),
            target: "web01".into(),
            source: "127.0.0.1".parse().expect("ip"),
            start_ms: start,
            recorded: true,
            satisfied: Satisfied::default(),
        };
        let goes_on = |v: Verdict| matches!(v, Verdict::Continue { .. });
        assert!(goes_on(g.check(&snap(), start + 1000, 0)));
        // the grant in force now asks for a second factor (or MFA becomes required for all)
        let mut mfa = snap();
        mfa.grants[1].conditions.mfa = true;
        assert_eq!(
            g.check(&mfa, start + 1000, 0),
            Verdict::End(PolicyStop::Unsatisfied(Step::SecondFactor))
        );
        let mut global = snap();
        global.mfa_required = true;
        assert_eq!(
            g.check(&global, start + 1000, 0),
            Verdict::End(PolicyStop::Unsatisfied(Step::SecondFactor))
        );
        let with_code = Governor {
            satisfied: Satisfied {
                mfa: true,
                ..Satisfied::default()
            },
            ..g.clone()
        };
        assert!(goes_on(with_code.check(&mfa, start + 1000, 0)));
        // a reason, an approval
        let mut reason = snap();
        reason.grants[1].conditions.reason_required = true;
        assert_eq!(
            g.check(&reason, start + 1000, 0),
            Verdict::End(PolicyStop::Unsatisfied(Step::Reason))
        );
        let mut approval = snap();
        approval.grants[1].conditions.approval = Some(crate::conditions::ApprovalRule {
            count: 1,
            approvers: "dba".into(),
            timeout_ms: 60_000,
            covers_ms: 0,
        });
        let v = g.check(&approval, start + 1000, 0);
        assert_eq!(v, Verdict::End(PolicyStop::Unsatisfied(Step::Approval)));
        let Verdict::End(stop) = v else {
            unreachable!()
        };
        assert_eq!(stop.code(), "login_step_missing");
        assert_eq!(
            stop.user_line(),
            "psm: session ended: the grant now in force asks for an approval at login; connect again"
        );
        let all = Governor {
            satisfied: Satisfied {
                mfa: true,
                reason: true,
                approval: true,
            },
            ..g
        };
        for s in [&mfa, &global, &reason, &approval] {
            assert!(goes_on(all.check(s, start + 1000, 0)));
        }
    }

    #[test]
    fn an_unrecorded_session_ends_once_the_grant_in_force_records() {
        let mut unrecorded = snap();
        unrecorded.grants[2].conditions.unrecorded = true;
        let start = at("2026-12-03T12:00:00Z");
        let g = Governor {
            user: "carol".into(),
            account: "postgres".into(),
            target: "db01".into(),
            source: "10.1.1.1".parse().expect("ip"),
            start_ms: start,
            recorded: false,
            satisfied: Satisfied {
                mfa: true,
                ..Satisfied::default()
            },
        };
        let goes_on = |v: Verdict| matches!(v, Verdict::Continue { .. });
        assert!(goes_on(g.check(&unrecorded, start + 1000, start)));
        // the grant loses `unrecorded` (or a recording grant now decides): the session ends
        let recorded = snap();
        let v = g.check(&recorded, start + 1000, start);
        assert_eq!(v, Verdict::End(PolicyStop::RecordingRequired));
        assert_eq!(PolicyStop::RecordingRequired.code(), "recording_required");
        assert_eq!(
            PolicyStop::RecordingRequired.user_line(),
            "psm: session ended: the session must now be recorded; connect again"
        );
        // a recorded session is not concerned, nor one where recording is optional
        let r = Governor {
            recorded: true,
            ..g.clone()
        };
        assert!(goes_on(r.check(&recorded, start + 1000, start)));
        let mut optional = snap();
        optional.recording_required = false;
        assert!(goes_on(g.check(&optional, start + 1000, start)));
    }
}
