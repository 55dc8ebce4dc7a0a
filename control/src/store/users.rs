//! Users: adding them (with a password verifier, NT hash and/or SSH keys), removing them,
//! changing their password, listing them.

use psm_control_api::{PasswordHash, Secret};
use rusqlite::params;

use super::snapshot::read_users;
use super::{governance, Removed, Store, StoreError};
use crate::protocol::UserInfo;
use crate::validate::{self, Invalid};
use crate::vault::{nt_hash_aad, Vault};

impl Store {
    /// Adds a user with an optional password verifier and authorized keys (at least one of
    /// the two). Returns the new policy version.
    pub fn add_user(
        &mut self,
        name: &str,
        password: Option<&PasswordHash>,
        ssh_keys: &[String],
    ) -> Result<u64, StoreError> {
        self.insert_user(name, password, None, ssh_keys)
    }

    /// Like [`Store::add_user`], also keeping the password's NT hash (see [`crate::ntlm`])
    /// sealed by `vault`, so that the user can log in over RDP.
    pub fn add_user_with_nt_hash(
        &mut self,
        vault: &Vault,
        name: &str,
        password: Option<(&PasswordHash, &Secret)>,
        ssh_keys: &[String],
    ) -> Result<u64, StoreError> {
        let sealed = match password {
            Some((_, nt)) => Some(seal_nt_hash(vault, name, nt)?),
            None => None,
        };
        self.insert_user(name, password.map(|(h, _)| h), sealed, ssh_keys)
    }

    fn insert_user(
        &mut self,
        name: &str,
        password: Option<&PasswordHash>,
        sealed_nt_hash: Option<Vec<u8>>,
        ssh_keys: &[String],
    ) -> Result<u64, StoreError> {
        validate::user_name(name)?;
        if password.is_none() && ssh_keys.is_empty() {
            return Err(Invalid(format!(
                "user '{name}' needs a password or at least one ssh key"
            ))
            .into());
        }
        let password_json = match password {
            Some(h) => {
                check_hash(h)?;
                Some(serde_json::to_string(h).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            }
            None => None,
        };
        let mut keys: Vec<(String, String)> = Vec::new();
        for line in ssh_keys {
            let (full, material) = validate::user_key(line)?;
            if keys.iter().any(|(_, m)| *m == material) {
                return Err(Invalid(format!("duplicate ssh key for user '{name}'")).into());
            }
            keys.push((full, material));
        }
        let tx = self.conn.transaction()?;
        if Self::exists(&tx, "SELECT 1 FROM users WHERE name = ?1", [name])? {
            return Err(StoreError::Conflict(format!(
                "user '{name}' already exists"
            )));
        }
        tx.execute(
            "INSERT INTO users (name, password, nt_hash) VALUES (?1, ?2, ?3)",
            params![name, password_json, sealed_nt_hash],
        )?;
        for (full, material) in &keys {
            tx.execute(
                "INSERT INTO user_keys (user, key, material) VALUES (?1, ?2, ?3)",
                params![name, full, material],
            )?;
        }
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Removes a user, their keys and their grants.
    pub fn remove_user(&mut self, name: &str) -> Result<Removed, StoreError> {
        let tx = self.conn.transaction()?;
        Self::require_user(&tx, name)?;
        let grants = tx.execute("DELETE FROM grants WHERE user = ?1", [name])?;
        tx.execute("DELETE FROM user_keys WHERE user = ?1", [name])?;
        tx.execute("DELETE FROM users WHERE name = ?1", [name])?;
        governance::prune_rules(&tx)?;
        let version = Self::bump(&tx)?;
        tx.commit()?;
        Ok(Removed {
            version,
            accounts: 0,
            grants,
        })
    }

    /// Replaces the password verifier of an existing user (their keys and grants stay); the NT
    /// hash of the old password goes (it would no longer match). Returns the new policy version.
    pub fn set_password(&mut self, name: &str, password: &PasswordHash) -> Result<u64, StoreError> {
        self.update_password(name, password, None)
    }

    /// Like [`Store::set_password`], keeping the new password's NT hash sealed by `vault`.
    pub fn set_password_with_nt_hash(
        &mut self,
        vault: &Vault,
        name: &str,
        password: &PasswordHash,
        nt_hash: &Secret,
    ) -> Result<u64, StoreError> {
        let sealed = seal_nt_hash(vault, name, nt_hash)?;
        self.update_password(name, password, Some(sealed))
    }

    fn update_password(
        &mut self,
        name: &str,
        password: &PasswordHash,
        sealed_nt_hash: Option<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        check_hash(password)?;
        let json =
            serde_json::to_string(password).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE users SET password = ?2, nt_hash = ?3 WHERE name = ?1",
            params![name, json, sealed_nt_hash],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("unknown user '{name}'")));
        }
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Lists users, by name.
    pub fn list_users(&self) -> Result<Vec<UserInfo>, StoreError> {
        let users = read_users(&self.conn, None)?;
        let mfa: Vec<String> = self
            .conn
            .prepare("SELECT name FROM users WHERE totp IS NOT NULL")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let rdp: Vec<String> = self
            .conn
            .prepare("SELECT name FROM users WHERE nt_hash IS NOT NULL")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(users
            .into_iter()
            .map(|u| UserInfo {
                mfa: mfa.contains(&u.name),
                rdp: rdp.contains(&u.name),
                has_password: u.password.is_some(),
                ssh_keys: u.ssh_keys,
                groups: u.groups,
                disabled: u.disabled,
                locked_until_ms: u.locked_until_ms,
                name: u.name,
            })
            .collect())
    }
}

/// Seals a user's NT hash (checked for its form first).
fn seal_nt_hash(vault: &Vault, user: &str, nt: &Secret) -> Result<Vec<u8>, StoreError> {
    if !crate::ntlm::well_formed(nt.expose()) {
        return Err(Invalid("malformed NT hash".into()).into());
    }
    Ok(vault.seal(&nt_hash_aad(user), nt.expose().as_bytes())?)
}

fn check_hash(h: &PasswordHash) -> Result<(), Invalid> {
    if h.well_formed() {
        Ok(())
    } else {
        Err(Invalid("malformed password hash".into()))
    }
}
