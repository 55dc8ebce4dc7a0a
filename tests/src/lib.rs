//! Harness for psm's end-to-end tests: real OpenSSH clients talk to a real psm (started with
//! `psm up`, or as three separate daemons) which brokers sessions to a real OpenSSH `sshd`.
//!
//! What it provides:
//! - [`Sshd`]: a throw-away `sshd` on 127.0.0.1 with its own host key, and the local unix account
//!   [`TARGET_USER`] (password [`TARGET_PASSWORD`] and an authorized ed25519 key) to log in as.
//! - [`Psm`]: a psm instance in a temporary data directory, with a `psmctl` helper, the audit log,
//!   and (in [`PsmMode::Separate`]) control over psm-recorder alone.
//! - [`World`]: both of the above with the standard policy (user `alice`, target `web01`,
//!   account `psmtarget@web01`, a grant) and `ssh`/`scp`/`sftp` command builders.
//! - [`PtySession`]: an `ssh -tt` under a real pseudo-terminal (driven by a small python3
//!   helper) that can type, read and resize.
//! - [`run_cmd`], [`wait_for`], [`audit_events`], [`json_objects`]: bounded helpers.
//!
//! What it does not do: build the binaries (run `cargo build --workspace --bins` first, or point
//! `PSM_BIN_DIR` at them), install OpenSSH (`openssh-server`, `openssh-client`), or touch any
//! address other than 127.0.0.1.
#![forbid(unsafe_code)]

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Local unix account on the target sshd that the vaulted credentials log in as.
pub const TARGET_USER: &str = "psmtarget";
/// Password of [`TARGET_USER`] (set on every run, so a stale account is fixed up).
pub const TARGET_PASSWORD: &str = "Psm-Target-Pw-4711";
/// Password of the psm user `alice` in a [`World`].
pub const ALICE_PASSWORD: &str = "alice-Secret-42";
/// The psm binaries a [`Psm`] needs.
pub const PSM_BINARIES: [&str; 5] = ["psm", "psmctl", "psm-control", "psm-recorder", "psm-relay"];

/// Default bound for one ssh/scp/sftp/psmctl command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

mod helpers;
mod process;
mod psm;
mod pty;
mod rdp;
mod rdp_world;
mod sshd;
mod world;

pub use helpers::*;
pub use process::*;
pub use psm::*;
pub use pty::*;
pub use rdp::*;
pub use rdp_world::*;
pub use sshd::*;
pub use world::*;
