//! Command control: ordered rules (a regex on the command line and an action), attached to a
//! grant or to a group, first match wins, with the grant's default when none matches.
//!
//! [`CommandPolicy::for_session`] picks and compiles the rules that apply to one session;
//! [`CommandPolicy::check`] decides one command line. No I/O, no clock.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Grant, PolicySnapshot, User};

/// What a rule does with a command it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandAction {
    /// The command runs.
    Allow,
    /// The command never reaches the target; the user is told why.
    Deny,
    /// The session ends.
    Terminate,
    /// The command runs and is audited as an alert.
    Alert,
}

impl CommandAction {
    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandAction::Allow => "allow",
            CommandAction::Deny => "deny",
            CommandAction::Terminate => "terminate",
            CommandAction::Alert => "alert",
        }
    }
    /// Parses [`CommandAction::as_str`].
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(CommandAction::Allow),
            "deny" => Ok(CommandAction::Deny),
            "terminate" => Ok(CommandAction::Terminate),
            "alert" => Ok(CommandAction::Alert),
            _ => Err(format!(
                "unknown action '{s}' (expected allow, deny, terminate or alert)"
            )),
        }
    }
    /// Whether the command runs.
    pub fn runs(self) -> bool {
        matches!(self, CommandAction::Allow | CommandAction::Alert)
    }
}

impl fmt::Display for CommandAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleScope {
    /// One grant, named by its three fields.
    Grant {
        /// The grant's user side (`alice`, `@ops`).
        user: String,
        /// The grant's target side (`web01`, `@prod`).
        target: String,
        /// The grant's account.
        account: String,
    },
    /// Every session of the members of a group.
    Group {
        /// Group name, without `@`.
        group: String,
    },
}

impl fmt::Display for RuleScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleScope::Grant {
                user,
                target,
                account,
            } => write!(f, "grant {user} -> {account}@{target}"),
            RuleScope::Group { group } => write!(f, "group @{group}"),
        }
    }
}

/// One command rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRule {
    /// Rule id (its place in the order: lower first).
    pub id: u64,
    /// What it is attached to.
    pub scope: RuleScope,
    /// Regular expression searched in the command line (anchor it with `^…$` to match whole).
    pub pattern: String,
    /// What happens on a match.
    pub action: CommandAction,
}

/// Checks a pattern as psmctl and the import take it.
pub fn validate_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty pattern".into());
    }
    regex::RegexBuilder::new(p)
        .size_limit(1 << 20)
        .build()
        .map(|_| ())
        .map_err(|e| format!("pattern {p:?}: {e}"))
}

/// The decision on one command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandVerdict {
    /// What to do.
    pub action: CommandAction,
    /// The rule that matched (None: the grant's default).
    pub rule: Option<u64>,
    /// Its pattern.
    pub pattern: Option<String>,
}

/// The compiled rules of one session.
#[derive(Clone, Debug, Default)]
pub struct CommandPolicy {
    /// (compiled pattern, None when it does not compile: matches everything; the pattern; id;
    /// action)
    rules: Vec<(Option<regex::Regex>, String, u64, CommandAction)>,
    default: Option<CommandAction>,
}

impl CommandPolicy {
    /// The rules that apply to `user`'s session under `grant`: the grant's own and those of
    /// the user's groups, in id order. A rule whose pattern does not compile (which psmctl
    /// refuses) denies every command: fail closed.
    pub fn for_session(snap: &PolicySnapshot, grant: &Grant, user: &User) -> CommandPolicy {
        let mut rules: Vec<&CommandRule> = snap
            .command_rules
            .iter()
            .filter(|r| match &r.scope {
                RuleScope::Grant {
                    user: u,
                    target,
                    account,
                } => *u == grant.user && *target == grant.target && *account == grant.account,
                RuleScope::Group { group } => user.groups.iter().any(|g| g == group),
            })
            .collect();
        rules.sort_by_key(|r| r.id);
        let compiled = rules
            .into_iter()
            .map(|r| {
                let re = regex::RegexBuilder::new(&r.pattern)
                    .size_limit(1 << 20)
                    .build()
                    .ok();
                let action = if re.is_some() {
                    r.action
                } else {
                    CommandAction::Deny
                };
                (re, r.pattern.clone(), r.id, action)
            })
            .collect();
        CommandPolicy {
            rules: compiled,
            default: grant.conditions.command_default,
        }
    }

    /// Whether anything is checked at all (no rules and an allowing default: nothing to do).
    pub fn is_active(&self) -> bool {
        !self.rules.is_empty() || self.default == Some(CommandAction::Deny)
    }

    /// Decides one command line (first match wins).
    pub fn check(&self, line: &str) -> CommandVerdict {
        for (re, pattern, id, action) in &self.rules {
            if re.as_ref().is_none_or(|re| re.is_match(line)) {
                return CommandVerdict {
                    action: *action,
                    rule: Some(*id),
                    pattern: Some(pattern.clone()),
                };
            }
        }
        CommandVerdict {
            action: self.default.unwrap_or(CommandAction::Allow),
            rule: None,
            pattern: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conditions;

    #[test]
    fn first_match_wins_then_the_grant_default() {
        let grant = Grant {
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            conditions: Conditions::default(),
        };
        let alice = User {
            name: "alice".into(),
            groups: vec!["ops".into()],
            ..User::default()
        };
        let rule = |id, scope: RuleScope, p: &str, a| CommandRule {
            id,
            scope,
            pattern: p.into(),
            action: a,
        };
        let g = RuleScope::Grant {
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
        };
        let snap = PolicySnapshot {
            command_rules: vec![
                rule(
                    3,
                    RuleScope::Group {
                        group: "ops".into(),
                    },
                    r"^shutdown",
                    CommandAction::Terminate,
                ),
                rule(1, g.clone(), r"^rm\s+-rf\s+/", CommandAction::Deny),
                rule(2, g, r"passwd", CommandAction::Alert),
                rule(
                    4,
                    RuleScope::Group {
                        group: "dba".into(),
                    },
                    r".*",
                    CommandAction::Deny,
                ),
            ],
            ..PolicySnapshot::default()
        };
        let p = CommandPolicy::for_session(&snap, &grant, &alice);
        assert!(p.is_active());
        assert_eq!(p.check("rm -rf /").action, CommandAction::Deny);
        assert_eq!(p.check("rm -rf /").rule, Some(1));
        assert_eq!(p.check("sudo passwd bob").action, CommandAction::Alert);
        assert_eq!(p.check("shutdown -h now").action, CommandAction::Terminate);
        let v = p.check("ls");
        assert_eq!(
            (v.action, v.rule),
            (CommandAction::Allow, None),
            "the dba rule does not apply"
        );
        // an allow-list grant
        let mut strict = grant.clone();
        strict.conditions.command_default = Some(CommandAction::Deny);
        let snap = PolicySnapshot {
            command_rules: vec![rule(
                1,
                RuleScope::Grant {
                    user: "alice".into(),
                    target: "web01".into(),
                    account: "root".into(),
                },
                r"^(ls|uptime)\b",
                CommandAction::Allow,
            )],
            ..PolicySnapshot::default()
        };
        let p = CommandPolicy::for_session(&snap, &strict, &alice);
        assert_eq!(p.check("uptime").action, CommandAction::Allow);
        assert_eq!(p.check("cat /etc/shadow").action, CommandAction::Deny);
        assert!(validate_pattern("(").is_err());
        assert!(validate_pattern("").is_err());
        assert!(!CommandPolicy::default().is_active());
    }
}
