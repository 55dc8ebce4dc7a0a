//! The store's governance tables: groups and target groups, user state (disabled, locked, TOTP
//! enrolment) and the failed logins the lockout counts.

use psm_control_api::{PasswordHash, RuleScope};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

pub(super) use super::command_rules::{drop_rules, prune_rules, read_command_rules};
use super::{Removed, Store, StoreError};
use crate::validate::{self, Invalid};
use crate::vault::{totp_aad, Vault};

/// A group (of users, or of targets) as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group name (without the `@`).
    pub name: String,
    /// Members, by name.
    pub members: Vec<String>,
}

/// When failed logins lock a user: `max_failures` within `window_ms` lock for `window_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lockout {
    /// Failures that lock.
    pub max_failures: u32,
    /// The window they are counted in, and how long the lock lasts, ms.
    pub window_ms: u64,
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout {
            max_failures: 5,
            window_ms: 15 * 60 * 1000,
        }
    }
}

/// Which kind of group a call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Users,
    Targets,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Users => "groups",
            Kind::Targets => "target_groups",
        }
    }
    fn members(self) -> &'static str {
        match self {
            Kind::Users => "group_members",
            Kind::Targets => "target_group_members",
        }
    }
    fn member_col(self) -> &'static str {
        match self {
            Kind::Users => "user",
            Kind::Targets => "target",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Kind::Users => "group",
            Kind::Targets => "target group",
        }
    }
}

