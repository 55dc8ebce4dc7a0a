//! The policy store: `psm.db` (SQLite).
//!
//! Tables: `users` (with the NT hash RDP needs, sealed by the [`Vault`]), `user_keys`, `targets`
//! (SSH or RDP), `accounts` (credentials sealed by the [`Vault`]), `grants`, and `meta` (the
//! policy version). Every change runs in one transaction
//! that also bumps the policy version, so the version in a snapshot always names one state of
//! the store. References (a grant to a user, target and account) are checked in code first, for
//! clear errors, and backed by SQLite foreign keys.
//!
//! What it does not do: decide access (that is [`psm_control_api::policy::decide`]) or push anything
//! anywhere (the daemon does).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use psm_control_api::{
    Account, Conditions, Credential, Grant, PasswordHash, PolicySnapshot, Protocol, Secret, Target,
    User,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::protocol::{AccountInfo, CredentialKind, GrantInfo, TargetInfo, UserInfo};
use crate::validate::{self, Invalid};
use crate::vault::{account_aad, nt_hash_aad, totp_aad, Vault, VaultError};

mod governance;
mod import;
pub use governance::{GroupInfo, Lockout};
pub use import::{ImportReport, PolicyDoc};

/// Schema version this code writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 5;

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    policy_version INTEGER NOT NULL
);
INSERT INTO meta (id, policy_version) VALUES (1, 1);
CREATE TABLE users (
    name TEXT PRIMARY KEY NOT NULL,
    password TEXT
);
CREATE TABLE user_keys (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    material TEXT NOT NULL,
    UNIQUE (user, material)
);
CREATE TABLE targets (
    name TEXT PRIMARY KEY NOT NULL,
    address TEXT NOT NULL,
    host_key TEXT NOT NULL
);
CREATE TABLE accounts (
    target TEXT NOT NULL REFERENCES targets(name) ON DELETE CASCADE,
    username TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('password', 'private_key')),
    ciphertext BLOB NOT NULL,
    PRIMARY KEY (target, username)
);
CREATE TABLE grants (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    target TEXT NOT NULL,
    account TEXT NOT NULL,
    conditions TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (user, target, account),
    FOREIGN KEY (target, account) REFERENCES accounts(target, username) ON DELETE CASCADE
);
";

/// Version 2: groups and target groups, grants naming either, user state for MFA, lockout and
/// disabling, and the failed logins lockout counts. Grants keep their creation order (`id`):
/// the first grant whose conditions hold decides.
const SCHEMA_V2: &str = "
CREATE TABLE grants_v2 (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    target TEXT NOT NULL,
    account TEXT NOT NULL,
    conditions TEXT NOT NULL DEFAULT '{}',
    UNIQUE (user, target, account)
);
INSERT INTO grants_v2 (user, target, account, conditions)
    SELECT user, target, account, conditions FROM grants ORDER BY user, target, account;
DROP TABLE grants;
ALTER TABLE grants_v2 RENAME TO grants;
ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_until_ms INTEGER;
ALTER TABLE users ADD COLUMN totp BLOB;
ALTER TABLE users ADD COLUMN totp_last_step INTEGER NOT NULL DEFAULT 0;
CREATE TABLE groups (name TEXT PRIMARY KEY NOT NULL);
CREATE TABLE group_members (
    grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    PRIMARY KEY (grp, user)
);
CREATE TABLE target_groups (name TEXT PRIMARY KEY NOT NULL);
CREATE TABLE target_group_members (
    grp TEXT NOT NULL REFERENCES target_groups(name) ON DELETE CASCADE,
    target TEXT NOT NULL REFERENCES targets(name) ON DELETE CASCADE,
    PRIMARY KEY (grp, target)
);
CREATE TABLE auth_failures (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    ts_ms INTEGER NOT NULL
);
";

/// Version 3: command rules (scope as JSON, pattern, action), in id order.
const SCHEMA_V3: &str = "
CREATE TABLE command_rules (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    pattern TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('allow', 'deny', 'terminate', 'alert'))
);
";

/// Version 4 (RDP): a target's protocol (existing targets are SSH), an account's Windows domain,
/// and a user's NT hash, sealed by the vault (users whose password predates it have none until
/// their next password change).
const SCHEMA_V4: &str = "
ALTER TABLE targets ADD COLUMN protocol TEXT NOT NULL DEFAULT 'ssh' CHECK (protocol IN ('ssh', 'rdp'));
ALTER TABLE accounts ADD COLUMN domain TEXT;
ALTER TABLE users ADD COLUMN nt_hash BLOB;
";

