//! Targets (SSH, RDP and `tcp` pass-through) and the accounts on them: adding, updating,
//! removing, listing.

use psm_control_api::{Credential, Protocol, Target};
use rusqlite::{params, Connection, OptionalExtension};

use super::snapshot::read_targets;
use super::{governance, protocol_column, Removed, Store, StoreError};
use crate::protocol::{AccountInfo, CredentialKind, TargetInfo};
use crate::validate::{self, Invalid};
use crate::vault::{account_aad, Vault};

impl Store {
    /// Adds an SSH target with its pinned host key. Returns the new policy version.
    pub fn add_target(
        &mut self,
        name: &str,
        address: &str,
        host_key: &str,
    ) -> Result<u64, StoreError> {
        self.add_target_with(name, address, host_key, Protocol::Ssh)
    }

    /// Adds a target of `protocol` with its pin: an OpenSSH host key for SSH, the certificate
    /// fingerprint (`SHA256:…`) for RDP. Returns the new policy version.
    pub fn add_target_with(
        &mut self,
        name: &str,
        address: &str,
        host_key: &str,
        protocol: Protocol,
    ) -> Result<u64, StoreError> {
        validate::target_name(name)?;
        if protocol == Protocol::Tcp {
            return Err(
                Invalid("a tcp target needs the address psm listens on for it".into()).into(),
            );
        }
        let address = validate::address_for(protocol, address)?;
        let host_key = validate::pin(protocol, host_key)?;
        let tx = self.conn.transaction()?;
        if Self::exists(&tx, "SELECT 1 FROM targets WHERE name = ?1", [name])? {
            return Err(StoreError::Conflict(format!(
                "target '{name}' already exists"
            )));
        }
        tx.execute(
            "INSERT INTO targets (name, address, host_key, protocol) VALUES (?1, ?2, ?3, ?4)",
            params![name, address, host_key, protocol.as_str()],
        )?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Adds a `tcp` pass-through target, reached at `address` and served by psm on `listen`,
    /// with its one account (`tcp`, no credential). Returns the new policy version.
    pub fn add_tcp_target(
        &mut self,
        name: &str,
        address: &str,
        listen: &str,
    ) -> Result<u64, StoreError> {
        validate::target_name(name)?;
        let address = validate::address(address)?;
        let listen = validate::listen_address(listen)?;
        let tx = self.conn.transaction()?;
        if Self::exists(&tx, "SELECT 1 FROM targets WHERE name = ?1", [name])? {
            return Err(StoreError::Conflict(format!(
                "target '{name}' already exists"
            )));
        }
        if let Some(other) = tx
            .query_row(
                "SELECT name FROM targets WHERE listen = ?1",
                [&listen],
                |r| r.get::<_, String>(0),
            )
            .optional()?
        {
            return Err(StoreError::Conflict(format!(
                "target '{other}' already listens on {listen}"
            )));
        }
        tx.execute(
            "INSERT INTO targets (name, address, host_key, protocol, listen)
             VALUES (?1, ?2, '', 'tcp', ?3)",
            params![name, address, listen],
        )?;
        tx.execute(
            "INSERT INTO accounts (target, username, kind, ciphertext) VALUES (?1, ?2, 'none', x'')",
            params![name, psm_control_api::TCP_ACCOUNT],
        )?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Changes the address and/or the pinned host key of an existing target, in one
    /// transaction; its accounts and grants stay. Returns the new policy version and the target
    /// as it was before.
    pub fn update_target(
        &mut self,
        name: &str,
        address: Option<&str>,
        host_key: Option<&str>,
    ) -> Result<(u64, Target), StoreError> {
        if address.is_none() && host_key.is_none() {
            return Err(Invalid(format!(
                "nothing to update for target '{name}': give a new address and/or host key"
            ))
            .into());
        }
        let tx = self.conn.transaction()?;
        let before = tx
            .query_row(
                "SELECT name, address, host_key, protocol, listen FROM targets WHERE name = ?1",
                [name],
                |r| {
                    Ok(Target {
                        name: r.get(0)?,
                        address: r.get(1)?,
                        host_key: r.get(2)?,
                        groups: Vec::new(),
                        protocol: protocol_column(r, 3)?,
                        listen: r.get(4)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("unknown target '{name}'")))?;
        let address = address
            .map(|a| validate::address_for(before.protocol, a))
            .transpose()?;
        let host_key = host_key
            .map(|k| validate::pin(before.protocol, k))
            .transpose()?;
        tx.execute(
            "UPDATE targets SET address = ?2, host_key = ?3 WHERE name = ?1",
            params![
                name,
                address.as_deref().unwrap_or(&before.address),
                host_key.as_deref().unwrap_or(&before.host_key)
            ],
        )?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok((v, before))
    }

    /// Removes a target, its accounts and the grants on them.
    pub fn remove_target(&mut self, name: &str) -> Result<Removed, StoreError> {
        let tx = self.conn.transaction()?;
        Self::require_target(&tx, name)?;
        let grants = tx.execute("DELETE FROM grants WHERE target = ?1", [name])?;
        let accounts = tx.execute("DELETE FROM accounts WHERE target = ?1", [name])?;
        tx.execute("DELETE FROM targets WHERE name = ?1", [name])?;
        governance::prune_rules(&tx)?;
        let version = Self::bump(&tx)?;
        tx.commit()?;
        Ok(Removed {
            version,
            accounts,
            grants,
        })
    }

    /// Lists targets, by name, with their host key fingerprints.
    pub fn list_targets(&self) -> Result<Vec<TargetInfo>, StoreError> {
        Ok(read_targets(&self.conn)?
            .into_iter()
            .map(|t| TargetInfo {
                fingerprint: validate::fingerprint(&t.host_key),
                protocol: t.protocol,
                listen: t.listen,
                name: t.name,
                address: t.address,
                host_key: t.host_key,
                groups: t.groups,
            })
            .collect())
    }

    /// Adds an account on an existing target, sealing its credential. Returns the new policy
    /// version.
    pub fn add_account(
        &mut self,
        vault: &Vault,
        target: &str,
        username: &str,
        credential: &Credential,
    ) -> Result<u64, StoreError> {
        self.add_account_with(vault, target, username, credential, None)
    }

    /// Like [`Store::add_account`], with the account's Windows domain (RDP targets only). An
    /// RDP account's credential must be a password.
    pub fn add_account_with(
        &mut self,
        vault: &Vault,
        target: &str,
        username: &str,
        credential: &Credential,
        domain: Option<&str>,
    ) -> Result<u64, StoreError> {
        validate::target_name(target)?;
        validate::account_name(username)?;
        if let Some(d) = domain {
            validate::domain(d)?;
        }
        let kind = CredentialKind::of(credential);
        let secret = match credential {
            Credential::Password(s) => {
                if s.expose().is_empty() {
                    return Err(Invalid("empty password".into()).into());
                }
                s
            }
            Credential::PrivateKey(s) => {
                validate::private_key(s.expose())?;
                s
            }
            Credential::None => {
                return Err(Invalid("an account needs a password or a private key".into()).into())
            }
        };
        let sealed = vault.seal(&account_aad(target, username), secret.expose().as_bytes())?;
        let tx = self.conn.transaction()?;
        Self::require_target(&tx, target)?;
        let protocol = target_protocol(&tx, target)?;
        match (protocol, kind, domain) {
            (Protocol::Rdp, CredentialKind::PrivateKey, _) => {
                return Err(Invalid(format!(
                    "target '{target}' is an RDP target: its accounts need a password, not a private key"
                ))
                .into())
            }
            (Protocol::Tcp, _, _) => {
                return Err(Invalid(format!(
                    "target '{target}' is a tcp target: its one account, '{}', came with it",
                    psm_control_api::TCP_ACCOUNT
                ))
                .into())
            }
            (Protocol::Ssh, _, Some(_)) => {
                return Err(Invalid(format!(
                    "target '{target}' is an SSH target: a domain is for accounts on RDP targets"
                ))
                .into())
            }
            _ => {}
        }
        if Self::exists(
            &tx,
            "SELECT 1 FROM accounts WHERE target = ?1 AND username = ?2",
            [target, username],
        )? {
            return Err(StoreError::Conflict(format!(
                "account '{username}@{target}' already exists"
            )));
        }
        tx.execute(
            "INSERT INTO accounts (target, username, kind, ciphertext, domain)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![target, username, kind.as_str(), sealed, domain],
        )?;
        let v = Self::bump(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Removes an account and the grants on it.
    pub fn remove_account(&mut self, target: &str, username: &str) -> Result<Removed, StoreError> {
        let tx = self.conn.transaction()?;
        Self::require_account(&tx, target, username)?;
        let grants = tx.execute(
            "DELETE FROM grants WHERE target = ?1 AND account = ?2",
            [target, username],
        )?;
        tx.execute(
            "DELETE FROM accounts WHERE target = ?1 AND username = ?2",
            [target, username],
        )?;
        governance::prune_rules(&tx)?;
        let version = Self::bump(&tx)?;
        tx.commit()?;
        Ok(Removed {
            version,
            accounts: 1,
            grants,
        })
    }

    /// Lists accounts, by target then username (never their secrets).
    pub fn list_accounts(&self) -> Result<Vec<AccountInfo>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT target, username, kind, domain FROM accounts ORDER BY target, username",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (target, username, kind, domain) = row?;
            let kind = CredentialKind::parse(&kind).ok_or_else(|| {
                StoreError::Corrupt(format!("account '{username}@{target}': kind '{kind}'"))
            })?;
            out.push(AccountInfo {
                target,
                username,
                kind,
                domain,
            });
        }
        Ok(out)
    }
}

/// The protocol of target `name` (which exists).
fn target_protocol(c: &Connection, name: &str) -> Result<Protocol, StoreError> {
    let p: String = c.query_row(
        "SELECT protocol FROM targets WHERE name = ?1",
        [name],
        |r| r.get(0),
    )?;
    p.parse()
        .map_err(|e: String| StoreError::Corrupt(format!("target '{name}': {e}")))
}
