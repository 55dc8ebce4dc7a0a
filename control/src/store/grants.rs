//! Grants: a user (or `@group`) given an account on a target (or on a `@group` of targets),
//! with conditions.

use psm_control_api::Conditions;

use super::snapshot::read_grants;
use super::{governance, Store, StoreError};
use crate::protocol::GrantInfo;
use crate::validate;

impl Store {
    /// Grants `user` the account `account@target`. Returns the new policy version.
    pub fn add_grant(
        &mut self,
        user: &str,
        target: &str,
        account: &str,
    ) -> Result<u64, StoreError> {
        self.add_grant_with(user, target, account, &Conditions::default())
    }

    /// Like [`Store::add_grant`], with conditions.
    pub fn add_grant_with(
        &mut self,
        user: &str,
        target: &str,
        account: &str,
        conditions: &Conditions,
    ) -> Result<u64, StoreError> {
        let conditions = serde_json::to_string(conditions)
            .map_err(|e| StoreError::Conflict(format!("conditions: {e}")))?;
        let tx = self.conn.transaction()?;
        match user.strip_prefix('@') {
            Some(g) => Self::require_group(&tx, g)?,
            None => Self::require_user(&tx, user)?,
        }
        match target.strip_prefix('@') {
            Some(g) => {
                Self::require_target_group(&tx, g)?;
                validate::account_name(account)?;
            }
            None => {
                Self::require_target(&tx, target)?;
                Self::require_account(&tx, target, account)?;
            }
        }
        if Self::exists(
            &tx,
            "SELECT 1 FROM grants WHERE user = ?1 AND target = ?2 AND account = ?3",
            [user, target, account],
        )? {
            return Err(StoreError::Conflict(format!(
                "grant {user} -> {account}@{target} already exists"
            )));
        }
        tx.execute(
            "INSERT INTO grants (user, target, account, conditions) VALUES (?1, ?2, ?3, ?4)",
            [user, target, account, conditions.as_str()],
        )?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Removes a grant. Returns the new policy version.
    pub fn remove_grant(
        &mut self,
        user: &str,
        target: &str,
        account: &str,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "DELETE FROM grants WHERE user = ?1 AND target = ?2 AND account = ?3",
            [user, target, account],
        )?;
        governance::drop_rules(
            &tx,
            &psm_control_api::RuleScope::Grant {
                user: user.to_string(),
                target: target.to_string(),
                account: account.to_string(),
            },
        )?;
        if n == 0 {
            if !user.starts_with('@') {
                Self::require_user(&tx, user)?;
            }
            return Err(StoreError::NotFound(format!(
                "no grant {user} -> {account}@{target}"
            )));
        }
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Lists grants, by user, target, account.
    pub fn list_grants(&self) -> Result<Vec<GrantInfo>, StoreError> {
        Ok(read_grants(&self.conn)?
            .into_iter()
            .map(|g| GrantInfo {
                user: g.user,
                target: g.target,
                account: g.account,
                conditions: g.conditions,
            })
            .collect())
    }
}
