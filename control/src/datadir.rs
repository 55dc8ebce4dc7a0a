//! The data directory: where each file of psm-control lives, and first-start initialisation
//! ([`init_data_dir`]): the directory itself, `master.key` and `psm.db`.
//!
//! What it does not do: create files that belong to other processes (the relay's host key, the
//! recordings directory).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::store::{Store, StoreError};

/// File name of the vault key inside the data directory.
pub const MASTER_KEY: &str = "master.key";
/// File name of the SQLite store inside the data directory.
pub const DATABASE: &str = "psm.db";
/// File name of the audit log inside the data directory.
pub const AUDIT_LOG: &str = "audit.jsonl";
/// Directory of recordings inside the data directory (written by psm-recorder).
pub const RECORDINGS: &str = "recordings";
/// Length of the vault key in bytes.
pub const MASTER_KEY_LEN: usize = 32;

/// Paths of the files psm-control uses inside one data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    /// The data directory itself.
    pub root: PathBuf,
}

impl DataDir {
    /// Wraps a data directory path.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }
    /// `master.key`.
    pub fn master_key(&self) -> PathBuf {
        self.root.join(MASTER_KEY)
    }
    /// `psm.db`.
    pub fn database(&self) -> PathBuf {
        self.root.join(DATABASE)
    }
    /// `audit.jsonl`.
    pub fn audit_log(&self) -> PathBuf {
        self.root.join(AUDIT_LOG)
    }
    /// `control.sock` (psmctl).
    pub fn control_socket(&self) -> PathBuf {
        self.root.join(psm_control_api::CONTROL_SOCKET)
    }
    /// `policy.sock` (relays).
    pub fn policy_socket(&self) -> PathBuf {
        self.root.join(psm_control_api::POLICY_SOCKET)
    }
    /// `recordings/`.
    pub fn recordings(&self) -> PathBuf {
        self.root.join(RECORDINGS)
    }
    /// The uid that owns the data directory: the only uid allowed on the sockets.
    pub fn owner_uid(&self) -> Result<u32, InitError> {
        fs::metadata(&self.root)
            .map(|m| m.uid())
            .map_err(|source| InitError::Stat {
                path: self.root.clone(),
                source,
            })
    }
}