impl Store {
    pub(super) fn require_group(c: &Connection, name: &str) -> Result<(), StoreError> {
        if Self::exists(c, "SELECT 1 FROM groups WHERE name = ?1", [name])? {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("unknown group '@{name}'")))
        }
    }

    pub(super) fn require_target_group(c: &Connection, name: &str) -> Result<(), StoreError> {
        if Self::exists(c, "SELECT 1 FROM target_groups WHERE name = ?1", [name])? {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!(
                "unknown target group '@{name}'"
            )))
        }
    }

    fn add_any_group(&mut self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        validate::user_name(name).map_err(|e| Invalid(format!("{} name: {}", kind.what(), e.0)))?;
        let tx = self.conn.transaction()?;
        let sql = format!("SELECT 1 FROM {} WHERE name = ?1", kind.table());
        if Self::exists(&tx, &sql, [name])? {
            return Err(StoreError::Conflict(format!(
                "{} '@{name}' already exists",
                kind.what()
            )));
        }
        tx.execute(
            &format!("INSERT INTO {} (name) VALUES (?1)", kind.table()),
            [name],
        )?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    fn remove_any_group(&mut self, kind: Kind, name: &str) -> Result<Removed, StoreError> {
        let tx = self.conn.transaction()?;
        match kind {
            Kind::Users => Self::require_group(&tx, name)?,
            Kind::Targets => Self::require_target_group(&tx, name)?,
        }
        let side = match kind {
            Kind::Users => "user",
            Kind::Targets => "target",
        };
        let grants = tx.execute(
            &format!("DELETE FROM grants WHERE {side} = ?1"),
            [format!("@{name}")],
        )?;
        if kind == Kind::Users {
            drop_rules(
                &tx,
                &RuleScope::Group {
                    group: name.to_string(),
                },
            )?;
        }
        tx.execute(
            &format!("DELETE FROM {} WHERE name = ?1", kind.table()),
            [name],
        )?;
        prune_rules(&tx)?;
        let version = Self::bump(&tx)?;
        tx.commit()?;
        Ok(Removed {
            version,
            accounts: 0,
            grants,
        })
    }

    fn list_any_groups(&self, kind: Kind) -> Result<Vec<GroupInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT name FROM {} ORDER BY name", kind.table()))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut members = self.conn.prepare(&format!(
            "SELECT {} FROM {} WHERE grp = ?1 ORDER BY 1",
            kind.member_col(),
            kind.members()
        ))?;
        let mut out = Vec::new();
        for name in names {
            let m = members
                .query_map([&name], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            out.push(GroupInfo { name, members: m });
        }
        Ok(out)
    }

    fn member_any(
        &mut self,
        kind: Kind,
        group: &str,
        member: &str,
        add: bool,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        match kind {
            Kind::Users => {
                Self::require_group(&tx, group)?;
                Self::require_user(&tx, member)?;
            }
            Kind::Targets => {
                Self::require_target_group(&tx, group)?;
                Self::require_target(&tx, member)?;
            }
        }
        let n = if add {
            tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO {} (grp, {}) VALUES (?1, ?2)",
                    kind.members(),
                    kind.member_col()
                ),
                [group, member],
            )?
        } else {
            tx.execute(
                &format!(
                    "DELETE FROM {} WHERE grp = ?1 AND {} = ?2",
                    kind.members(),
                    kind.member_col()
                ),
                [group, member],
            )?
        };
        if n == 0 {
            return Err(if add {
                StoreError::Conflict(format!("'{member}' is already in @{group}"))
            } else {
                StoreError::NotFound(format!("'{member}' is not in @{group}"))
            });
        }
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Adds a group of users.
    pub fn add_group(&mut self, name: &str) -> Result<u64, StoreError> {
        self.add_any_group(Kind::Users, name)
    }
    /// Removes a group of users with the grants that name it.
    pub fn remove_group(&mut self, name: &str) -> Result<Removed, StoreError> {
        self.remove_any_group(Kind::Users, name)
    }
    /// Lists groups of users with their members.
    pub fn list_groups(&self) -> Result<Vec<GroupInfo>, StoreError> {
        self.list_any_groups(Kind::Users)
    }
    /// Adds a user to a group (`add`) or removes them.
    pub fn group_member(&mut self, group: &str, user: &str, add: bool) -> Result<u64, StoreError> {
        self.member_any(Kind::Users, group, user, add)
    }
    /// Adds a target group.
    pub fn add_target_group(&mut self, name: &str) -> Result<u64, StoreError> {
        self.add_any_group(Kind::Targets, name)
    }
    /// Removes a target group with the grants that name it.
    pub fn remove_target_group(&mut self, name: &str) -> Result<Removed, StoreError> {
        self.remove_any_group(Kind::Targets, name)
    }
    /// Lists target groups with their members.
    pub fn list_target_groups(&self) -> Result<Vec<GroupInfo>, StoreError> {
        self.list_any_groups(Kind::Targets)
    }
    /// Adds a target to a target group (`add`) or removes it.
    pub fn target_group_member(
        &mut self,
        group: &str,
        target: &str,
        add: bool,
    ) -> Result<u64, StoreError> {
        self.member_any(Kind::Targets, group, target, add)
    }

    fn update_user(&mut self, name: &str, sql: &str) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        Self::require_user(&tx, name)?;
        tx.execute(sql, [name])?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Disables a user (`true`: no login, live sessions end) or enables them again.
    pub fn set_disabled(&mut self, name: &str, disabled: bool) -> Result<u64, StoreError> {
        self.update_user(
            name,
            if disabled {
                "UPDATE users SET disabled = 1 WHERE name = ?1"
            } else {
                "UPDATE users SET disabled = 0 WHERE name = ?1"
            },
        )
    }

    /// Lifts a lock and forgets the failures that led to it.
    pub fn unlock(&mut self, name: &str) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        Self::require_user(&tx, name)?;
        tx.execute(
            "UPDATE users SET locked_until_ms = NULL WHERE name = ?1",
            [name],
        )?;
        tx.execute("DELETE FROM auth_failures WHERE user = ?1", [name])?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Enrols (or re-enrols) a user's TOTP secret (base32), sealed by the vault.
    pub fn set_totp(&mut self, vault: &Vault, name: &str, secret: &str) -> Result<u64, StoreError> {
        let sealed = vault.seal(&totp_aad(name), secret.as_bytes())?;
        let tx = self.conn.transaction()?;
        Self::require_user(&tx, name)?;
        tx.execute(
            "UPDATE users SET totp = ?2, totp_last_step = 0 WHERE name = ?1",
            params![name, sealed],
        )?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Removes a user's TOTP enrolment.
    pub fn reset_totp(&mut self, name: &str) -> Result<u64, StoreError> {
        self.update_user(
            name,
            "UPDATE users SET totp = NULL, totp_last_step = 0 WHERE name = ?1",
        )
    }

    /// Records that a TOTP code of time step `step` was accepted for `name`, so it is never
    /// accepted again. Returns the new policy version, or None when nothing changed (an older
    /// step, or an unknown user).
    pub fn totp_used(&mut self, name: &str, step: u64) -> Result<Option<u64>, StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE users SET totp_last_step = ?2
             WHERE name = ?1 AND totp IS NOT NULL AND totp_last_step < ?2",
            params![name, step as i64],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(Some(v))
    }

    /// Counts a failed login of `name` at `now_ms`. When it makes `lockout.max_failures` within
    /// the window, the user is locked for the window: returns the new policy version and the
    /// end of the lock. Unknown users are not counted.
    pub fn auth_failed(
        &mut self,
        name: &str,
        now_ms: u64,
        lockout: Lockout,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let tx = self.conn.transaction()?;
        if !Self::exists(&tx, "SELECT 1 FROM users WHERE name = ?1", [name])? {
            return Ok(None);
        }
        let since = now_ms.saturating_sub(lockout.window_ms) as i64;
        tx.execute(
            "DELETE FROM auth_failures WHERE user = ?1 AND ts_ms <= ?2",
            params![name, since],
        )?;
        tx.execute(
            "INSERT INTO auth_failures (user, ts_ms) VALUES (?1, ?2)",
            params![name, now_ms as i64],
        )?;
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM auth_failures WHERE user = ?1",
            [name],
            |r| r.get(0),
        )?;
        let already: Option<i64> = tx
            .query_row(
                "SELECT locked_until_ms FROM users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let locked_now = already.is_some_and(|t| t as u64 > now_ms);
        if count < i64::from(lockout.max_failures) || locked_now {
            tx.commit()?;
            return Ok(None);
        }
        let until = now_ms.saturating_add(lockout.window_ms);
        tx.execute(
            "UPDATE users SET locked_until_ms = ?2 WHERE name = ?1",
            params![name, until as i64],
        )?;
        tx.execute("DELETE FROM auth_failures WHERE user = ?1", [name])?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(Some((v, until)))
    }

    /// A successful login: the failures counted so far are forgotten.
    ///
    /// `second_factor`: the login gave a verification code. A user enrolled in TOTP whose login
    /// gave none (a login the relay accepted on the first factor alone, refused later) proved
    /// only the password: the failures stay and age out of the window, so that guessed codes
    /// count toward the lockout however the guesser interleaves such logins.
    pub fn auth_succeeded(&mut self, name: &str, second_factor: bool) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM auth_failures WHERE user = ?1
               AND (?2 OR NOT EXISTS (SELECT 1 FROM users WHERE name = ?1 AND totp IS NOT NULL))",
            params![name, second_factor],
        )?;
        Ok(())
    }

    /// Replaces `name`'s password verifier by `new` if it is still `old` (a relay rehashing a
    /// legacy verifier after a successful login). Returns the new policy version when it did.
    pub fn rehash(
        &mut self,
        name: &str,
        old: &PasswordHash,
        new: &PasswordHash,
    ) -> Result<Option<u64>, StoreError> {
        if !new.well_formed() || new.needs_rehash() {
            return Ok(None);
        }
        let old = serde_json::to_string(old).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let new = serde_json::to_string(new).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE users SET password = ?3 WHERE name = ?1 AND password = ?2",
            params![name, old, new],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::Vault;
    use psm_control_api::CommandAction;

    #[test]
    fn lockout_counts_within_the_window_and_rules_go_with_their_grant() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut s = Store::open(&tmp.path().join("psm.db")).expect("store");
        let vault = Vault::new(&[7u8; 32]).expect("vault");
        let h = PasswordHash::new("a long enough password").expect("hash");
        s.add_user("alice", Some(&h), &[]).expect("user");
        let lock = Lockout {
            max_failures: 3,
            window_ms: 1000,
        };
        assert_eq!(s.auth_failed("alice", 0, lock).expect("f"), None);
        assert_eq!(s.auth_failed("alice", 10, lock).expect("f"), None);
        // the first failure left the window: still two
        assert_eq!(s.auth_failed("alice", 1005, lock).expect("f"), None);
        let locked = s.auth_failed("alice", 1006, lock).expect("f");
        assert_eq!(locked.map(|(_, until)| until), Some(2006));
        let snap = s.snapshot(&vault).expect("snap");
        assert_eq!(snap.users[0].locked_until_ms, Some(2006));
        s.unlock("alice").expect("unlock");
        assert_eq!(
            s.snapshot(&vault).expect("snap").users[0].locked_until_ms,
            None
        );
        assert_eq!(
            s.auth_failed("nobody", 0, lock).expect("f"),
            None,
            "unknown users are not counted"
        );
        // TOTP steps only move forward
        s.set_totp(&vault, "alice", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")
            .expect("totp");
        assert!(s.totp_used("alice", 5).expect("used").is_some());
        assert!(s.totp_used("alice", 5).expect("used").is_none());
        assert!(s.totp_used("alice", 4).expect("used").is_none());
        let snap = s.snapshot(&vault).expect("snap");
        let t = snap.users[0].totp.as_ref().expect("enrolled");
        assert_eq!(
            (t.last_step, t.secret.expose()),
            (5, "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")
        );
        // enrolled in TOTP: a login on the password alone clears no failure (guessed codes
        // still count), one with a code does
        let long = Lockout {
            max_failures: 3,
            window_ms: 60_000,
        };
        s.unlock("alice").expect("unlock");
        assert_eq!(s.auth_failed("alice", 10_000, long).expect("f"), None);
        assert_eq!(s.auth_failed("alice", 10_001, long).expect("f"), None);
        s.auth_succeeded("alice", false).expect("success");
        assert!(
            s.auth_failed("alice", 10_002, long).expect("f").is_some(),
            "the third failure locks: the password-only login cleared nothing"
        );
        s.unlock("alice").expect("unlock");
        s.auth_succeeded("alice", true).expect("success");
        assert_eq!(s.auth_failed("alice", 10_003, long).expect("f"), None);
        // a group's rules go with the group
        s.add_group("ops").expect("group");
        s.add_command_rule(
            &RuleScope::Group {
                group: "ops".into(),
            },
            "^rm",
            CommandAction::Deny,
        )
        .expect("rule");
        assert_eq!(s.list_command_rules().expect("rules").len(), 1);
        s.remove_group("ops").expect("remove");
        assert!(s.list_command_rules().expect("rules").is_empty());
        // rehash replaces only the verifier it was computed from
        let old = PasswordHash::pbkdf2("pw-one", 1000).expect("old");
        s.set_password("alice", &old).expect("set");
        let new = PasswordHash::new("pw-one").expect("new");
        assert!(
            s.rehash("alice", &h, &new).expect("rehash").is_none(),
            "stale"
        );
        assert!(s.rehash("alice", &old, &new).expect("rehash").is_some());
        let snap = s.snapshot(&vault).expect("snap");
        assert!(!snap.users[0].password.as_ref().expect("pw").needs_rehash());
    }
}
