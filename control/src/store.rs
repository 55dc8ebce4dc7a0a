//! The policy store: `psm.db` (SQLite).
//!
//! Tables: `users` (with the NT hash RDP needs, sealed by the [`Vault`]), `user_keys`, `targets`
//! (SSH, RDP or TCP pass-through), `accounts` (credentials sealed by the [`Vault`]), `grants`, and `meta` (the
//! policy version). Every change runs in one transaction
//! that also bumps the policy version, so the version in a snapshot always names one state of
//! the store. References (a grant to a user, target and account) are checked in code first, for
//! clear errors, and backed by SQLite foreign keys.
//!
//! What it does not do: decide access (that is [`psm_control_api::policy::decide`]) or push anything
//! anywhere (the daemon does).
//!
//! [`Vault`]: crate::vault::Vault

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use psm_control_api::Protocol;
use rusqlite::{Connection, OptionalExtension, Transaction};

use crate::validate::Invalid;
use crate::vault::VaultError;

mod command_rules;
mod governance;
mod grants;
mod import;
mod schema;
mod snapshot;
mod targets;
mod users;
pub use governance::{GroupInfo, Lockout};
pub use import::{ImportReport, PolicyDoc};
pub use schema::SCHEMA_VERSION;
use schema::{SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5};

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
}

fn read_version(c: &Connection) -> Result<u64, StoreError> {
    let v: i64 = c.query_row("SELECT policy_version FROM meta WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    Ok(v as u64)
}

/// A `protocol` column (`ssh`, `rdp` or `tcp`).
fn protocol_column(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Protocol> {
    let s: String = r.get(i)?;
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    })
}

#[cfg(test)]
mod rdp_tests;
#[cfg(test)]
mod tcp_tests;

#[cfg(test)]
mod tests;