/// Version 5 (TCP pass-through): a target may be `tcp`, with the address psm listens on for it,
/// and an account may hold no credential (`none`: the `tcp` account of such a target). SQLite
/// cannot change a CHECK, so both tables are rebuilt, with foreign keys off (see
/// [`Store::open`]): `targets` is the parent of `accounts` and `target_group_members`.
const SCHEMA_V5: &str = "
CREATE TABLE targets_v5 (
    name TEXT PRIMARY KEY NOT NULL,
    address TEXT NOT NULL,
    host_key TEXT NOT NULL,
    protocol TEXT NOT NULL DEFAULT 'ssh' CHECK (protocol IN ('ssh', 'rdp', 'tcp')),
    listen TEXT
);
INSERT INTO targets_v5 (name, address, host_key, protocol)
    SELECT name, address, host_key, protocol FROM targets;
DROP TABLE targets;
ALTER TABLE targets_v5 RENAME TO targets;
CREATE TABLE accounts_v5 (
    target TEXT NOT NULL REFERENCES targets(name) ON DELETE CASCADE,
    username TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('password', 'private_key', 'none')),
    ciphertext BLOB NOT NULL,
    domain TEXT,
    PRIMARY KEY (target, username)
);
INSERT INTO accounts_v5 (target, username, kind, ciphertext, domain)
    SELECT target, username, kind, ciphertext, domain FROM accounts;
DROP TABLE accounts;
ALTER TABLE accounts_v5 RENAME TO accounts;
";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (or the file is not a database).
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The object already exists.
    #[error("{0}")]
    Conflict(String),
    /// A referenced object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Input that does not pass validation.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// A credential could not be sealed or opened.
    #[error("{0}")]
    Vault(#[from] VaultError),
    /// A row holds data this code cannot read.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database was written by a newer psm.
    #[error("schema version {0} is newer than this psm-control understands ({SCHEMA_VERSION})")]
    TooNew(i64),
}

/// What a removal took with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Policy version after the change.
    pub version: u64,
    /// Accounts removed along.
    pub accounts: usize,
    /// Grants removed along.
    pub grants: usize,
}

/// The SQLite policy store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating when missing) and migrates the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let existed = path.exists();
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // `user_version` is the first read of the file: a non-database fails here.
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        conn.pragma_update(None, "foreign_keys", true)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew(version));
        }
        if version < 1 {
            let tx = conn.transaction()?;
            tx.execute_batch(SCHEMA_V1)?;
            tx.pragma_update(None, "user_version", 1)?;
            tx.commit()?;
        }
        if version < 2 {
            let tx = conn.transaction()?;
            tx.execute_batch(SCHEMA_V2)?;
            tx.pragma_update(None, "user_version", 2)?;
            tx.commit()?;
        }
        if version < 3 {
            let tx = conn.transaction()?;
            tx.execute_batch(SCHEMA_V3)?;
            tx.pragma_update(None, "user_version", 3)?;
            tx.commit()?;
        }
        if version < 4 {
            let tx = conn.transaction()?;
            tx.execute_batch(SCHEMA_V4)?;
            tx.pragma_update(None, "user_version", 4)?;
            tx.commit()?;
        }
        if version < 5 {
            // A table rebuild under foreign keys would cascade the drop into the children, and
            // the pragma is a no-op inside a transaction: off around it, checked before commit.
            conn.pragma_update(None, "foreign_keys", false)?;
            let rebuilt = (|| -> Result<(), StoreError> {
                let tx = conn.transaction()?;
                tx.execute_batch(SCHEMA_V5)?;
                let orphans: i64 =
                    tx.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                        r.get(0)
                    })?;
                if orphans > 0 {
                    return Err(StoreError::Corrupt(format!(
                        "{orphans} rows refer to missing targets; schema 5 not applied"
                    )));
                }
                tx.pragma_update(None, "user_version", 5)?;
                tx.commit()?;
                Ok(())
            })();
            conn.pragma_update(None, "foreign_keys", true)?;
            rebuilt?;
        }
        // Sanity read, so a damaged file fails at open rather than on first use.
        conn.query_row("SELECT policy_version FROM meta WHERE id = 1", [], |r| {
            r.get::<_, i64>(0)
        })?;
        if !existed {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
        }
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current policy version.
    pub fn policy_version(&self) -> Result<u64, StoreError> {
        read_version(&self.conn)
    }

    fn bump(tx: &Transaction<'_>) -> Result<u64, StoreError> {
        tx.execute(
            "UPDATE meta SET policy_version = policy_version + 1 WHERE id = 1",
            [],
        )?;
        read_version(tx)
    }

    fn exists(tx: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<bool, StoreError> {
        Ok(tx.query_row(sql, p, |_| Ok(())).optional()?.is_some())
    }

    fn require_user(c: &Connection, name: &str) -> Result<(), StoreError> {
        if Self::exists(c, "SELECT 1 FROM users WHERE name = ?1", [name])? {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("unknown user '{name}'")))
        }
    }

    fn require_target(c: &Connection, name: &str) -> Result<(), StoreError> {
        if Self::exists(c, "SELECT 1 FROM targets WHERE name = ?1", [name])? {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("unknown target '{name}'")))
        }
    }

    fn require_account(c: &Connection, target: &str, username: &str) -> Result<(), StoreError> {
        if Self::exists(
            c,
            "SELECT 1 FROM accounts WHERE target = ?1 AND username = ?2",
            [target, username],
        )? {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!(
                "unknown account '{username}@{target}'"
            )))
        }
    }

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

