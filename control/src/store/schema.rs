//! The SQL schema, one script per version: [`Store::open`] applies those newer than the file's
//! `PRAGMA user_version`, each in its own transaction.
//!
//! [`Store::open`]: super::Store::open

/// Schema version this code writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 5;

pub(super) const SCHEMA_V1: &str = "
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
pub(super) const SCHEMA_V2: &str = "
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
pub(super) const SCHEMA_V3: &str = "
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
pub(super) const SCHEMA_V4: &str = "
ALTER TABLE targets ADD COLUMN protocol TEXT NOT NULL DEFAULT 'ssh' CHECK (protocol IN ('ssh', 'rdp'));
ALTER TABLE accounts ADD COLUMN domain TEXT;
ALTER TABLE users ADD COLUMN nt_hash BLOB;
";

/// Version 5 (TCP pass-through): a target may be `tcp`, with the address psm listens on for it,
/// and an account may hold no credential (`none`: the `tcp` account of such a target). SQLite
/// cannot change a CHECK, so both tables are rebuilt, with foreign keys off (see
/// [`Store::open`]): `targets` is the parent of `accounts` and `target_group_members`.
///
/// [`Store::open`]: super::Store::open
pub(super) const SCHEMA_V5: &str = "
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
