//! The store's command rules: patterns that allow or deny commands, attached to a grant or to a
//! group of users, and the housekeeping that drops them when their grant or group goes.

use psm_control_api::{CommandAction, CommandRule, RuleScope};
use rusqlite::{params, Connection};

use super::{Store, StoreError};
use crate::validate::Invalid;

/// The command rules, in id order.
pub(super) fn read_command_rules(c: &Connection) -> Result<Vec<CommandRule>, StoreError> {
    let mut stmt = c.prepare("SELECT id, scope, pattern, action FROM command_rules ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, scope, pattern, action) = row?;
        let scope: RuleScope = serde_json::from_str(&scope)
            .map_err(|e| StoreError::Corrupt(format!("command rule {id}: scope: {e}")))?;
        let action = CommandAction::parse(&action)
            .map_err(|e| StoreError::Corrupt(format!("command rule {id}: {e}")))?;
        out.push(CommandRule {
            id: id as u64,
            scope,
            pattern,
            action,
        });
    }
    Ok(out)
}

/// Removes the rules whose grant or group no longer exists (after any removal).
pub(super) fn prune_rules(c: &Connection) -> Result<usize, StoreError> {
    let mut gone = Vec::new();
    for r in read_command_rules(c)? {
        let exists = match &r.scope {
            RuleScope::Grant {
                user,
                target,
                account,
            } => Store::exists(
                c,
                "SELECT 1 FROM grants WHERE user = ?1 AND target = ?2 AND account = ?3",
                [user, target, account],
            )?,
            RuleScope::Group { group } => {
                Store::exists(c, "SELECT 1 FROM groups WHERE name = ?1", [group])?
            }
        };
        if !exists {
            gone.push(r.id as i64);
        }
    }
    for id in &gone {
        c.execute("DELETE FROM command_rules WHERE id = ?1", [id])?;
    }
    Ok(gone.len())
}

/// Removes the rules attached to `scope` (its grant or group is gone).
pub(super) fn drop_rules(c: &Connection, scope: &RuleScope) -> Result<usize, StoreError> {
    let json = serde_json::to_string(scope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(c.execute("DELETE FROM command_rules WHERE scope = ?1", [json])?)
}

impl Store {
    /// Adds a command rule at the end of the order. Returns the new policy version and the
    /// rule's id.
    pub fn add_command_rule(
        &mut self,
        scope: &RuleScope,
        pattern: &str,
        action: CommandAction,
    ) -> Result<(u64, u64), StoreError> {
        psm_control_api::commands::validate_pattern(pattern).map_err(Invalid)?;
        let tx = self.conn.transaction()?;
        match scope {
            RuleScope::Grant {
                user,
                target,
                account,
            } => {
                if !Self::exists(
                    &tx,
                    "SELECT 1 FROM grants WHERE user = ?1 AND target = ?2 AND account = ?3",
                    [user, target, account],
                )? {
                    return Err(StoreError::NotFound(format!(
                        "no grant {user} -> {account}@{target}"
                    )));
                }
            }
            RuleScope::Group { group } => Self::require_group(&tx, group)?,
        }
        let json = serde_json::to_string(scope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        tx.execute(
            "INSERT INTO command_rules (scope, pattern, action) VALUES (?1, ?2, ?3)",
            params![json, pattern, action.as_str()],
        )?;
        let id = tx.last_insert_rowid() as u64;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok((v, id))
    }

    /// Removes a command rule.
    pub fn remove_command_rule(&mut self, id: u64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM command_rules WHERE id = ?1", [id as i64])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no command rule {id}")));
        }
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Lists command rules in order.
    pub fn list_command_rules(&self) -> Result<Vec<CommandRule>, StoreError> {
        read_command_rules(&self.conn)
    }
}