fn read_version(c: &Connection) -> Result<u64, StoreError> {
    let v: i64 = c.query_row("SELECT policy_version FROM meta WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    Ok(v as u64)
}

/// Users with their keys, groups and state; their TOTP secrets opened when `vault` is given
/// (the snapshot), left out otherwise (listings).
fn read_users(c: &Connection, vault: Option<&Vault>) -> Result<Vec<User>, StoreError> {
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

fn read_targets(c: &Connection) -> Result<Vec<Target>, StoreError> {
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

fn read_grants(c: &Connection) -> Result<Vec<Grant>, StoreError> {
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

/// A `protocol` column (`ssh` or `rdp`).
fn protocol_column(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Protocol> {
    let s: String = r.get(i)?;
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    })
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

/// Seals a user's NT hash (checked for its form first).
fn seal_nt_hash(vault: &Vault, user: &str, nt: &Secret) -> Result<Vec<u8>, StoreError> {
    if !crate::ntlm::well_formed(nt.expose()) {
        return Err(Invalid("malformed NT hash".into()).into());
    }
    Ok(vault.seal(&nt_hash_aad(user), nt.expose().as_bytes())?)
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

fn check_hash(h: &PasswordHash) -> Result<(), Invalid> {
    if h.well_formed() {
        Ok(())
    } else {
        Err(Invalid("malformed password hash".into()))
    }
}

#[cfg(test)]
mod rdp_tests;
#[cfg(test)]
mod tcp_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkeys::{ENCRYPTED_PRIV, USER_PRIV, USER_PUB};

    fn setup() -> (tempfile::TempDir, Store, Vault) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&tmp.path().join("psm.db")).expect("open");
        let vault = Vault::new(&[9u8; 32]).expect("vault");
        (tmp, store, vault)
    }

    fn host_key() -> String {
        USER_PUB.to_string()
    }

    fn populate(s: &mut Store, v: &Vault) {
        let h = PasswordHash::new("pw").expect("hash");
        s.add_user("alice", Some(&h), &[USER_PUB.into()])
            .expect("alice");
        s.add_target("web01", "127.0.0.1:22", &host_key())
            .expect("web01");
        s.add_account(
            v,
            "web01",
            "root",
            &Credential::Password(Secret::new("hunter2".into())),
        )
        .expect("root");
        s.add_account(
            v,
            "web01",
            "deploy",
            &Credential::PrivateKey(Secret::new(USER_PRIV.into())),
        )
        .expect("deploy");
        s.add_grant("alice", "web01", "root").expect("grant");
    }

    #[test]
    fn crud_and_versions() {
        let (_t, mut s, v) = setup();
        assert_eq!(s.policy_version().expect("v"), 1);
        populate(&mut s, &v);
        assert_eq!(s.policy_version().expect("v"), 6);

        let users = s.list_users().expect("users");
        assert_eq!(users.len(), 1);
        assert!(users[0].has_password);
        assert_eq!(users[0].ssh_keys, vec![USER_PUB.to_string()]);
        let targets = s.list_targets().expect("targets");
        assert_eq!(targets[0].address, "127.0.0.1:22");
        assert!(
            !targets[0].host_key.contains("alice@laptop"),
            "comment dropped"
        );
        assert!(targets[0].fingerprint.starts_with("ssh-ed25519 SHA256:"));
        let accounts = s.list_accounts().expect("accounts");
        assert_eq!(
            accounts
                .iter()
                .map(|a| (a.username.as_str(), a.kind))
                .collect::<Vec<_>>(),
            vec![
                ("deploy", CredentialKind::PrivateKey),
                ("root", CredentialKind::Password)
            ]
        );
        assert_eq!(s.list_grants().expect("grants").len(), 1);

        s.remove_grant("alice", "web01", "root")
            .expect("remove grant");
        assert!(s.list_grants().expect("grants").is_empty());
        s.add_grant("alice", "web01", "root").expect("grant again");
        let r = s.remove_account("web01", "root").expect("remove account");
        assert_eq!(r.grants, 1);
        s.add_grant("alice", "web01", "deploy")
            .expect("grant deploy");
        let r = s.remove_target("web01").expect("remove target");
        assert_eq!((r.accounts, r.grants), (1, 1));
        assert!(s.list_accounts().expect("accounts").is_empty());
        let r = s.remove_user("alice").expect("remove user");
        assert_eq!(r.grants, 0);
        assert!(s.list_users().expect("users").is_empty());
        assert_eq!(s.policy_version().expect("v"), r.version);
    }

    #[test]
    fn password_and_target_updates_keep_everything_else() {
        let (_t, mut s, v) = setup();
        populate(&mut s, &v);
        let before = s.policy_version().expect("v");

        let h = PasswordHash::new("a much longer password").expect("hash");
        let v1 = s.set_password("alice", &h).expect("passwd");
        assert_eq!(v1, before + 1);
        let snap = s.snapshot(&v).expect("snapshot");
        let alice = snap.user("alice").expect("alice");
        assert!(alice
            .password
            .as_ref()
            .is_some_and(|p| p.verify("a much longer password")));
        assert!(!alice.password.as_ref().is_some_and(|p| p.verify("pw")));
        assert_eq!(alice.ssh_keys, vec![USER_PUB.to_string()]);
        assert_eq!(
            s.set_password("bob", &h).expect_err("unknown").to_string(),
            "unknown user 'bob'"
        );

        let other = crate::testkeys::OTHER_PUB;
        let (v2, old) = s
            .update_target("web01", Some(" 10.0.0.9:2222 "), None)
            .expect("address");
        assert_eq!(v2, v1 + 1);
        assert_eq!(old.address, "127.0.0.1:22");
        let (v3, old) = s.update_target("web01", None, Some(other)).expect("key");
        assert_eq!(v3, v2 + 1);
        assert_eq!(old.address, "10.0.0.9:2222");
        assert_eq!(old.host_key, validate::host_key(&host_key()).expect("key"));
        let t = &s.list_targets().expect("targets")[0];
        assert_eq!(
            (t.address.as_str(), t.host_key.as_str()),
            ("10.0.0.9:2222", other)
        );
        // accounts and grants are untouched
        assert_eq!(s.list_accounts().expect("accounts").len(), 2);
        assert_eq!(s.list_grants().expect("grants").len(), 1);
        let snap = s.snapshot(&v).expect("snapshot");
        assert!(snap.authorize_local("alice", "root", "web01").is_ok());

        let msg = |r: Result<(u64, Target), StoreError>| r.expect_err("must fail").to_string();
        assert_eq!(
            msg(s.update_target("db01", Some("10.0.0.1:22"), None)),
            "unknown target 'db01'"
        );
        assert!(msg(s.update_target("web01", None, None)).starts_with("nothing to update"));
        assert!(msg(s.update_target("web01", Some("nope"), None)).contains("invalid address"));
        assert!(
            msg(s.update_target("web01", None, Some("ssh-ed25519 AAAA")))
                .contains("invalid host key")
        );
        assert_eq!(
            s.policy_version().expect("v"),
            v3,
            "failed updates change nothing"
        );
    }

    #[test]
    fn constraint_errors() {
        let (_t, mut s, v) = setup();
        populate(&mut s, &v);
        let before = s.policy_version().expect("v");
        let msg = |r: Result<u64, StoreError>| r.expect_err("must fail").to_string();
        assert_eq!(
            msg(s.add_grant("bob", "web01", "root")),
            "unknown user 'bob'"
        );
        assert_eq!(
            msg(s.add_grant("alice", "db01", "root")),
            "unknown target 'db01'"
        );
        assert_eq!(
            msg(s.add_grant("alice", "web01", "admin")),
            "unknown account 'admin@web01'"
        );
        assert_eq!(
            msg(s.add_grant("alice", "web01", "root")),
            "grant alice -> root@web01 already exists"
        );
        assert_eq!(
            msg(s.remove_grant("alice", "web01", "deploy")),
            "no grant alice -> deploy@web01"
        );
        assert_eq!(
            msg(s.add_user("alice", None, &[USER_PUB.into()])),
            "user 'alice' already exists"
        );
        assert_eq!(
            msg(s.add_user("bob", None, &[])),
            "user 'bob' needs a password or at least one ssh key"
        );
        assert!(msg(s.add_user("bob", None, &["ssh-rsa nope".into()]))
            .contains("not an OpenSSH public key"));
        assert_eq!(
            msg(s.add_user("bob", None, &[USER_PUB.into(), USER_PUB.into()])),
            "duplicate ssh key for user 'bob'"
        );
        assert_eq!(
            msg(s.add_target("web01", "10.0.0.1:22", &host_key())),
            "target 'web01' already exists"
        );
        assert!(msg(s.add_target("db01", "10.0.0.1", &host_key())).contains("invalid address"));
        assert!(msg(s.add_target("db01", "10.0.0.1:22", "ssh-ed25519 AAAA"))
            .contains("invalid host key"));
        let pw = Credential::Password(Secret::new("x".into()));
        assert_eq!(
            msg(s.add_account(&v, "db01", "root", &pw)),
            "unknown target 'db01'"
        );
        assert_eq!(
            msg(s.add_account(&v, "web01", "root", &pw)),
            "account 'root@web01' already exists"
        );
        let enc = Credential::PrivateKey(Secret::new(ENCRYPTED_PRIV.into()));
        assert!(msg(s.add_account(&v, "web01", "x", &enc)).contains("encrypted"));
        assert!(s
            .remove_user("bob")
            .expect_err("unknown")
            .to_string()
            .contains("unknown user 'bob'"));
        assert!(s.remove_target("db01").is_err());
        assert!(s.remove_account("web01", "nobody").is_err());
        // failed changes do not bump the version
        assert_eq!(s.policy_version().expect("v"), before);
    }

    #[test]
    fn snapshot_decrypts_and_survives_reopen() {
        let (t, mut s, v) = setup();
        populate(&mut s, &v);
        let snap = s.snapshot(&v).expect("snapshot");
        assert_eq!(snap.version, 6);
        assert!(snap.recording_required);
        assert_eq!(snap.users.len(), 1);
        assert!(snap.users[0]
            .password
            .as_ref()
            .is_some_and(|h| h.verify("pw")));
        let root = snap
            .accounts
            .iter()
            .find(|a| a.username == "root")
            .expect("root");
        assert_eq!(
            root.credential,
            Credential::Password(Secret::new("hunter2".into()))
        );
        assert!(snap.authorize_local("alice", "root", "web01").is_ok());
        assert!(snap.authorize_local("alice", "deploy", "web01").is_err());

        // the ciphertext at rest holds no plaintext
        let raw = fs::read(t.path().join("psm.db")).expect("read");
        assert!(!raw.windows(7).any(|w| w == b"hunter2"));

        s.add_grant("alice", "web01", "deploy").expect("grant");
        let snap2 = s.snapshot(&v).expect("snapshot");
        assert_eq!(snap2.version, 7);
        assert_eq!(snap2.grants.len(), 2);
        drop(s);

        let mut s = Store::open(&t.path().join("psm.db")).expect("reopen");
        assert_eq!(s.policy_version().expect("v"), 7);
        // a different master key cannot build a snapshot, and says which account failed
        let wrong = Vault::new(&[1u8; 32]).expect("vault");
        let e = s.snapshot(&wrong).expect_err("wrong key");
        assert!(e.to_string().contains("account:web01/"), "{e}");
        assert_eq!(s.snapshot(&v).expect("snapshot").version, 7);
    }
}
