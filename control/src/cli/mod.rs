//! psmctl: the command line (clap) and what each command does.
//!
//! Policy commands go through `control.sock` ([`crate::client`]); `audit tail` reads
//! `audit.jsonl` and `recordings …` read `recordings/` directly, after checking that this
//! process's effective uid owns the data directory (the rule psm-control applies on its sockets;
//! root would otherwise read another owner's files, or see an empty list where it may not
//! look). Passwords are read from standard input (one line) and go to the daemon as
//! [`Secret`](psm_control_api::Secret)s over the owner-only socket: a psm user's password to
//! be checked against the minimum length and hashed there, an account's password or private
//! key to be sealed by the vault. `target add --scan` and `target update --scan` check the
//! target name first, then touch the network. `recordings play` writes only what draws the
//! screen unless given `--raw` (see [`crate::recordings`]).
//!
//! What it does not do: print a credential, ever.
//!
//! The parts: `args` is the command line (clap's types, re-exported here); `entities` runs the
//! user, target, account and grant commands; `sessions`, `status` and `recordings` run theirs;
//! `audit_format` writes an audit event as one line ([`format_event`]); `error` says why a
//! command failed ([`CliError`]). This module dispatches ([`run`]), runs `audit tail` and
//! `audit verify`, and holds the helpers the parts share. The group, command-rule, request, MFA
//! and policy commands are in [`crate::cli_policy`], the RDP ones in [`crate::cli_rdp`].

mod args;
mod audit_format;
mod entities;
mod error;
mod recordings;
mod sessions;
mod status;
#[cfg(test)]
mod tests;

use std::fs;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::audit::read_tail;
use crate::cli_policy;
use crate::client::Client;
use crate::datadir::DataDir;
use crate::protocol::{Changed, Request};

pub use args::{
    AccountCmd, AuditCmd, Cli, Command, GrantCmd, JsonFlag, RecordingsCmd, SessionsCmd, StatusArgs,
    TargetCmd, UserCmd,
};
pub use audit_format::format_event;
pub use error::CliError;

/// Checks that psmctl may read the data directory's files itself: the directory exists and its
/// owner is this process's effective uid (the uid psm-control admits on its sockets).
pub fn check_data_dir_owner(data_dir: &Path) -> Result<(), CliError> {
    let dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let owner = fs::metadata(&dir)
        .map_err(|source| CliError::DataDir {
            dir: dir.clone(),
            source,
        })?
        .uid();
    let uid = nix::unistd::geteuid().as_raw();
    if uid != owner {
        return Err(CliError::NotOwner { uid, dir, owner });
    }
    Ok(())
}

/// Runs one psmctl command, reading passwords from `stdin` and printing to `out`.
pub fn run(cli: Cli, stdin: &mut dyn BufRead, out: &mut dyn Write) -> Result<(), CliError> {
    let data_dir = cli.data_dir;
    match cli.command {
        Command::User { cmd } => entities::user(&data_dir, cmd, stdin, out),
        Command::Target { cmd } => entities::target(&data_dir, cmd, out),
        Command::Account { cmd } => entities::account(&data_dir, cmd, stdin, out),
        Command::Grant { cmd } => entities::grant(&data_dir, cmd, out),
        Command::Sessions { cmd } => sessions::sessions(&data_dir, cmd, out),
        Command::Group { cmd } => cli_policy::group(&data_dir, cmd, false, out),
        Command::CommandRule { cmd } => cli_policy::command_rule(&data_dir, cmd, out),
        Command::Requests { cmd } => cli_policy::requests(&data_dir, cmd, out),
        Command::TargetGroup { cmd } => cli_policy::group(&data_dir, cmd, true, out),
        Command::Policy { cmd } => {
            if cli_policy::policy(&data_dir, cmd, out)? {
                Ok(())
            } else {
                Err(CliError::Denied)
            }
        }
        Command::Audit {
            cmd: AuditCmd::Verify,
        } => {
            check_data_dir_owner(&data_dir)?;
            let key = evidence_public_key(&data_dir)?;
            let path = DataDir::new(&data_dir).audit_log();
            let report = crate::audit::verify(&path, Some(&key))?;
            writeln!(out, "{}: {report}", path.display())?;
            if report.ok() {
                Ok(())
            } else {
                Err(CliError::Unverified)
            }
        }
        Command::Audit {
            cmd: AuditCmd::Tail { n, json },
        } => {
            check_data_dir_owner(&data_dir)?;
            let events = read_tail(&DataDir::new(&data_dir).audit_log(), n)?;
            if json {
                print_json(out, &events)
            } else {
                for e in &events {
                    writeln!(out, "{}", format_event(e))?;
                }
                Ok(())
            }
        }
        Command::Recordings { cmd } => recordings::recordings_cmd(&data_dir, cmd, out),
        Command::RdpFile(args) => crate::cli_rdp::rdp_file(&data_dir, args, out),
        Command::Status(f) => status::status(&data_dir, f, out),
    }
}

/// `1.5 GiB`-style sizes.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub(crate) fn print_json<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    v: &T,
) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, v).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn change(out: &mut dyn Write, client: &mut Client, req: &Request) -> Result<(), CliError> {
    let c: Changed = client.call_as(req)?;
    writeln!(out, "{} (policy version {})", c.message, c.version)?;
    Ok(())
}

/// The data directory's evidence public key: the public half of `evidence.key` (what the
/// daemons sign with), or `evidence.pub` when the key cannot be read.
fn evidence_public_key(data_dir: &Path) -> Result<psm_evidence::PublicKey, CliError> {
    match psm_evidence::PublicKey::read(&data_dir.join(psm_evidence::KEY_FILE)) {
        Ok(k) => Ok(k),
        Err(e) => match psm_evidence::PublicKey::read(&data_dir.join(psm_evidence::PUB_FILE)) {
            Ok(k) => Ok(k),
            Err(_) => Err(e.into()),
        },
    }
}

/// Quotes a field value when it holds spaces, quotes or nothing; escapes what a peer could use
/// to forge a line or drive the terminal (controls, bidi overrides; see
/// [`psm_control_api::escape()`]).
fn field(v: &str) -> String {
    if v.is_empty()
        || v.chars()
            .any(|c| c.is_whitespace() || c == '"' || psm_control_api::escape::needs_escape(c))
    {
        format!("\"{}\"", psm_control_api::escape(v).replace('"', "\\\""))
    } else {
        v.to_string()
    }
}