/// Why the data directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The directory did not exist and could not be created.
    #[error("cannot create data directory {}: {source}", .path.display())]
    CreateDir {
        /// The data directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The path exists but is not a directory.
    #[error("data directory {} is not a directory", .path.display())]
    NotADirectory {
        /// The data directory.
        path: PathBuf,
    },
    /// Group or others may access the directory: it holds the users' password hashes, the
    /// vault and the recordings, so psm refuses it as OpenSSH and PostgreSQL refuse theirs.
    #[error(
        "data directory {} is accessible by group or others (mode {mode:04o}); run chmod 700 on it",
        .path.display()
    )]
    Exposed {
        /// The data directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The directory cannot be written to.
    #[error("data directory {} is not writable: {source}", .path.display())]
    NotWritable {
        /// The data directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A path could not be inspected.
    #[error("cannot access {}: {source}", .path.display())]
    Stat {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// `master.key` is unusable.
    #[error("master key {}: {reason}", .path.display())]
    MasterKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `psm.db` could not be opened or migrated.
    #[error("database {}: {source}", .path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// The store error.
        source: StoreError,
    },
}

/// Prepares a data directory for psm-control.
///
/// Creates `dir` (mode 0700) when missing; checks that it is a writable directory that neither
/// group nor others may access (an existing one is refused otherwise, never changed); creates
/// `master.key` (32 random bytes, mode 0600) when missing, or checks the existing one (exactly 32
/// bytes, not readable by group or others); opens `psm.db` and brings its schema up to date.
/// Every error names the path it is about.
pub fn init_data_dir(dir: &Path) -> Result<(), InitError> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(InitError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(InitError::Exposed {
                    path: dir.to_path_buf(),
                    mode,
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| InitError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Err(source) => {
            return Err(InitError::Stat {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    check_writable(dir)?;
    let paths = DataDir::new(dir);
    ensure_master_key(&paths.master_key())?;
    let db = paths.database();
    Store::open(&db).map_err(|source| InitError::Database { path: db, source })?;
    Ok(())
}

fn check_writable(dir: &Path) -> Result<(), InitError> {
    let probe = dir.join(format!(".psm-write-probe-{}", std::process::id()));
    let not_writable = |source| InitError::NotWritable {
        path: dir.to_path_buf(),
        source,
    };
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&probe)
        .map_err(not_writable)?;
    fs::remove_file(&probe).map_err(not_writable)?;
    Ok(())
}

/// Creates `path` with a fresh random key when it does not exist, then checks it.
fn ensure_master_key(path: &Path) -> Result<(), InitError> {
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_master_key(path)?,
        Err(source) => {
            return Err(InitError::Stat {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    load_master_key(path).map(drop)
}

fn create_master_key(path: &Path) -> Result<(), InitError> {
    use ring::rand::SecureRandom as _;
    let err = |reason: String| InitError::MasterKey {
        path: path.to_path_buf(),
        reason,
    };
    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    ring::rand::SystemRandom::new()
        .fill(key.as_mut())
        .map_err(|_| err("system random source failed".into()))?;
    // Write a private temporary file, then link it into place: the key appears whole or not at
    // all, and a concurrent first start cannot see a half-written key.
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(key.as_ref())?;
        f.sync_all()
    };
    let res = write().and_then(|()| match fs::hard_link(&tmp, path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    let _ = fs::remove_file(&tmp);
    res.map_err(|e| err(format!("cannot create: {e}")))
}

/// Reads and checks `master.key`: a regular file of exactly 32 bytes that neither group nor
/// others may access.
pub fn load_master_key(path: &Path) -> Result<Zeroizing<[u8; MASTER_KEY_LEN]>, InitError> {
    let err = |reason: String| InitError::MasterKey {
        path: path.to_path_buf(),
        reason,
    };
    let meta = fs::symlink_metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(err("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "is accessible by group or others (mode {mode:04o}); run chmod 600 on it"
        )));
    }
    if meta.len() != MASTER_KEY_LEN as u64 {
        return Err(err(format!(
            "must be exactly {MASTER_KEY_LEN} bytes, found {}",
            meta.len()
        )));
    }
    let mut f = fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    f.read_exact(key.as_mut())
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let mut extra = [0u8; 1];
    if f.read(&mut extra)
        .map_err(|e| err(format!("cannot read: {e}")))?
        != 0
    {
        return Err(err(format!("must be exactly {MASTER_KEY_LEN} bytes")));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_directory_key_and_database() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b/psm-data");
        init_data_dir(&dir).expect("init");
        let meta = fs::metadata(&dir).expect("dir");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        let key = fs::metadata(dir.join(MASTER_KEY)).expect("key");
        assert_eq!(key.len(), 32);
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        assert!(dir.join(DATABASE).exists());
        let first = load_master_key(&dir.join(MASTER_KEY)).expect("load");
        // a second init keeps the key
        init_data_dir(&dir).expect("init again");
        let second = load_master_key(&dir.join(MASTER_KEY)).expect("load");
        assert_eq!(*first, *second);
        // no temporary files left behind
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.contains("tmp") && !n.contains("probe")),
            "{names:?}"
        );
    }

    #[test]
    fn rejects_a_file_as_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("plain");
        fs::write(&file, b"x").expect("write");
        let e = init_data_dir(&file).expect_err("must fail");
        assert!(e.to_string().contains("is not a directory"), "{e}");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    }

    #[test]
    fn refuses_a_directory_group_or_others_may_access_and_leaves_it_as_it_was() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("psm-data");
        for mode in [0o755, 0o750, 0o701] {
            fs::create_dir_all(&dir).expect("mkdir");
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).expect("chmod");
            let e = init_data_dir(&dir).expect_err("an exposed directory");
            let text = e.to_string();
            assert!(text.contains("accessible by group or others"), "{text}");
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
            assert!(text.contains("chmod 700"), "{text}");
            assert!(text.contains(&dir.display().to_string()), "{text}");
            // nothing was created in it, and its mode is the operator's to change
            assert!(!dir.join(MASTER_KEY).exists() && !dir.join(DATABASE).exists());
            let now = fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
            assert_eq!(now, mode);
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        init_data_dir(&dir).expect("a private directory");
    }

    #[test]
    fn rejects_bad_master_keys() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        // (a temporary directory is created 0755; psm wants its data directory private)
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let key = dir.join(MASTER_KEY);
        fs::write(&key, [0u8; 31]).expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = init_data_dir(dir).expect_err("short key");
        assert!(e.to_string().contains("exactly 32 bytes"), "{e}");
        assert!(e.to_string().contains("master.key"), "{e}");

        fs::write(&key, [0u8; 32]).expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = init_data_dir(dir).expect_err("readable key");
        assert!(e.to_string().contains("group or others"), "{e}");

        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        init_data_dir(dir).expect("good key");
    }

    #[test]
    fn rejects_a_corrupt_database() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        // (a temporary directory is created 0755; psm wants its data directory private)
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        fs::write(dir.join(DATABASE), vec![0x42u8; 4096]).expect("write");
        let e = init_data_dir(dir).expect_err("corrupt db");
        assert!(e.to_string().contains("psm.db"), "{e}");
    }
}
