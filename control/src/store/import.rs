//! Policy as one TOML document: [`Store::export`] writes it (users, groups, targets, target
//! groups, accounts without secrets, grants with their conditions, command rules) and
//! [`Store::import`] applies one atomically after validating all of it. What the document does
//! not carry stays as it is: passwords, TOTP enrolments, account credentials, locks.

use std::collections::{BTreeMap, BTreeSet};

use psm_control_api::{CommandAction, CommandRule, Grant, Protocol, RuleScope};
use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::snapshot::{read_grants, read_targets, read_users};
use super::{governance, Store, StoreError};
use crate::validate::{self, Invalid};

/// A user in the document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocUser {
    /// User name.
    pub name: String,
    /// Authorized keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// Disabled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// A group (of users or of targets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocGroup {
    /// Group name, without `@`.
    pub name: String,
    /// Members.
    #[serde(default)]
    pub members: Vec<String>,
}

/// A target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocTarget {
    /// Name.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Pinned host key (SSH) or certificate fingerprint `SHA256:…` (RDP).
    pub host_key: String,
    /// `ssh` (the default, left out), `rdp` or `tcp`.
    #[serde(default, skip_serializing_if = "Protocol::is_ssh")]
    pub protocol: Protocol,
    /// Where psm listens for a `tcp` target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// An account (its credential stays in the vault).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocAccount {
    /// Target.
    pub target: String,
    /// Login name.
    pub username: String,
    /// Windows domain (accounts on RDP targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// A command rule (its place in the list is its order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocRule {
    /// What it is attached to.
    pub scope: RuleScope,
    /// Regular expression.
    pub pattern: String,
    /// Action.
    pub action: CommandAction,
}

/// The whole policy, for version control.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// Users.
    #[serde(default)]
    pub users: Vec<DocUser>,
    /// Groups of users.
    #[serde(default)]
    pub groups: Vec<DocGroup>,
    /// Targets.
    #[serde(default)]
    pub targets: Vec<DocTarget>,
    /// Target groups.
    #[serde(default)]
    pub target_groups: Vec<DocGroup>,
    /// Accounts.
    #[serde(default)]
    pub accounts: Vec<DocAccount>,
    /// Grants, in order (the first whose conditions hold decides).
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Command rules, in order.
    #[serde(default)]
    pub command_rules: Vec<DocRule>,
}

/// What an import did (or would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    /// One line per change (`+ user bob`, `- grant …`, `~ target web01 address …`).
    pub changes: Vec<String>,
    /// Policy version after it (unchanged for a dry run or no change).
    pub version: u64,
    /// Whether it was applied.
    pub applied: bool,
}

fn bad(field: String, e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(Invalid(format!("{field}: {e}")))
}

