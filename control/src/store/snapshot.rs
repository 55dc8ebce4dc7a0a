//! The policy snapshot the relays get, and the readers that build it (also behind the
//! listings and the policy document).

use psm_control_api::{
    Account, Conditions, Credential, Grant, PasswordHash, PolicySnapshot, Secret, Target, User,
};
use rusqlite::Connection;

use super::{governance, protocol_column, read_version, Store, StoreError};
use crate::protocol::CredentialKind;
use crate::vault::{account_aad, nt_hash_aad, totp_aad, Vault};

impl Store {
    /// The full policy as of now, credentials decrypted, for the relays.
    pub fn snapshot(&mut self, vault: &Vault) -> Result<PolicySnapshot, StoreError> {
        // One read transaction, so the version and the rows agree.
        let tx = self.conn.transaction()?;
        let snap = PolicySnapshot {
            version: read_version(&tx)?,
            users: read_users(&tx, Some(vault))?,
            targets: read_targets(&tx)?,
            accounts: read_accounts(&tx, vault)?,
            grants: read_grants(&tx)?,
            recording_required: true,
            mfa_required: false,
            command_rules: governance::read_command_rules(&tx)?,
        };
        tx.commit()?;
        Ok(snap)
    }
}

/// Users with their keys, groups and state; their TOTP secrets opened when `vault` is given
/// (the snapshot), left out otherwise (listings).
pub(super) fn read_users(c: &Connection, vault: Option<&Vault>) -> Result<Vec<User>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT name, password, disabled, locked_until_ms, totp, totp_last_step, nt_hash
         FROM users ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, Option<Vec<u8>>>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<Vec<u8>>>(6)?,
        ))
    })?;
    let mut keys_stmt = c.prepare("SELECT key FROM user_keys WHERE user = ?1 ORDER BY id")?;
    let mut groups_stmt =
        c.prepare("SELECT grp FROM group_members WHERE user = ?1 ORDER BY grp")?;
    let mut out = Vec::new();
    for row in rows {
        let (name, password, disabled, locked, totp, last_step, nt_hash) = row?;
        let nt_hash = match (nt_hash, vault) {
            (Some(sealed), Some(vault)) => Some(open_nt_hash(vault, &name, &sealed)?),
            _ => None,
        };
        let groups = groups_stmt
            .query_map([&name], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let totp = match (totp, vault) {
            (Some(sealed), Some(vault)) => {
                let plain = vault.open(&totp_aad(&name), &sealed)?;
                let secret = std::str::from_utf8(&plain).map_err(|_| {
                    StoreError::Corrupt(format!("TOTP secret of user '{name}' is not utf-8"))
                })?;
                Some(psm_control_api::Totp {
                    secret: Secret::new(secret.to_string()),
                    last_step: last_step.max(0) as u64,
                })
            }
            _ => None,
        };
        let password = match password {
            Some(json) => Some(
                serde_json::from_str::<PasswordHash>(&json)
                    .map_err(|e| StoreError::Corrupt(format!("password of user '{name}': {e}")))?,
            ),
            None => None,
        };
        let ssh_keys = keys_stmt
            .query_map([&name], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        out.push(User {
            name,
            password,
            ssh_keys,
            groups,
            disabled,
            locked_until_ms: locked.map(|t| t.max(0) as u64),
            totp,
            nt_hash,
        });
    }
    Ok(out)
}

pub(super) fn read_targets(c: &Connection) -> Result<Vec<Target>, StoreError> {
    let mut stmt =
        c.prepare("SELECT name, address, host_key, protocol, listen FROM targets ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok(Target {
            name: r.get(0)?,
            address: r.get(1)?,
            host_key: r.get(2)?,
            groups: Vec::new(),
            protocol: protocol_column(r, 3)?,
            listen: r.get(4)?,
        })
    })?;
    let mut targets = rows.collect::<Result<Vec<_>, _>>()?;
    let mut groups_stmt =
        c.prepare("SELECT grp FROM target_group_members WHERE target = ?1 ORDER BY grp")?;
    for t in &mut targets {
        t.groups = groups_stmt
            .query_map([&t.name], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
    }
    Ok(targets)
}

fn read_accounts(c: &Connection, vault: &Vault) -> Result<Vec<Account>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT target, username, kind, ciphertext, domain FROM accounts
         ORDER BY target, username",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Vec<u8>>(3)?,
            r.get::<_, Option<String>>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (target, username, kind, sealed, domain) = row?;
        if kind == "none" {
            out.push(Account {
                target,
                username,
                credential: Credential::None,
                domain,
            });
            continue;
        }
        let plain = vault.open(&account_aad(&target, &username), &sealed)?;
        let text = std::str::from_utf8(&plain).map_err(|_| {
            StoreError::Corrupt(format!("account '{username}@{target}': secret not utf-8"))
        })?;
        let secret = Secret::new(text.to_string());
        let credential = match CredentialKind::parse(&kind) {
            Some(CredentialKind::Password) => Credential::Password(secret),
            Some(CredentialKind::PrivateKey) => Credential::PrivateKey(secret),
            Some(CredentialKind::None) | None => {
                return Err(StoreError::Corrupt(format!(
                    "account '{username}@{target}': kind '{kind}'"
                )))
            }
        };
        out.push(Account {
            target,
            username,
            credential,
            domain,
        });
    }
    Ok(out)
}

pub(super) fn read_grants(c: &Connection) -> Result<Vec<Grant>, StoreError> {
    let mut stmt = c.prepare("SELECT user, target, account, conditions FROM grants ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (user, target, account, conditions) = row?;
        let conditions: Conditions = serde_json::from_str(&conditions).map_err(|e| {
            StoreError::Corrupt(format!(
                "conditions of grant {user} -> {account}@{target}: {e}"
            ))
        })?;
        out.push(Grant {
            user,
            target,
            account,
            conditions,
        });
    }
    Ok(out)
}

/// Opens a user's sealed NT hash.
fn open_nt_hash(vault: &Vault, user: &str, sealed: &[u8]) -> Result<Secret, StoreError> {
    let plain = vault.open(&nt_hash_aad(user), sealed)?;
    match std::str::from_utf8(&plain) {
        Ok(s) if crate::ntlm::well_formed(s) => Ok(Secret::new(s.to_string())),
        _ => Err(StoreError::Corrupt(format!(
            "NT hash of user '{user}' is malformed"
        ))),
    }
}