impl PolicyDoc {
    /// Checks every field and every reference; the error names the field.
    pub fn validate(&self) -> Result<(), StoreError> {
        let mut users = BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let f = format!("users[{i}]");
            validate::user_name(&u.name).map_err(|e| bad(format!("{f}.name"), e))?;
            if !users.insert(u.name.as_str()) {
                return Err(bad(
                    format!("{f}.name"),
                    format!("duplicate user '{}'", u.name),
                ));
            }
            for (k, key) in u.ssh_keys.iter().enumerate() {
                validate::user_key(key).map_err(|e| bad(format!("{f}.ssh_keys[{k}]"), e))?;
            }
        }
        let mut groups = BTreeSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            let f = format!("groups[{i}]");
            validate::target_name(&g.name).map_err(|e| bad(format!("{f}.name"), e))?;
            if !groups.insert(g.name.as_str()) {
                return Err(bad(
                    format!("{f}.name"),
                    format!("duplicate group '{}'", g.name),
                ));
            }
            for (m, member) in g.members.iter().enumerate() {
                if !users.contains(member.as_str()) {
                    return Err(bad(
                        format!("{f}.members[{m}]"),
                        format!("unknown user '{member}'"),
                    ));
                }
            }
        }
        let mut targets = BTreeSet::new();
        let mut listens = BTreeSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let f = format!("targets[{i}]");
            validate::target_name(&t.name).map_err(|e| bad(format!("{f}.name"), e))?;
            validate::address(&t.address).map_err(|e| bad(format!("{f}.address"), e))?;
            validate::pin(t.protocol, &t.host_key).map_err(|e| bad(format!("{f}.host_key"), e))?;
            match (t.protocol, &t.listen) {
                (Protocol::Tcp, Some(l)) => {
                    let l =
                        validate::listen_address(l).map_err(|e| bad(format!("{f}.listen"), e))?;
                    if !listens.insert(l.clone()) {
                        return Err(bad(
                            format!("{f}.listen"),
                            format!("another target already listens on {l}"),
                        ));
                    }
                }
                (Protocol::Tcp, None) => {
                    return Err(bad(format!("{f}.listen"), "a tcp target needs one"));
                }
                (_, Some(_)) => {
                    return Err(bad(format!("{f}.listen"), "only tcp targets have one"));
                }
                (_, None) => {}
            }
            if !targets.insert(t.name.as_str()) {
                return Err(bad(
                    format!("{f}.name"),
                    format!("duplicate target '{}'", t.name),
                ));
            }
        }
        let mut tgroups = BTreeSet::new();
        for (i, g) in self.target_groups.iter().enumerate() {
            let f = format!("target_groups[{i}]");
            validate::target_name(&g.name).map_err(|e| bad(format!("{f}.name"), e))?;
            if !tgroups.insert(g.name.as_str()) {
                return Err(bad(
                    format!("{f}.name"),
                    format!("duplicate target group '{}'", g.name),
                ));
            }
            for (m, member) in g.members.iter().enumerate() {
                if !targets.contains(member.as_str()) {
                    return Err(bad(
                        format!("{f}.members[{m}]"),
                        format!("unknown target '{member}'"),
                    ));
                }
            }
        }
        let mut accounts = BTreeSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let f = format!("accounts[{i}]");
            validate::account_name(&a.username).map_err(|e| bad(format!("{f}.username"), e))?;
            if !targets.contains(a.target.as_str()) {
                return Err(bad(
                    format!("{f}.target"),
                    format!("unknown target '{}'", a.target),
                ));
            }
            if let Some(d) = &a.domain {
                validate::domain(d).map_err(|e| bad(format!("{f}.domain"), e))?;
                let rdp = self
                    .targets
                    .iter()
                    .any(|t| t.name == a.target && t.protocol == Protocol::Rdp);
                if !rdp {
                    return Err(bad(
                        format!("{f}.domain"),
                        format!("target '{}' is not an RDP target", a.target),
                    ));
                }
            }
            if !accounts.insert((a.target.as_str(), a.username.as_str())) {
                return Err(bad(
                    f,
                    format!("duplicate account {}@{}", a.username, a.target),
                ));
            }
        }
        let mut grants = BTreeSet::new();
        for (i, g) in self.grants.iter().enumerate() {
            let f = format!("grants[{i}]");
            match g.user.strip_prefix('@') {
                Some(n) if !groups.contains(n) => {
                    return Err(bad(format!("{f}.user"), format!("unknown group '@{n}'")))
                }
                None if !users.contains(g.user.as_str()) => {
                    return Err(bad(
                        format!("{f}.user"),
                        format!("unknown user '{}'", g.user),
                    ))
                }
                _ => {}
            }
            match g.target.strip_prefix('@') {
                Some(n) if !tgroups.contains(n) => {
                    return Err(bad(
                        format!("{f}.target"),
                        format!("unknown target group '@{n}'"),
                    ))
                }
                None if !accounts.contains(&(g.target.as_str(), g.account.as_str())) => {
                    return Err(bad(
                        format!("{f}.account"),
                        format!("unknown account '{}@{}'", g.account, g.target),
                    ))
                }
                _ => {}
            }
            g.conditions
                .validate()
                .map_err(|e| bad(format!("{f}.conditions"), e))?;
            if !grants.insert((g.user.as_str(), g.target.as_str(), g.account.as_str())) {
                return Err(bad(
                    f,
                    format!("duplicate grant {} -> {}@{}", g.user, g.account, g.target),
                ));
            }
        }
        for (i, r) in self.command_rules.iter().enumerate() {
            let f = format!("command_rules[{i}]");
            psm_control_api::commands::validate_pattern(&r.pattern)
                .map_err(|e| bad(format!("{f}.pattern"), e))?;
            match &r.scope {
                RuleScope::Grant {
                    user,
                    target,
                    account,
                } if !grants.contains(&(user.as_str(), target.as_str(), account.as_str())) => {
                    return Err(bad(
                        format!("{f}.scope"),
                        format!("no grant {user} -> {account}@{target}"),
                    ))
                }
                RuleScope::Group { group } if !groups.contains(group.as_str()) => {
                    return Err(bad(
                        format!("{f}.scope"),
                        format!("unknown group '@{group}'"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Store {
    /// The whole policy as a document (no secret in it).
    pub fn export(&self) -> Result<PolicyDoc, StoreError> {
        let users = read_users(&self.conn, None)?;
        let targets = read_targets(&self.conn)?;
        let groups = self.list_groups()?;
        let tgroups = self.list_target_groups()?;
        let accounts = self.list_accounts()?;
        Ok(PolicyDoc {
            users: users
                .iter()
                .map(|u| DocUser {
                    name: u.name.clone(),
                    ssh_keys: u.ssh_keys.clone(),
                    disabled: u.disabled,
                })
                .collect(),
            groups: groups
                .into_iter()
                .map(|g| DocGroup {
                    name: g.name,
                    members: g.members,
                })
                .collect(),
            targets: targets
                .iter()
                .map(|t| DocTarget {
                    name: t.name.clone(),
                    address: t.address.clone(),
                    host_key: t.host_key.clone(),
                    protocol: t.protocol,
                    listen: t.listen.clone(),
                })
                .collect(),
            target_groups: tgroups
                .into_iter()
                .map(|g| DocGroup {
                    name: g.name,
                    members: g.members,
                })
                .collect(),
            accounts: accounts
                .into_iter()
                .map(|a| DocAccount {
                    target: a.target,
                    username: a.username,
                    domain: a.domain,
                })
                .collect(),
            grants: read_grants(&self.conn)?,
            command_rules: governance::read_command_rules(&self.conn)?
                .into_iter()
                .map(|r: CommandRule| DocRule {
                    scope: r.scope,
                    pattern: r.pattern,
                    action: r.action,
                })
                .collect(),
        })
    }

    /// Applies `doc` as the new policy in one transaction (or, with `dry_run`, only says what
    /// it would change). A document that would leave no grant where there were some, or no
    /// user, is refused unless `force`: it would lock everyone out.
    pub fn import(
        &mut self,
        doc: &PolicyDoc,
        dry_run: bool,
        force: bool,
    ) -> Result<ImportReport, StoreError> {
        doc.validate()?;
        let now = self.export()?;
        if !force
            && ((doc.grants.is_empty() && !now.grants.is_empty())
                || (doc.users.is_empty() && !now.users.is_empty()))
        {
            return Err(StoreError::Invalid(Invalid(
                "this document would leave no grant (or no user): everyone would be locked out; give --force to apply it anyway".into(),
            )));
        }
        let mut changes = Vec::new();
        let cur_users: BTreeMap<&str, &DocUser> =
            now.users.iter().map(|u| (u.name.as_str(), u)).collect();
        let new_users: BTreeMap<&str, &DocUser> =
            doc.users.iter().map(|u| (u.name.as_str(), u)).collect();
        for (name, u) in &new_users {
            match cur_users.get(name) {
                None if u.ssh_keys.is_empty() => {
                    return Err(StoreError::Invalid(Invalid(format!(
                        "users: '{name}' is new and has no ssh key: create it with psmctl user add (passwords are not imported)"
                    ))))
                }
                None => changes.push(format!("+ user {name}")),
                Some(c) if *c != *u => changes.push(format!("~ user {name}")),
                _ => {}
            }
        }
        for name in cur_users.keys().filter(|n| !new_users.contains_key(*n)) {
            changes.push(format!("- user {name}"));
        }
        let cur_t: BTreeMap<&str, &DocTarget> =
            now.targets.iter().map(|t| (t.name.as_str(), t)).collect();
        let new_t: BTreeMap<&str, &DocTarget> =
            doc.targets.iter().map(|t| (t.name.as_str(), t)).collect();
        for (name, t) in &new_t {
            match cur_t.get(name) {
                Some(c) if c.protocol != t.protocol => {
                    return Err(StoreError::Invalid(Invalid(format!(
                        "targets: '{name}' would change protocol from {} to {}: remove it and add it again",
                        c.protocol, t.protocol
                    ))))
                }
                None => changes.push(format!("+ target {name} ({})", t.address)),
                Some(c) if *c != *t => changes.push(format!("~ target {name}")),
                _ => {}
            }
        }
        for name in cur_t.keys().filter(|n| !new_t.contains_key(*n)) {
            changes.push(format!("- target {name}"));
        }
        let cur_a: BTreeSet<(&str, &str)> = now
            .accounts
            .iter()
            .map(|a| (a.target.as_str(), a.username.as_str()))
            .collect();
        let tcp_account = |a: &DocAccount| {
            a.username == psm_control_api::TCP_ACCOUNT
                && doc
                    .targets
                    .iter()
                    .any(|t| t.name == a.target && t.protocol == Protocol::Tcp)
        };
        for a in &doc.accounts {
            // a tcp target's one account comes with the target
            if !cur_a.contains(&(a.target.as_str(), a.username.as_str())) && !tcp_account(a) {
                return Err(StoreError::Invalid(Invalid(format!(
                    "accounts: {}@{} is new: add it with psmctl account add (credentials are not imported)",
                    a.username, a.target
                ))));
            }
        }
        let new_a: BTreeSet<(&str, &str)> = doc
            .accounts
            .iter()
            .map(|a| (a.target.as_str(), a.username.as_str()))
            .collect();
        for (t, u) in cur_a.iter().filter(|a| !new_a.contains(*a)) {
            changes.push(format!("- account {u}@{t}"));
        }
        let domain_changes: Vec<&DocAccount> = doc
            .accounts
            .iter()
            .filter(|a| {
                now.accounts.iter().any(|c| {
                    c.target == a.target && c.username == a.username && c.domain != a.domain
                })
            })
            .collect();
        for a in &domain_changes {
            changes.push(format!(
                "~ account {}@{} domain {}",
                a.username,
                a.target,
                a.domain.as_deref().unwrap_or("(none)")
            ));
        }
        let set_diff = |what: &str, cur: &[DocGroup], new: &[DocGroup], out: &mut Vec<String>| {
            for g in new {
                match cur.iter().find(|c| c.name == g.name) {
                    None => out.push(format!("+ {what} @{}", g.name)),
                    Some(c) if c != g => out.push(format!("~ {what} @{}", g.name)),
                    _ => {}
                }
            }
            for c in cur.iter().filter(|c| !new.iter().any(|g| g.name == c.name)) {
                out.push(format!("- {what} @{}", c.name));
            }
        };
        set_diff("group", &now.groups, &doc.groups, &mut changes);
        set_diff(
            "target group",
            &now.target_groups,
            &doc.target_groups,
            &mut changes,
        );
        let grant_line = |g: &Grant| format!("grant {} -> {}@{}", g.user, g.account, g.target);
        if now.grants != doc.grants {
            for g in &doc.grants {
                match now
                    .grants
                    .iter()
                    .find(|c| c.user == g.user && c.target == g.target && c.account == g.account)
                {
                    None => changes.push(format!("+ {}", grant_line(g))),
                    Some(c) if c != g => changes.push(format!("~ {}", grant_line(g))),
                    _ => {}
                }
            }
            for c in now.grants.iter().filter(|c| {
                !doc.grants
                    .iter()
                    .any(|g| c.user == g.user && c.target == g.target && c.account == g.account)
            }) {
                changes.push(format!("- {}", grant_line(c)));
            }
            if !changes.iter().any(|l| l.contains("grant ")) {
                changes.push("~ grant order".into());
            }
        }
        if now.command_rules != doc.command_rules {
            changes.push(format!(
                "~ command rules ({} -> {})",
                now.command_rules.len(),
                doc.command_rules.len()
            ));
        }
        let version = self.policy_version()?;
        if changes.is_empty() || dry_run {
            return Ok(ImportReport {
                changes,
                version,
                applied: false,
            });
        }
        let tx = self.conn.transaction()?;
        // users: new ones, key and state changes, removals (with their grants and memberships)
        for u in &doc.users {
            tx.execute(
                "INSERT INTO users (name, password) VALUES (?1, NULL) ON CONFLICT(name) DO NOTHING",
                [&u.name],
            )?;
            tx.execute(
                "UPDATE users SET disabled = ?2 WHERE name = ?1",
                params![u.name, u.disabled],
            )?;
            if cur_users.get(u.name.as_str()).map(|c| &c.ssh_keys) != Some(&u.ssh_keys) {
                tx.execute("DELETE FROM user_keys WHERE user = ?1", [&u.name])?;
                for key in &u.ssh_keys {
                    let (full, material) = validate::user_key(key)?;
                    tx.execute(
                        "INSERT INTO user_keys (user, key, material) VALUES (?1, ?2, ?3)",
                        params![u.name, full, material],
                    )?;
                }
            }
        }
        for name in cur_users.keys().filter(|n| !new_users.contains_key(*n)) {
            tx.execute("DELETE FROM users WHERE name = ?1", [name])?;
        }
        for t in &doc.targets {
            let host_key = validate::pin(t.protocol, &t.host_key)?;
            let address = validate::address_for(t.protocol, &t.address)?;
            tx.execute(
                "INSERT INTO targets (name, address, host_key, protocol, listen)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET address = ?2, host_key = ?3, listen = ?5",
                params![
                    t.name,
                    address,
                    host_key,
                    t.protocol.as_str(),
                    t.listen
                        .as_deref()
                        .map(validate::listen_address)
                        .transpose()?
                ],
            )?;
            if t.protocol == Protocol::Tcp {
                tx.execute(
                    "INSERT INTO accounts (target, username, kind, ciphertext)
                     VALUES (?1, ?2, 'none', x'') ON CONFLICT DO NOTHING",
                    params![t.name, psm_control_api::TCP_ACCOUNT],
                )?;
            }
        }
        for name in cur_t.keys().filter(|n| !new_t.contains_key(*n)) {
            tx.execute("DELETE FROM targets WHERE name = ?1", [name])?;
        }
        for (t, u) in cur_a.iter().filter(|a| !new_a.contains(*a)) {
            tx.execute(
                "DELETE FROM accounts WHERE target = ?1 AND username = ?2",
                [t, u],
            )?;
        }
        for a in &domain_changes {
            tx.execute(
                "UPDATE accounts SET domain = ?3 WHERE target = ?1 AND username = ?2",
                params![a.target, a.username, a.domain],
            )?;
        }
        tx.execute_batch(
            "DELETE FROM groups; DELETE FROM target_groups; DELETE FROM grants; DELETE FROM command_rules;",
        )?;
        for g in &doc.groups {
            tx.execute("INSERT INTO groups (name) VALUES (?1)", [&g.name])?;
            for m in &g.members {
                tx.execute(
                    "INSERT INTO group_members (grp, user) VALUES (?1, ?2)",
                    [&g.name, m],
                )?;
            }
        }
        for g in &doc.target_groups {
            tx.execute("INSERT INTO target_groups (name) VALUES (?1)", [&g.name])?;
            for m in &g.members {
                tx.execute(
                    "INSERT INTO target_group_members (grp, target) VALUES (?1, ?2)",
                    [&g.name, m],
                )?;
            }
        }
        for g in &doc.grants {
            let conditions = serde_json::to_string(&g.conditions)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO grants (user, target, account, conditions) VALUES (?1, ?2, ?3, ?4)",
                params![g.user, g.target, g.account, conditions],
            )?;
        }
        for r in &doc.command_rules {
            let scope =
                serde_json::to_string(&r.scope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO command_rules (scope, pattern, action) VALUES (?1, ?2, ?3)",
                params![scope, r.pattern, r.action.as_str()],
            )?;
        }
        let version = Self::bump(&tx)?;
        tx.commit()?;
        Ok(ImportReport {
            changes,
            version,
            applied: true,
        })
    }
}
