//! psmctl: the command line (clap) and what each command does.
//!
//! Policy commands go through `control.sock` ([`crate::client`]); `audit tail` reads
//! `audit.jsonl` and `recordings …` read `recordings/` directly, after checking that this
//! process's effective uid owns the data directory (the rule psm-control applies on its sockets;
//! root would otherwise read another owner's files, or see an empty list where it may not
//! look). Passwords are read from standard input (one line) and go to the daemon as
//! [`Secret`]s over the owner-only socket: a psm user's password to be checked against the
//! minimum length and hashed there, an account's password or private key to be sealed by the
//! vault. `target add --scan` and `target update --scan` check the target name first, then
//! touch the network. `recordings play` writes only what draws the screen unless given `--raw`
//! (see [`crate::recordings`]).
//!
//! What it does not do: print a credential, ever.

use std::fs;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Parser, Subcommand};
use psm_control_api::{AuditEvent, AuditKind, Credential, Secret};
use psm_recorder_format::export::Replay;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::audit::{read_tail, AuditError};
use crate::cli_policy::{
    self, CommandRuleCmd, ConditionFlags, GroupCmd, MfaCmd, PolicyCmd, RequestsCmd,
};
use crate::client::{Client, ClientError};
use crate::datadir::DataDir;
use crate::protocol::{
    AccountInfo, Changed, GrantInfo, Request, SessionInfo, StatusInfo, TargetInfo, UserInfo,
};
use crate::recordings::{self, ExportFormat};
use crate::scan::{self, ScanError};
use crate::table::write_table;
use crate::timefmt;
use crate::validate::{self, Invalid};

/// psmctl: administer a psm gateway.
#[derive(Debug, Parser)]
#[command(
    name = "psmctl",
    version,
    about = "Administer a psm privileged session gateway"
)]
pub struct Cli {
    /// The psm data directory.
    #[arg(
        long,
        global = true,
        env = "PSM_DATA_DIR",
        default_value = "./psm-data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage psm users (the people who log in to the gateway).
    User {
        /// User command.
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage target hosts.
    Target {
        /// Target command.
        #[command(subcommand)]
        cmd: TargetCmd,
    },
    /// Manage accounts on targets and their vaulted credentials.
    Account {
        /// Account command.
        #[command(subcommand)]
        cmd: AccountCmd,
    },
    /// Manage who may use which account.
    Grant {
        /// Grant command.
        #[command(subcommand)]
        cmd: GrantCmd,
    },
    /// Live sessions.
    Sessions {
        /// Sessions command.
        #[command(subcommand)]
        cmd: SessionsCmd,
    },
    /// The audit log.
    Audit {
        /// Audit command.
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Session recordings.
    Recordings {
        /// Recordings command.
        #[command(subcommand)]
        cmd: RecordingsCmd,
    },
    /// Whether psm-control runs, its policy version and connected relays.
    Status(StatusArgs),
    /// Manage groups of users (named `@group` in grants).
    Group {
        /// Group command.
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Manage target groups (named `account@@group` in grants).
    TargetGroup {
        /// Target group command.
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Access requests waiting for approval (dual control), and recent decisions.
    Requests {
        /// Requests command.
        #[command(subcommand)]
        cmd: RequestsCmd,
    },
    /// Command control rules.
    CommandRule {
        /// Command rule command.
        #[command(subcommand)]
        cmd: CommandRuleCmd,
    },
    /// Ask the policy without connecting.
    Policy {
        /// Policy command.
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Write a ready .rdp file for USER to open ACCOUNT@TARGET through psm (to standard output).
    RdpFile(crate::cli_rdp::RdpFileArgs),
}

/// `--json` for `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print a JSON object (version, relays, sessions) instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// `--json` for list commands.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `psmctl user …`
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user with a password (read from stdin) and/or SSH public keys.
    ///
    /// Along with the password psm keeps its NT hash, sealed in the vault, which RDP logins
    /// (NLA) need. Users whose password was set before psm kept it cannot log in over RDP until
    /// their password is set again (`user passwd`); `user list` shows who can (column RDP).
    #[command(group(ArgGroup::new("credentials").required(true).multiple(true).args(["password_stdin", "ssh_key"])))]
    Add {
        /// User name.
        name: String,
        /// Read the user's password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// An OpenSSH public key file (`.pub`); repeatable.
        #[arg(long = "ssh-key", value_name = "FILE")]
        ssh_key: Vec<PathBuf>,
    },
    /// Remove a user, with their keys and grants.
    Remove {
        /// User name.
        name: String,
    },
    /// Set a user's password (read from stdin); keys and grants stay.
    Passwd {
        /// User name.
        name: String,
        /// Read the new password from the first line of standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List users.
    List(JsonFlag),
    /// Disable a user: no login, and their live sessions end within a second.
    Disable {
        /// User name.
        name: String,
    },
    /// Enable a disabled user.
    Enable {
        /// User name.
        name: String,
    },
    /// Lift the lock after failed logins.
    Unlock {
        /// User name.
        name: String,
    },
    /// TOTP second factor.
    Mfa {
        /// MFA command.
        #[command(subcommand)]
        cmd: MfaCmd,
    },
}

/// `psmctl target …`
#[derive(Debug, Subcommand)]
pub enum TargetCmd {
    /// Add a target and pin its SSH host key (or, for RDP, its TLS certificate); a `tcp`
    /// target gets a psm port (`--listen`) instead, and no pin.
    #[command(group(ArgGroup::new("pin").required(true).args(["host_key", "cert_fingerprint", "scan", "listen"])))]
    Add {
        /// Target name (used in logins: user@account@NAME).
        name: String,
        /// Where the target listens (for RDP the port defaults to 3389).
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
        /// How the relay talks to the target: ssh (default), rdp, or tcp (passed through
        /// unrecorded while the user holds a lease: `ssh USER@tcp@NAME@gateway`).
        #[arg(long, value_name = "ssh|rdp|tcp", default_value = "ssh")]
        protocol: psm_control_api::Protocol,
        /// For `--protocol tcp`: the IP:PORT psm listens on for this target.
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<String>,
        /// The host key to pin, OpenSSH form (`ssh-ed25519 AAAA…`); SSH targets.
        #[arg(long, value_name = "KEY")]
        host_key: Option<String>,
        /// The TLS certificate to pin, `SHA256:<base64>` (or the hex of
        /// `openssl x509 -fingerprint -sha256`); RDP targets.
        #[arg(long, value_name = "SHA256:…")]
        cert_fingerprint: Option<String>,
        /// Connect to the target and pin the host key (SSH, ed25519 preferred) or the TLS
        /// certificate (RDP) it shows.
        #[arg(long)]
        scan: bool,
    },
    /// Change a target's address and/or pinned host key; its accounts and grants stay.
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args(["address", "host_key", "cert_fingerprint", "scan"])))]
    Update {
        /// Target name.
        name: String,
        /// The new address.
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// The new host key to pin, OpenSSH form (`ssh-ed25519 AAAA…`).
        #[arg(long, value_name = "KEY", conflicts_with_all = ["scan", "cert_fingerprint"])]
        host_key: Option<String>,
        /// The new TLS certificate fingerprint to pin, `SHA256:…` (RDP targets).
        #[arg(long, value_name = "SHA256:…", conflicts_with = "scan")]
        cert_fingerprint: Option<String>,
        /// Connect to the target (at its new address, if given) and pin the host key it shows.
        #[arg(long)]
        scan: bool,
    },
    /// Remove a target, with its accounts and their grants.
    Remove {
        /// Target name.
        name: String,
    },
    /// List targets with their host key fingerprints.
    List(JsonFlag),
}

/// `psmctl account …`
#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Add an account (USERNAME@TARGET) with a password or a private key.
    #[command(group(ArgGroup::new("credential").required(true).args(["password_stdin", "private_key"])))]
    Add {
        /// USERNAME@TARGET (split on the last '@').
        account: String,
        /// Read the account's password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// An unencrypted OpenSSH private key file.
        #[arg(long, value_name = "FILE")]
        private_key: Option<PathBuf>,
        /// The account's Windows domain (RDP targets; default: a local account).
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
    },
    /// Remove an account and the grants on it.
    Remove {
        /// USERNAME@TARGET.
        account: String,
    },
    /// List accounts (never their credentials).
    List(JsonFlag),
}

/// `psmctl grant …`
// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum GrantCmd {
    /// Allow USER (or @GROUP) to open sessions as USERNAME@TARGET (or USERNAME@@TARGETGROUP).
    Add {
        /// psm user, or @group.
        user: String,
        /// USERNAME@TARGET or USERNAME@@TARGETGROUP.
        account: String,
        /// An environment variable the client may pass to the target besides LANG and LC_*
        /// (a name, or a prefix ending in *); repeat for more.
        #[arg(long = "allow-env", value_name = "NAME")]
        allow_env: Vec<String>,
        /// Conditions.
        #[command(flatten)]
        cond: ConditionFlags,
    },
    /// Remove a grant.
    Remove {
        /// psm user, or @group.
        user: String,
        /// USERNAME@TARGET or USERNAME@@TARGETGROUP.
        account: String,
    },
    /// List grants.
    List(JsonFlag),
}

/// `psmctl sessions …`
#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List live sessions.
    List(JsonFlag),
    /// Show a live session's terminal as it happens (read-only, from its recording); for an
    /// RDP session, the lines typed and the session's events.
    Watch {
        /// Session id (from `sessions list`).
        id: String,
    },
    /// End a live session within a second; the user sees the reason.
    Kill {
        /// Session id (from `sessions list`).
        id: String,
        /// What the user and the audit log are told.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `psmctl audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Print the last audit events.
    Tail {
        /// How many events.
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
        /// Print a JSON array of events.
        #[arg(long)]
        json: bool,
    },
    /// Check the audit log's hash chain and signed checkpoints; say what is wrong and where.
    /// Exit status 1 when anything is.
    Verify,
}

/// `psmctl recordings …`
#[derive(Debug, Subcommand)]
pub enum RecordingsCmd {
    /// List recordings.
    List(JsonFlag),
    /// Replay a recording in the terminal.
    Play {
        /// Recording id.
        id: String,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Start at this offset in the session (`90s`, `1m30s`); the screen before it is drawn
        /// at once.
        #[arg(long, value_name = "OFFSET")]
        from: Option<String>,
        /// Longest idle gap kept, in seconds (before --speed).
        #[arg(long, value_name = "S", default_value_t = 2.0)]
        idle_limit: f64,
        /// Write the output bytes as recorded, escape sequences and all. Unsafe: the session's
        /// output can then set the clipboard and window title, and make the terminal type
        /// answers into the shell. By default only what draws the screen is written.
        #[arg(long)]
        raw: bool,
    },
    /// Find sessions where TEXT was typed or shown on the screen (through the search index).
    Search {
        /// Text to find (a substring, case-insensitive for ASCII).
        #[arg(required_unless_present = "regex", conflicts_with = "regex")]
        text: Option<String>,
        /// A regular expression instead (matched line by line after the other filters: slower).
        #[arg(long, value_name = "RE")]
        regex: Option<String>,
        /// Only this psm user's sessions.
        #[arg(long)]
        user: Option<String>,
        /// Only sessions to this target (`target` or `account@target`).
        #[arg(long)]
        target: Option<String>,
        /// Only lines at or after this time (RFC 3339 or a date).
        #[arg(long)]
        since: Option<String>,
        /// Only lines before this time (RFC 3339 or a date).
        #[arg(long)]
        until: Option<String>,
    },
    /// Rebuild the search index from the recording files.
    Reindex,
    /// Export a recording.
    Export {
        /// Recording id.
        id: String,
        /// Output format (png and video: RDP recordings only).
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Output file (default: standard output); for png the directory of the frames, for
        /// video the file (.webm or .mp4).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// png and video: one frame per this much recorded time (1s, 500ms, 2m; default 1s).
        #[arg(long, value_name = "INTERVAL", value_parser = recordings::parse_every)]
        every: Option<u64>,
    },
    /// Check recordings' seals and signed trailers; say what is wrong and where. Exit status 1
    /// unless every one is OK.
    Verify {
        /// Recording id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every recording.
        #[arg(long)]
        all: bool,
    },
    /// Print the evidence public key (`ed25519:<hex>`) that recordings and audit checkpoints
    /// are signed with: what an auditor gives `psm-verify`.
    Pubkey,
    /// Create a recording key in a new FILE (mode 0600) for `[recorder] encryption_key_file`:
    /// recordings are then encrypted at rest with it, and replaying them needs it.
    Keygen {
        /// The key file to create (never over an existing one).
        file: PathBuf,
    },
}

/// Why a psmctl command failed; `Display` is the whole message psmctl prints.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon could not be reached or refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An argument did not pass validation.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A file named on the command line could not be read or used.
    #[error("{}: {reason}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Standard input could not be read or held nothing usable.
    #[error("{0}")]
    Stdin(String),
    /// A bad combination of arguments.
    #[error("{0}")]
    Usage(String),
    /// `policy check` answered "denied" (already printed; exit status 1).
    #[error("denied")]
    Denied,
    /// A verification found something wrong (already printed; exit status 1).
    #[error("verification failed")]
    Unverified,
    /// The evidence key could not be read.
    #[error(transparent)]
    Evidence(#[from] psm_evidence::KeyError),
    /// A host-key scan failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// An RDP certificate scan failed.
    #[error(transparent)]
    RdpScan(#[from] crate::scan_rdp::RdpScanError),
    /// A recording could not be read.
    #[error(transparent)]
    Recording(#[from] recordings::RecordingError),
    /// The search index could not be read or rebuilt.
    #[error(transparent)]
    Review(#[from] crate::review::ReviewError),
    /// The recordings directory could not be listed.
    #[error(transparent)]
    Format(#[from] psm_recorder_format::FormatError),
    /// The audit log could not be read.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Output could not be written.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
    /// This process does not own the data directory, so it may not read its files.
    #[error(
        "permission denied: uid {uid} does not own the data directory {} (owner uid {owner})",
        .dir.display()
    )]
    NotOwner {
        /// Effective uid of psmctl.
        uid: u32,
        /// The data directory (absolute).
        dir: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// The data directory does not exist or cannot be inspected.
    #[error("{}", data_dir_error(.dir, .source))]
    DataDir {
        /// The data directory (absolute).
        dir: PathBuf,
        /// Why it could not be inspected.
        source: io::Error,
    },
}

fn data_dir_error(dir: &Path, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::NotFound {
        format!(
            "no data directory at {}; give --data-dir DIR or set PSM_DATA_DIR to the directory \
             psm runs with",
            dir.display()
        )
    } else {
        format!("cannot access the data directory {}: {e}", dir.display())
    }
}

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

impl CliError {
    /// Whether this is a closed standard output (`psmctl … | head`), which is not worth a
    /// message.
    pub fn is_broken_pipe(&self) -> bool {
        match self {
            CliError::Output(e)
            | CliError::Recording(recordings::RecordingError::Output(e))
            | CliError::Recording(recordings::RecordingError::Format(
                psm_recorder_format::FormatError::Io(e),
            )) => e.kind() == io::ErrorKind::BrokenPipe,
            _ => false,
        }
    }
}

/// Runs one psmctl command, reading passwords from `stdin` and printing to `out`.
pub fn run(cli: Cli, stdin: &mut dyn BufRead, out: &mut dyn Write) -> Result<(), CliError> {
    let data_dir = cli.data_dir;
    match cli.command {
        Command::User { cmd } => user(&data_dir, cmd, stdin, out),
        Command::Target { cmd } => target(&data_dir, cmd, out),
        Command::Account { cmd } => account(&data_dir, cmd, stdin, out),
        Command::Grant { cmd } => grant(&data_dir, cmd, out),
        Command::Sessions {
            cmd: SessionsCmd::List(f),
        } => {
            let list: Vec<SessionInfo> =
                Client::connect(&data_dir)?.call_as(&Request::SessionsList)?;
            print_sessions(out, &list, f.json, psm_control_api::now_ms())
        }
        Command::Sessions {
            cmd: SessionsCmd::Watch { id },
        } => {
            check_data_dir_owner(&data_dir)?;
            let live = |dir: &Path, id: &str| -> Result<Option<SessionInfo>, CliError> {
                let list: Vec<SessionInfo> =
                    Client::connect(dir)?.call_as(&Request::SessionsList)?;
                Ok(list.into_iter().find(|s| s.session.session_id == id))
            };
            let Some(s) = live(&data_dir, &id)? else {
                return Err(CliError::Usage(format!(
                    "no live session '{}' (sessions list shows them; recordings play replays ended ones)",
                    psm_control_api::escape(&id)
                )));
            };
            if !s.session.recorded {
                return Err(CliError::Usage(format!(
                    "session '{}' is not recorded (its grant says --unrecorded): there is nothing to watch",
                    psm_control_api::escape(&id)
                )));
            }
            let dir = data_dir.clone();
            let sid = id.clone();
            recordings::watch(
                &data_dir,
                &s.session.recording_id,
                move || live(&dir, &sid).map(|s| s.is_some()).unwrap_or(false),
                out,
            )?;
            Ok(())
        }
        Command::Sessions {
            cmd: SessionsCmd::Kill { id, reason },
        } => change(
            out,
            &mut Client::connect(&data_dir)?,
            &Request::SessionKill {
                session_id: id,
                reason,
            },
        ),
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
        Command::Recordings { cmd } => recordings_cmd(&data_dir, cmd, out),
        Command::RdpFile(args) => crate::cli_rdp::rdp_file(&data_dir, args, out),
        Command::Status(f) => {
            let s: StatusInfo = Client::connect(&data_dir)?.call_as(&Request::Status)?;
            if f.json {
                print_json(out, &s)
            } else {
                let relays: Vec<&str> = s.relays.iter().map(|r| r.relay_id.as_str()).collect();
                writeln!(
                    out,
                    "psm-control is running: policy version {}, {} relay(s) connected{}{}, {} live session(s){}",
                    s.version,
                    relays.len(),
                    if relays.is_empty() { "" } else { ": " },
                    relays.join(", "),
                    s.sessions,
                    if s.rdp_sessions > 0 {
                        format!(" ({} RDP)", s.rdp_sessions)
                    } else {
                        String::new()
                    }
                )?;
                for r in &s.relays {
                    let st = &r.stats;
                    writeln!(
                        out,
                        "relay {}: policy version {}{}; recorder {}; connections {}, refused before handshake {}, failed before authentication {}, authentication failures {}, unauthenticated now {}, sessions started {}",
                        field(&r.relay_id),
                        st.policy_version,
                        if st.policy_version == s.version { "" } else { " (behind)" },
                        if st.recorder_connected { "connected" } else { "NOT CONNECTED (recorded sessions are refused)" },
                        st.connections,
                        st.startups_refused,
                        st.preauth_failures,
                        st.auth_failures,
                        st.unauthenticated,
                        st.sessions_started,
                    )?;
                }
                match (&s.recordings, &s.recordings_error) {
                    (Some(d), _) => writeln!(
                        out,
                        "recordings: {} free of {}, {} files free ({})",
                        human_bytes(d.free_bytes),
                        human_bytes(d.total_bytes),
                        d.free_inodes,
                        d.path
                    )?,
                    (None, Some(e)) => writeln!(out, "recordings: free space unknown: {e}")?,
                    (None, None) => {}
                }
                for k in &s.siem {
                    writeln!(out, "{}", siem_line(k))?;
                }
                Ok(())
            }
        }
    }
}

/// One SIEM sink in `psmctl status`.
fn siem_line(k: &crate::protocol::SinkStatus) -> String {
    let link = if k.connected {
        "connected".to_string()
    } else {
        match &k.last_error {
            Some(e) => format!("NOT CONNECTED ({})", field(e)),
            None => "NOT CONNECTED".to_string(),
        }
    };
    format!(
        "siem sink {} ({} {}, {}): {link}; queued {} ({}), delivered {} (up to seq {}), dropped {}{}",
        field(&k.name),
        k.transport,
        field(&k.address),
        k.format,
        k.queued,
        human_bytes(k.queued_bytes),
        k.delivered,
        k.delivered_seq,
        k.dropped,
        if k.dropping {
            " (DROPPING NOW: its queue is full)"
        } else {
            ""
        }
    )
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

/// Reads one line (the password) from `stdin`, without its line ending.
fn read_password(stdin: &mut dyn BufRead) -> Result<Zeroizing<String>, CliError> {
    let mut line = Zeroizing::new(String::new());
    stdin
        .read_line(&mut line)
        .map_err(|e| CliError::Stdin(format!("cannot read the password from stdin: {e}")))?;
    let len = line.trim_end_matches(['\n', '\r']).len();
    line.truncate(len);
    if line.is_empty() {
        return Err(CliError::Stdin(
            "no password on stdin (expected one line)".into(),
        ));
    }
    Ok(line)
}

fn read_file(path: &Path) -> Result<Zeroizing<String>, CliError> {
    fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| CliError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The public keys in a `.pub` / authorized-keys-like file: one per non-empty, non-comment line.
fn read_public_keys(path: &Path) -> Result<Vec<String>, CliError> {
    let text = read_file(path)?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (full, _) = validate::user_key(line).map_err(|e| CliError::File {
            path: path.to_path_buf(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        keys.push(full);
    }
    if keys.is_empty() {
        return Err(CliError::File {
            path: path.to_path_buf(),
            reason: "no public key in file".into(),
        });
    }
    Ok(keys)
}

fn user(
    data_dir: &Path,
    cmd: UserCmd,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        UserCmd::Add {
            name,
            password_stdin,
            ssh_key,
        } => {
            validate::user_name(&name)?;
            if !password_stdin && ssh_key.is_empty() {
                return Err(CliError::Usage(
                    "give --password-stdin or at least one --ssh-key".into(),
                ));
            }
            let mut ssh_keys = Vec::new();
            for path in &ssh_key {
                ssh_keys.extend(read_public_keys(path)?);
            }
            let mut client = Client::connect(data_dir)?;
            let password = if password_stdin {
                Some(Secret::new(read_password(stdin)?.to_string()))
            } else {
                None
            };
            change(
                out,
                &mut client,
                &Request::UserAdd {
                    name,
                    password,
                    ssh_keys,
                },
            )
        }
        UserCmd::Remove { name } => change(
            out,
            &mut Client::connect(data_dir)?,
            &Request::UserRemove { name },
        ),
        UserCmd::Passwd {
            name,
            password_stdin,
        } => {
            validate::user_name(&name)?;
            if !password_stdin {
                return Err(CliError::Usage("give --password-stdin".into()));
            }
            let mut client = Client::connect(data_dir)?;
            let password = Secret::new(read_password(stdin)?.to_string());
            change(out, &mut client, &Request::UserPasswd { name, password })
        }
        UserCmd::List(f) => {
            let list: Vec<UserInfo> = Client::connect(data_dir)?.call_as(&Request::UserList)?;
            if f.json {
                return print_json(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        if u.has_password { "yes" } else { "no" }.to_string(),
                        if u.mfa { "totp" } else { "-" }.to_string(),
                        u.groups
                            .iter()
                            .map(|g| format!("@{g}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        if u.disabled {
                            "disabled".to_string()
                        } else if u
                            .locked_until_ms
                            .is_some_and(|t| t > psm_control_api::now_ms())
                        {
                            "locked".to_string()
                        } else {
                            "active".to_string()
                        },
                        u.ssh_keys
                            .iter()
                            .map(|k| validate::fingerprint(k))
                            .collect::<Vec<_>>()
                            .join(", "),
                        crate::cli_rdp::user_rdp_column(u).to_string(),
                    ]
                })
                .collect();
            write_table(
                out,
                &[
                    "NAME", "PASSWORD", "MFA", "GROUPS", "STATE", "SSH KEYS", "RDP",
                ],
                &rows,
            )?;
            Ok(())
        }
        UserCmd::Disable { name } => cli_policy::user_state(
            data_dir,
            Request::UserDisable {
                name,
                disabled: true,
            },
            out,
        ),
        UserCmd::Enable { name } => cli_policy::user_state(
            data_dir,
            Request::UserDisable {
                name,
                disabled: false,
            },
            out,
        ),
        UserCmd::Unlock { name } => {
            cli_policy::user_state(data_dir, Request::UserUnlock { name }, out)
        }
        UserCmd::Mfa { cmd } => cli_policy::mfa(data_dir, cmd, out),
    }
}

fn target(data_dir: &Path, cmd: TargetCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        TargetCmd::Add {
            name,
            address,
            protocol,
            host_key,
            cert_fingerprint,
            scan,
            listen,
        } => {
            validate::target_name(&name)?;
            let address = validate::address_for(protocol, &address)?;
            match (protocol, listen) {
                (psm_control_api::Protocol::Tcp, Some(listen)) => {
                    let listen = validate::listen_address(&listen)?;
                    let mut client = Client::connect(data_dir)?;
                    return change(
                        out,
                        &mut client,
                        &Request::TargetAdd {
                            name,
                            address,
                            host_key: String::new(),
                            protocol,
                            listen: Some(listen),
                        },
                    );
                }
                (psm_control_api::Protocol::Tcp, None) => {
                    return Err(CliError::Usage(
                        "a tcp target needs --listen IP:PORT (the psm port users connect to)"
                            .into(),
                    ))
                }
                (_, Some(_)) => {
                    return Err(CliError::Usage(
                        "--listen is for tcp targets (--protocol tcp)".into(),
                    ))
                }
                (_, None) => {}
            }
            if protocol == psm_control_api::Protocol::Rdp || cert_fingerprint.is_some() {
                return crate::cli_rdp::target_add(
                    data_dir,
                    name,
                    address,
                    protocol,
                    host_key,
                    cert_fingerprint,
                    scan,
                    out,
                );
            }
            let mut client = Client::connect(data_dir)?;
            let host_key = match (host_key, scan) {
                (Some(k), false) => validate::host_key(&k)?,
                (None, true) => {
                    // say "already exists" before scanning a host for nothing
                    if find_target(&mut client, &name)?.is_some() {
                        return Err(CliError::Client(ClientError::Refused(format!(
                            "target '{name}' already exists"
                        ))));
                    }
                    let key = scan::scan_host_key_blocking(&address, scan::SCAN_TIMEOUT)?;
                    writeln!(
                        out,
                        "scanned {name} ({address}): {}",
                        validate::key_fingerprint(&key)
                    )?;
                    validate::key_material(&key)?
                }
                _ => {
                    return Err(CliError::Usage(
                        "give exactly one of --host-key and --scan".into(),
                    ))
                }
            };
            change(
                out,
                &mut client,
                &Request::TargetAdd {
                    name,
                    address,
                    host_key,
                    protocol,
                    listen: None,
                },
            )
        }
        TargetCmd::Update {
            name,
            address,
            host_key,
            cert_fingerprint,
            scan,
        } => {
            validate::target_name(&name)?;
            let mut client = Client::connect(data_dir)?;
            // an RDP target pins its certificate: see cli_rdp
            let current = find_target(&mut client, &name)?;
            if let Some(t) = current
                .as_ref()
                .filter(|t| t.protocol == psm_control_api::Protocol::Rdp)
            {
                let pin = cert_fingerprint.or(host_key);
                return crate::cli_rdp::update_rdp(&mut client, t, address, pin, scan, out);
            }
            if cert_fingerprint.is_some() {
                return Err(match current {
                    Some(_) => CliError::Usage(format!(
                        "target '{name}' is an SSH target: pin its host key with --host-key or --scan"
                    )),
                    None => CliError::Client(ClientError::Refused(format!(
                        "unknown target '{name}'"
                    ))),
                });
            }
            let address = address.as_deref().map(validate::address).transpose()?;
            let host_key = host_key.as_deref().map(validate::host_key).transpose()?;
            let host_key = if scan {
                let Some(current) = find_target(&mut client, &name)? else {
                    return Err(CliError::Client(ClientError::Refused(format!(
                        "unknown target '{name}'"
                    ))));
                };
                let at = address.clone().unwrap_or(current.address);
                let key = scan::scan_host_key_blocking(&at, scan::SCAN_TIMEOUT)?;
                writeln!(
                    out,
                    "scanned {name} ({at}): {}",
                    validate::key_fingerprint(&key)
                )?;
                Some(validate::key_material(&key)?)
            } else {
                host_key
            };
            change(
                out,
                &mut client,
                &Request::TargetUpdate {
                    name,
                    address,
                    host_key,
                },
            )
        }
        TargetCmd::Remove { name } => change(
            out,
            &mut Client::connect(data_dir)?,
            &Request::TargetRemove { name },
        ),
        TargetCmd::List(f) => {
            let list: Vec<TargetInfo> = Client::connect(data_dir)?.call_as(&Request::TargetList)?;
            if f.json {
                return print_json(out, &list);
            }
            if list.iter().any(|t| !t.protocol.is_ssh()) {
                return crate::cli_rdp::print_targets(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| vec![t.name.clone(), t.address.clone(), t.fingerprint.clone()])
                .collect();
            write_table(out, &["NAME", "ADDRESS", "HOST KEY"], &rows)?;
            Ok(())
        }
    }
}

/// The target called `name`, if psm-control knows one.
fn find_target(client: &mut Client, name: &str) -> Result<Option<TargetInfo>, CliError> {
    let list: Vec<TargetInfo> = client.call_as(&Request::TargetList)?;
    Ok(list.into_iter().find(|t| t.name == name))
}

fn account(
    data_dir: &Path,
    cmd: AccountCmd,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        AccountCmd::Add {
            account,
            password_stdin,
            private_key,
            domain,
        } => {
            let (username, target) = validate::split_account(&account)?;
            if let Some(d) = &domain {
                validate::domain(d)?;
            }
            let credential = match (password_stdin, private_key) {
                (true, None) => None,
                (false, Some(path)) => {
                    let pem = read_file(&path)?;
                    validate::private_key(&pem).map_err(|e| CliError::File {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    Some(Credential::PrivateKey(Secret::new(pem.to_string())))
                }
                _ => {
                    return Err(CliError::Usage(
                        "give exactly one of --password-stdin and --private-key".into(),
                    ))
                }
            };
            let mut client = Client::connect(data_dir)?;
            let credential = match credential {
                Some(c) => c,
                None => Credential::Password(Secret::new(read_password(stdin)?.to_string())),
            };
            change(
                out,
                &mut client,
                &Request::AccountAdd {
                    target,
                    username,
                    credential,
                    domain,
                },
            )
        }
        AccountCmd::Remove { account } => {
            let (username, target) = validate::split_account(&account)?;
            change(
                out,
                &mut Client::connect(data_dir)?,
                &Request::AccountRemove { target, username },
            )
        }
        AccountCmd::List(f) => {
            let list: Vec<AccountInfo> =
                Client::connect(data_dir)?.call_as(&Request::AccountList)?;
            if f.json {
                return print_json(out, &list);
            }
            if list.iter().any(|a| a.domain.is_some()) {
                return crate::cli_rdp::print_accounts(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|a| {
                    vec![
                        a.target.clone(),
                        a.username.clone(),
                        a.kind.as_str().to_string(),
                    ]
                })
                .collect();
            write_table(out, &["TARGET", "USERNAME", "CREDENTIAL"], &rows)?;
            Ok(())
        }
    }
}

fn grant(data_dir: &Path, cmd: GrantCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        GrantCmd::Add {
            user,
            account,
            allow_env,
            cond,
        } => {
            let (account, target) = cli_policy::split_grant_target(&account)?;
            let conditions = cond.conditions(Vec::new())?;
            change(
                out,
                &mut Client::connect(data_dir)?,
                &Request::GrantAdd {
                    user,
                    target,
                    account,
                    allow_env,
                    conditions,
                },
            )
        }
        GrantCmd::Remove { user, account } => {
            let (account, target) = cli_policy::split_grant_target(&account)?;
            change(
                out,
                &mut Client::connect(data_dir)?,
                &Request::GrantRemove {
                    user,
                    target,
                    account,
                },
            )
        }
        GrantCmd::List(f) => {
            let list: Vec<GrantInfo> = Client::connect(data_dir)?.call_as(&Request::GrantList)?;
            if f.json {
                return print_json(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|g| {
                    vec![
                        g.user.clone(),
                        g.account.clone(),
                        g.target.clone(),
                        g.conditions.describe().join("; "),
                    ]
                })
                .collect();
            write_table(out, &["USER", "ACCOUNT", "TARGET", "CONDITIONS"], &rows)?;
            Ok(())
        }
    }
}

fn print_sessions(
    out: &mut dyn Write,
    list: &[SessionInfo],
    json: bool,
    now_ms: u64,
) -> Result<(), CliError> {
    if json {
        return print_json(out, list);
    }
    let rdp = list
        .iter()
        .any(|i| i.protocol == psm_control_api::Protocol::Rdp);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let s = &i.session;
            let mut row = vec![
                s.session_id.clone(),
                s.user.clone(),
                format!("{}@{}", s.account, s.target),
                s.source.clone(),
                timefmt::utc(s.start_ms),
                timefmt::duration(now_ms.saturating_sub(s.start_ms)),
                human_bytes(i.bytes_up),
                human_bytes(i.bytes_down),
                match s.worker {
                    Some(w) => format!("{}/{w}", i.relay),
                    None => i.relay.clone(),
                },
                if s.recorded {
                    s.recording_id.clone()
                } else {
                    "(unrecorded)".into()
                },
                s.justification
                    .as_deref()
                    .map(psm_control_api::escape)
                    .unwrap_or_default(),
            ];
            if rdp {
                // a protocol column only where RDP sessions are listed: SSH-only output stays
                row.insert(3, i.protocol.to_string());
            }
            row
        })
        .collect();
    let mut headers = vec![
        "SESSION",
        "USER",
        "ACCOUNT",
        "SOURCE",
        "STARTED (UTC)",
        "DURATION",
        "UP",
        "DOWN",
        "RELAY/WORKER",
        "RECORDING",
        "REASON",
    ];
    if rdp {
        headers.insert(3, "PROTOCOL");
    }
    write_table(out, &headers, &rows)?;
    Ok(())
}

fn recordings_cmd(
    data_dir: &Path,
    cmd: RecordingsCmd,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if let RecordingsCmd::Keygen { file } = &cmd {
        // needs no data directory: the key may be made before psm is set up
        let key = psm_recorder_format::crypt::RecordingKey::create(file)
            .map_err(recordings::RecordingError::Key)?;
        writeln!(
            out,
            "recording key {} written to {}; set [recorder] encryption_key_file to it in psm.toml and restart psm; keep a copy apart from the data directory: without it encrypted recordings cannot be replayed",
            key.id(),
            file.display()
        )?;
        return Ok(());
    }
    check_data_dir_owner(data_dir)?;
    match cmd {
        RecordingsCmd::Keygen { .. } => {}
        RecordingsCmd::List(f) => {
            let rows = recordings::list(data_dir)?;
            recordings::print_list(out, &rows, f.json)?;
        }
        RecordingsCmd::Play {
            id,
            speed,
            raw,
            from,
            idle_limit,
        } => {
            if !(speed.is_finite() && speed > 0.0) {
                return Err(CliError::Usage(format!(
                    "invalid --speed {speed}: must be a positive number"
                )));
            }
            if !(idle_limit.is_finite() && idle_limit >= 0.0) {
                return Err(CliError::Usage(format!(
                    "invalid --idle-limit {idle_limit}: must be zero or more seconds"
                )));
            }
            let from_us = match from {
                Some(f) => crate::review::parse_offset(&f)
                    .map_err(|e| CliError::Usage(format!("invalid --from: {e}")))?,
                None => 0,
            };
            let mode = if raw { Replay::Raw } else { Replay::Safe };
            let opts = crate::review::PlayOptions {
                speed,
                from_us,
                idle_limit_us: (idle_limit * 1e6) as u64,
                mode,
            };
            // keys when stdin is a terminal: the guard puts it back when dropped
            let raw = crate::review::RawInput::start();
            let keys = raw.as_ref().map(|(_, rx)| rx);
            crate::review::play(data_dir, &id, opts, keys, out)?;
            drop(raw);
        }
        RecordingsCmd::Search {
            text,
            regex,
            user,
            target,
            since,
            until,
        } => {
            let time = |s: Option<String>, flag: &str| -> Result<Option<u64>, CliError> {
                s.map(|s| {
                    psm_control_api::conditions::parse_time(&s)
                        .map_err(|e| CliError::Usage(format!("invalid --{flag}: {e}")))
                })
                .transpose()
            };
            let q = psm_recorder_index::Query {
                regex: regex.is_some(),
                text: regex.or(text).unwrap_or_default(),
                user,
                target,
                since_ms: time(since, "since")?,
                until_ms: time(until, "until")?,
            };
            let hits = crate::review::search(data_dir, &q)?;
            crate::review::print_hits(out, &hits)?;
            if hits.len() >= psm_recorder_index::MAX_HITS {
                writeln!(
                    out,
                    "(stopped at {} hits; narrow the search)",
                    psm_recorder_index::MAX_HITS
                )?;
            }
        }
        RecordingsCmd::Reindex => {
            let (recs, lines, failed) = crate::review::reindex(data_dir, out)?;
            writeln!(
                out,
                "indexed {recs} recording(s), {lines} line(s); {failed} could not be read"
            )?;
        }
        RecordingsCmd::Verify { id, all } => {
            let key = evidence_public_key(data_dir)?;
            let reports = match (id, all) {
                (Some(id), false) => match recordings::verify(data_dir, &id, &key) {
                    Ok(r) => vec![r],
                    Err(e) => {
                        // a recording retention deleted is not missing: the audit log says so
                        if let Some(line) = deleted_by_retention(data_dir, &id) {
                            writeln!(out, "{line}")?;
                            return Ok(());
                        }
                        return Err(e.into());
                    }
                },
                _ => recordings::verify_all(data_dir, &key)?,
            };
            let mut bad = 0;
            for r in &reports {
                writeln!(out, "{r}")?;
                if !r.ok() {
                    bad += 1;
                }
            }
            if all {
                writeln!(
                    out,
                    "{} recording(s): {} OK, {bad} not OK",
                    reports.len(),
                    reports.len() - bad
                )?;
            }
            if bad > 0 {
                return Err(CliError::Unverified);
            }
        }
        RecordingsCmd::Pubkey => {
            writeln!(out, "{}", evidence_public_key(data_dir)?)?;
        }
        RecordingsCmd::Export {
            id,
            format: format @ (ExportFormat::Png | ExportFormat::Video),
            output,
            every,
        } => {
            let Some(path) = output else {
                return Err(CliError::Usage(
                    "--format png needs -o DIR, --format video needs -o FILE (.webm or .mp4)"
                        .into(),
                ));
            };
            let every = every.unwrap_or(recordings::DEFAULT_EVERY_US);
            let n = recordings::export_frames(
                data_dir,
                &id,
                format,
                &path,
                every,
                std::ffi::OsStr::new("ffmpeg"),
            )?;
            writeln!(out, "{n} frames written to {}", path.display())?;
        }
        RecordingsCmd::Export { every: Some(_), .. } => {
            return Err(CliError::Usage(
                "--every is for --format png and video".into(),
            ))
        }
        RecordingsCmd::Export {
            id,
            format,
            output,
            every: None,
        } => match output {
            Some(path) => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| CliError::File {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                recordings::export(data_dir, &id, format, &mut f)?;
            }
            None => recordings::export(data_dir, &id, format, out)?,
        },
    }
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
/// [`psm_control_api::escape`]).
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

/// What the audit log says of a recording retention deleted (`ID: DELETED by retention …`).
fn deleted_by_retention(data_dir: &Path, id: &str) -> Option<String> {
    let mut text = String::new();
    for path in crate::audit::segment_paths(&DataDir::new(data_dir).audit_log()).ok()? {
        text.push_str(&fs::read_to_string(path).unwrap_or_default());
    }
    text.lines().rev().find_map(|l| {
        let e: AuditEvent = serde_json::from_str(l).ok()?;
        match e.kind {
            AuditKind::Retention {
                recording_id,
                bytes,
                reason,
                modified_ms,
                ..
            } if recording_id == id => Some(format!(
                "{id}: DELETED: deleted by retention at {} ({reason}, {bytes} bytes, last written {}; audit seq {})",
                timefmt::utc(e.ts_ms),
                timefmt::utc(modified_ms),
                e.seq
            )),
            _ => None,
        }
    })
}

/// One human-readable line for an audit event: time, seq, origin, event, key fields.
pub fn format_event(e: &AuditEvent) -> String {
    let (name, fields): (&str, Vec<(&str, String)>) = match &e.kind {
        AuditKind::AuthSuccess {
            login,
            user,
            method,
            source,
        } => (
            "auth_success",
            vec![
                ("user", user.clone()),
                ("login", login.clone()),
                ("method", method.clone()),
                ("source", source.clone()),
            ],
        ),
        AuditKind::AuthFailure {
            login,
            method,
            source,
            reason,
            side,
        } => {
            let mut f = vec![
                ("login", login.clone()),
                ("method", method.clone()),
                ("source", source.clone()),
                ("reason", reason.clone()),
            ];
            if !side.is_empty() {
                f.push(("side", side.clone()));
            }
            ("auth_failure", f)
        }
        AuditKind::SessionDenied {
            login,
            user,
            source,
            reason,
            reason_code,
            side,
            ..
        } => {
            let mut f = vec![
                ("user", user.clone()),
                ("login", login.clone()),
                ("source", source.clone()),
                ("reason", reason.clone()),
            ];
            if !reason_code.is_empty() {
                f.push(("code", reason_code.clone()));
            }
            if !side.is_empty() {
                f.push(("side", side.clone()));
            }
            ("session_denied", f)
        }
        AuditKind::SessionStart {
            session_id,
            user,
            source,
            target,
            target_address,
            account,
            recording_id,
            recorded,
            ..
        } => (
            "session_start",
            vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("address", target_address.clone()),
                ("source", source.clone()),
                if *recorded {
                    ("recording", recording_id.clone())
                } else {
                    ("recording", "none (unrecorded)".to_string())
                },
            ],
        ),
        AuditKind::SessionEnd {
            session_id,
            user,
            target,
            account,
            duration_ms,
            bytes_up,
            bytes_down,
            exit_status,
            exit_signal,
            reason,
            unconfirmed_bytes,
            ..
        } => {
            let mut f = vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("duration", timefmt::duration(*duration_ms)),
                ("up", bytes_up.to_string()),
                ("down", bytes_down.to_string()),
            ];
            if let Some(s) = exit_status {
                f.push(("exit", s.to_string()));
            }
            if let Some(s) = exit_signal {
                f.push(("signal", s.clone()));
            }
            f.push(("reason", reason.clone()));
            if let Some(n) = unconfirmed_bytes.filter(|n| *n > 0) {
                f.push(("unconfirmed", n.to_string()));
            }
            ("session_end", f)
        }
        AuditKind::RdpChannel {
            session_id,
            user,
            target,
            account,
            channel,
            what,
            reason,
        } => (
            "rdp_channel_refused",
            vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("channel", channel.clone()),
                ("refused", what.clone()),
                ("reason", reason.clone()),
            ],
        ),
        AuditKind::ChannelRequest {
            session_id,
            user,
            target,
            account,
            channel,
            request,
            command,
            accepted,
        } => {
            let mut f = vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("channel", channel.to_string()),
                ("request", request.clone()),
            ];
            if !command.is_empty() {
                f.push(("command", command.clone()));
            }
            if !accepted {
                f.push(("accepted", "no".into()));
            }
            ("channel_request", f)
        }
        AuditKind::Command {
            session_id,
            user,
            target,
            account,
            channel,
            line,
            decision,
            rule,
            source,
        } => {
            let mut f = vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("channel", channel.to_string()),
                ("line", line.clone()),
                ("decision", decision.clone()),
                ("from", source.clone()),
            ];
            if let Some(r) = rule {
                f.push(("rule", r.to_string()));
            }
            ("command", f)
        }
        AuditKind::Approval {
            request,
            action,
            user,
            account,
            target,
            by,
            reason,
        } => {
            let mut f = vec![
                ("request", request.to_string()),
                ("action", action.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
            ];
            if let Some(b) = by {
                f.push(("by", b.clone()));
            }
            if let Some(r) = reason {
                f.push(("reason", r.clone()));
            }
            ("approval", f)
        }
        AuditKind::Forward {
            session_id,
            user,
            target,
            account,
            channel,
            kind,
            destination,
            bytes_up,
            bytes_down,
            duration_ms,
        } => (
            "forward",
            vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("channel", channel.to_string()),
                ("kind", kind.clone()),
                ("to", destination.clone()),
                ("up", bytes_up.to_string()),
                ("down", bytes_down.to_string()),
                ("duration_ms", duration_ms.to_string()),
            ],
        ),
        AuditKind::CommandEnd {
            session_id,
            user,
            target,
            account,
            channel,
            line,
            exit_status,
            exit_signal,
            duration_ms,
            ..
        } => {
            let mut f = vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("channel", channel.to_string()),
                ("line", line.clone()),
            ];
            if let Some(s) = exit_status {
                f.push(("exit", s.to_string()));
            }
            if let Some(s) = exit_signal {
                f.push(("signal", s.clone()));
            }
            f.push(("duration_ms", duration_ms.to_string()));
            ("command_end", f)
        }
        AuditKind::FileTransfer {
            session_id,
            user,
            target,
            account,
            channel,
            protocol,
            operation,
            path,
            path2,
            bytes,
            sha256,
            partial,
            note,
            ok,
            status,
        } => {
            let mut f = vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("channel", channel.to_string()),
                ("protocol", protocol.clone()),
                ("op", operation.clone()),
                ("path", path.clone()),
            ];
            if let Some(p) = path2 {
                f.push(("path2", p.clone()));
            }
            if matches!(operation.as_str(), "read" | "write") || *bytes > 0 {
                f.push(("bytes", bytes.to_string()));
            }
            if let Some(h) = sha256 {
                f.push(("sha256", h.clone()));
            }
            if *partial {
                f.push(("partial", "yes".into()));
            }
            if let Some(n) = note {
                f.push(("note", n.clone()));
            }
            if !ok {
                f.push(("ok", "no".into()));
            }
            if let Some(s) = status {
                f.push(("status", s.clone()));
            }
            ("file_transfer", f)
        }
        AuditKind::AdminChange {
            action,
            object,
            actor_uid,
            actor,
        } => {
            let mut f = vec![("action", action.clone()), ("object", object.clone())];
            if let Some(a) = actor {
                f.push(("actor", a.clone()));
            }
            if let Some(uid) = actor_uid {
                f.push(("actor_uid", uid.to_string()));
            }
            ("admin_change", f)
        }
        AuditKind::Notice {
            message,
            session_id,
            count,
            ..
        } => {
            let mut f = Vec::new();
            if let Some(s) = session_id {
                f.push(("session", s.clone()));
            }
            if let Some(n) = count {
                f.push(("count", n.to_string()));
            }
            f.push(("message", message.clone()));
            ("notice", f)
        }
        AuditKind::Retention {
            recording_id,
            bytes,
            reason,
            modified_ms,
            audit_segment,
        } => {
            let mut f = Vec::new();
            match audit_segment {
                Some(s) => {
                    f.push(("audit_segment", s.file.clone()));
                    f.push(("seq", format!("{}..{}", s.first_seq, s.last_seq)));
                }
                None => f.push(("recording", recording_id.clone())),
            }
            f.push(("bytes", bytes.to_string()));
            f.push(("reason", reason.clone()));
            f.push(("last_written", timefmt::utc(*modified_ms)));
            ("retention", f)
        }
    };
    let mut line = format!(
        "{}  #{}  {}  {}",
        timefmt::utc(e.ts_ms),
        e.seq,
        e.origin,
        name
    );
    for (k, v) in fields {
        line.push_str(&format!("  {k}={}", field(&v)));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("psmctl").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_commands() {
        for ok in [
            &["user", "add", "alice", "--password-stdin"][..],
            &[
                "user",
                "add",
                "alice",
                "--ssh-key",
                "a.pub",
                "--ssh-key",
                "b.pub",
            ],
            &[
                "user",
                "add",
                "alice",
                "--password-stdin",
                "--ssh-key",
                "a.pub",
            ],
            &["user", "remove", "alice"],
            &[
                "target",
                "add",
                "web01",
                "--address",
                "10.0.0.1:22",
                "--host-key",
                "ssh-ed25519 AAAA",
            ],
            &[
                "target",
                "add",
                "web01",
                "--address",
                "10.0.0.1:22",
                "--scan",
            ],
            &["target", "remove", "web01"],
            &["target", "update", "web01", "--address", "10.0.0.2:22"],
            &["target", "update", "web01", "--scan"],
            &[
                "target",
                "update",
                "web01",
                "--address",
                "10.0.0.2:22",
                "--host-key",
                "ssh-ed25519 AAAA",
            ],
            &[
                "target",
                "update",
                "web01",
                "--address",
                "10.0.0.2:22",
                "--scan",
            ],
            &["user", "passwd", "alice", "--password-stdin"],
            &["account", "add", "root@web01", "--password-stdin"],
            &["account", "add", "root@web01", "--private-key", "id"],
            &["account", "remove", "root@web01"],
            &["grant", "add", "alice", "root@web01"],
            &["grant", "remove", "alice", "root@web01"],
            &["user", "list", "--json"],
            &["target", "list"],
            &["account", "list", "--json"],
            &["grant", "list"],
            &["sessions", "list", "--json"],
            &["audit", "tail", "-n", "5", "--json"],
            &["audit", "tail"],
            &["recordings", "list", "--json"],
            &["recordings", "play", "abc", "--speed", "2"],
            &["recordings", "play", "abc", "--raw"],
            &[
                "recordings",
                "export",
                "abc",
                "--format",
                "asciicast",
                "-o",
                "x.cast",
            ],
            &["recordings", "export", "abc", "--format", "text"],
            &[
                "recordings",
                "export",
                "abc",
                "--format",
                "png",
                "--every",
                "500ms",
                "-o",
                "frames",
            ],
            &[
                "recordings",
                "export",
                "abc",
                "--format",
                "video",
                "-o",
                "s.webm",
            ],
            &["--data-dir", "/tmp/x", "status"],
            &["status", "--data-dir", "/tmp/x"],
        ] {
            assert!(parse(ok).is_ok(), "{ok:?}: {:?}", parse(ok).err());
        }
        for bad in [
            &["user", "add", "alice"][..],
            &["target", "add", "web01", "--address", "a:1"],
            &[
                "target",
                "add",
                "web01",
                "--address",
                "a:1",
                "--scan",
                "--host-key",
                "k",
            ],
            &["account", "add", "root@web01"],
            &[
                "account",
                "add",
                "root@web01",
                "--password-stdin",
                "--private-key",
                "k",
            ],
            &["recordings", "export", "abc", "--format", "pdf"],
            &[
                "recordings",
                "export",
                "abc",
                "--format",
                "png",
                "--every",
                "1h",
            ],
            &["user", "passwd", "alice"],
            &["target", "update", "web01"],
            &["target", "update", "web01", "--scan", "--host-key", "k"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
        let cli = parse(&["audit", "tail"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Audit {
                cmd: AuditCmd::Tail { n: 20, json: false }
            }
        ));
    }

    #[test]
    fn json_help_says_what_is_printed() {
        let cmd = Cli::command();
        let help = |cmd: &clap::Command, path: &[&str]| -> String {
            let mut c = cmd.clone();
            for p in path {
                c = c.find_subcommand(p).expect("subcommand").clone();
            }
            let text = c
                .get_arguments()
                .find(|a| a.get_id() == "json")
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            text
        };
        // status prints one object
        let status = help(&cmd, &["status"]);
        assert!(
            status.contains("JSON object") && !status.contains("array"),
            "{status}"
        );
        // lists print arrays
        for path in [
            &["user", "list"][..],
            &["target", "list"],
            &["recordings", "list"],
            &["audit", "tail"],
        ] {
            let h = help(&cmd, path);
            assert!(h.contains("JSON array"), "{path:?}: {h}");
        }
    }

    #[test]
    fn password_from_stdin() {
        let mut input = io::Cursor::new(b"s3cret pass\r\nignored\n".to_vec());
        assert_eq!(&*read_password(&mut input).expect("pw"), "s3cret pass");
        let mut empty = io::Cursor::new(b"\n".to_vec());
        assert!(read_password(&mut empty).is_err());
    }

    #[test]
    fn not_running_message() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cli = parse(&[
            "--data-dir",
            &tmp.path().display().to_string(),
            "user",
            "list",
        ])
        .expect("parse");
        let e = run(cli, &mut io::empty(), &mut Vec::new()).expect_err("no daemon");
        assert_eq!(
            e.to_string(),
            format!(
                "psm-control is not running on the data directory {} (no socket at {}); if it \
                 runs with another data directory, give --data-dir DIR or set PSM_DATA_DIR",
                tmp.path().display(),
                tmp.path().join("control.sock").display()
            )
        );
    }

    /// Runs psmctl synchronously; Err is the message psmctl would print.
    fn run_args(args: &[&str]) -> Result<String, String> {
        let cli = parse(args).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        run(cli, &mut io::empty(), &mut out).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn file_commands_need_the_data_directory_and_its_ownership() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("nope");
        let d = missing.display().to_string();
        for args in [
            &["--data-dir", &d, "recordings", "list"][..],
            &["--data-dir", &d, "audit", "tail"],
            &[
                "--data-dir",
                &d,
                "recordings",
                "export",
                "x",
                "--format",
                "text",
            ],
        ] {
            let e = run_args(args).expect_err("no data directory");
            assert!(
                e.starts_with(&format!("no data directory at {d}; give --data-dir DIR")),
                "{args:?}: {e}"
            );
        }

        let dir = tmp.path().join("data");
        fs::create_dir(&dir).expect("mkdir");
        fs::create_dir(dir.join("recordings")).expect("mkdir recordings");
        fs::write(dir.join("audit.jsonl"), "").expect("audit");
        let d = dir.display().to_string();
        // the owner reads them
        assert_eq!(
            run_args(&["--data-dir", &d, "audit", "tail"]).expect("tail"),
            ""
        );
        assert_eq!(
            run_args(&["--data-dir", &d, "recordings", "list", "--json"])
                .expect("list")
                .trim(),
            "[]"
        );
        // Only root can hand the directory to someone else; skip elsewhere.
        if nix::unistd::geteuid().as_raw() != 0 {
            return;
        }
        std::os::unix::fs::chown(&dir, Some(12345), None).expect("chown");
        let want = format!(
            "permission denied: uid 0 does not own the data directory {d} (owner uid 12345)"
        );
        for args in [
            &["--data-dir", &d, "recordings", "list"][..],
            &["--data-dir", &d, "recordings", "list", "--json"],
            &["--data-dir", &d, "recordings", "play", "x"],
            &[
                "--data-dir",
                &d,
                "recordings",
                "export",
                "x",
                "--format",
                "asciicast",
            ],
            &["--data-dir", &d, "audit", "tail"],
        ] {
            assert_eq!(run_args(args).expect_err("not the owner"), want, "{args:?}");
        }
    }

    #[test]
    fn recordings_list_and_audit_tail_show_the_same_duration() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // the recorder's clock starts late: its last record is at 40 ms, the session lasted
        // 150 ms from start_ms to end_ms
        recordings::tests::write_timed_recording(tmp.path(), "rec-1", 40_000, 1_700_000_000_150);
        let rows = recordings::list(tmp.path()).expect("list");
        let mut table = Vec::new();
        recordings::print_list(&mut table, &rows, false).expect("table");
        let table = String::from_utf8(table).expect("utf8");
        let end = AuditEvent {
            seq: 9,
            ts_ms: 1_700_000_000_150,
            origin: "relay-r1".into(),
            kind: AuditKind::SessionEnd {
                session_id: "s1".into(),
                user: "alice".into(),
                source: "127.0.0.1:5000".into(),
                target: "web01".into(),
                account: "root".into(),
                start_ms: 1_700_000_000_000,
                end_ms: 1_700_000_000_150,
                duration_ms: 150,
                bytes_up: 0,
                bytes_down: 0,
                exit_status: Some(0),
                exit_signal: None,
                recording_id: "rec-1".into(),
                reason: "client closed".into(),
                reason_code: "client_closed".into(),
                side: "client".into(),
                justification: None,
                unconfirmed_bytes: None,
            },
        };
        let line = format_event(&end);
        let audit = line
            .split("  ")
            .find_map(|f| f.strip_prefix("duration="))
            .expect("duration field");
        assert_eq!(audit, "0.1s", "{line}");
        let row = table.lines().nth(1).expect("row");
        assert!(row.split_whitespace().any(|c| c == audit), "{table}");
        // and the shared formatting truncates to 0.1 s below a minute
        for (ms, text) in [(0, "0.0s"), (99, "0.0s"), (150, "0.1s"), (59_999, "59.9s")] {
            assert_eq!(timefmt::duration(ms), text);
        }
    }

    #[test]
    fn audit_lines() {
        let e = AuditEvent {
            seq: 7,
            ts_ms: 1_700_000_000_000,
            origin: "control".into(),
            kind: AuditKind::AdminChange {
                action: "grant add".into(),
                object: "alice -> root@web01".into(),
                actor_uid: None,
                actor: None,
            },
        };
        assert_eq!(
            format_event(&e),
            "2023-11-14 22:13:20  #7  control  admin_change  action=\"grant add\"  object=\"alice -> root@web01\""
        );
        let e = AuditEvent {
            kind: AuditKind::AdminChange {
                action: "user add".into(),
                object: "bob".into(),
                actor_uid: Some(1000),
                actor: Some("ops admin".into()),
            },
            ..e
        };
        assert_eq!(
            format_event(&e),
            "2023-11-14 22:13:20  #7  control  admin_change  action=\"user add\"  object=bob  actor=\"ops admin\"  actor_uid=1000"
        );
    }

    #[test]
    fn client_chosen_strings_are_escaped_in_audit_lines() {
        let e = AuditEvent {
            seq: 8,
            ts_ms: 1_700_000_000_000,
            origin: "relay-r1".into(),
            kind: AuditKind::AuthFailure {
                login: "x\n2023-11-14 22:13:21  #9  control  auth_success  user=root\u{1b}]0;t\u{7}\u{202e}abc".into(),
                method: "password".into(),
                source: "127.0.0.1:4000".into(),
                reason: "unknown user".into(),
                side: String::new(),
            },
        };
        let line = format_event(&e);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            !line.contains('\u{1b}') && !line.contains('\u{7}'),
            "{line}"
        );
        assert!(!line.contains('\u{202e}'), "{line}");
        assert!(line.contains(r#"login="x\n2023-11-14"#), "{line}");
        assert!(line.contains(r"\u{202e}abc"), "{line}");
        // a bidi override alone (no space, no control character) is escaped too
        assert_eq!(field("a\u{202e}b"), r#""a\u{202e}b""#);
        assert_eq!(field(r#"say "hi""#), r#""say \"hi\"""#);
        assert_eq!(field("plain"), "plain");
    }

    #[test]
    fn session_table() {
        let s = SessionInfo {
            session: psm_control_api::LiveSession {
                session_id: "s1".into(),
                user: "alice".into(),
                source: "10.0.0.9:5000".into(),
                target: "web01".into(),
                target_address: "10.0.0.1:22".into(),
                account: "root".into(),
                recording_id: "r1".into(),
                recorded: true,
                start_ms: 1_700_000_000_000,
                justification: None,
                worker: None,
            },
            relay: "r-1".into(),
            bytes_up: 10,
            bytes_down: 20,
            protocol: Default::default(),
        };
        let mut out = Vec::new();
        print_sessions(&mut out, &[s], false, 1_700_000_065_000).expect("print");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("SESSION  USER   ACCOUNT"), "{text}");
        assert!(text.contains("root@web01"), "{text}");
        assert!(text.contains("1m05s"), "{text}");
    }

    /// Runs psmctl against `dir` on a blocking thread; returns (ok, stdout or error message).
    async fn psmctl(dir: &Path, args: &[&str], stdin: &str) -> Result<String, String> {
        let mut full = vec!["--data-dir".to_string(), dir.display().to_string()];
        full.extend(args.iter().map(|a| a.to_string()));
        let stdin = stdin.to_string();
        tokio::task::spawn_blocking(move || {
            let cli = Cli::try_parse_from(std::iter::once("psmctl".to_string()).chain(full))
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            run(cli, &mut io::Cursor::new(stdin.into_bytes()), &mut out)
                .map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        })
        .await
        .expect("blocking task")
    }

    #[tokio::test]
    async fn end_to_end_against_the_daemon() {
        use crate::testkeys::{ENCRYPTED_PRIV, USER_PRIV, USER_PUB};
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(crate::daemon::run_until(dir.clone(), async move {
            let _ = stopped.await;
        }));
        for _ in 0..200 {
            if dir.join("control.sock").exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let files = tmp.path();
        fs::write(files.join("alice.pub"), format!("# alice\n{USER_PUB}\n")).expect("pub");
        fs::write(files.join("bad.pub"), "ssh-ed25519 nope\n").expect("bad");
        fs::write(files.join("id"), USER_PRIV).expect("id");
        fs::write(files.join("id_enc"), ENCRYPTED_PRIV).expect("id_enc");
        let f = |name: &str| files.join(name).display().to_string();

        let out = psmctl(
            &dir,
            &[
                "user",
                "add",
                "alice",
                "--password-stdin",
                "--ssh-key",
                &f("alice.pub"),
            ],
            "twelve chars\n",
        )
        .await
        .expect("user add");
        assert!(
            out.starts_with("added user alice (password, 1 ssh key)"),
            "{out}"
        );
        // the daemon holds the minimum: 11 characters are refused, for user add and passwd
        let e = psmctl(
            &dir,
            &["user", "add", "carol", "--password-stdin"],
            "eleven char\n",
        )
        .await
        .expect_err("short password");
        assert_eq!(
            e,
            "password is too short: psm requires at least 12 characters"
        );
        let e = psmctl(
            &dir,
            &["user", "passwd", "alice", "--password-stdin"],
            "eleven char\n",
        )
        .await
        .expect_err("short password");
        assert_eq!(
            e,
            "password is too short: psm requires at least 12 characters"
        );
        let out = psmctl(
            &dir,
            &["user", "passwd", "alice", "--password-stdin"],
            "a new password\n",
        )
        .await
        .expect("passwd");
        assert!(
            out.starts_with("changed the password of user alice (policy version"),
            "{out}"
        );
        let e = psmctl(
            &dir,
            &["user", "passwd", "dave", "--password-stdin"],
            "a new password\n",
        )
        .await
        .expect_err("unknown user");
        assert_eq!(e, "unknown user 'dave'");
        let e = psmctl(
            &dir,
            &["user", "add", "bob", "--ssh-key", &f("bad.pub")],
            "",
        )
        .await
        .expect_err("bad key");
        assert!(
            e.contains("bad.pub: line 1: not an OpenSSH public key"),
            "{e}"
        );
        psmctl(
            &dir,
            &[
                "target",
                "add",
                "web01",
                "--address",
                "127.0.0.1:22",
                "--host-key",
                USER_PUB,
            ],
            "",
        )
        .await
        .expect("target add");
        psmctl(
            &dir,
            &["account", "add", "root@web01", "--password-stdin"],
            "hunter2\n",
        )
        .await
        .expect("account add");
        psmctl(
            &dir,
            &["account", "add", "deploy@web01", "--private-key", &f("id")],
            "",
        )
        .await
        .expect("key account");
        let e = psmctl(
            &dir,
            &["account", "add", "x@web01", "--private-key", &f("id_enc")],
            "",
        )
        .await
        .expect_err("encrypted");
        assert!(e.contains("encrypted"), "{e}");
        // a public key given for a private key is named as one
        let e = psmctl(
            &dir,
            &[
                "account",
                "add",
                "x@web01",
                "--private-key",
                &f("alice.pub"),
            ],
            "",
        )
        .await
        .expect_err("public key");
        assert!(
            e.contains("alice.pub: this is a public key, not a private key"),
            "{e}"
        );
        // an existing name is refused before any scan: nothing listens on port 1
        let e = psmctl(
            &dir,
            &[
                "target",
                "add",
                "web01",
                "--address",
                "127.0.0.1:1",
                "--scan",
            ],
            "",
        )
        .await
        .expect_err("exists");
        assert_eq!(e, "target 'web01' already exists");
        let e = psmctl(&dir, &["target", "update", "db01", "--scan"], "")
            .await
            .expect_err("unknown");
        assert_eq!(e, "unknown target 'db01'");
        let e = psmctl(
            &dir,
            &["account", "add", "root@db01", "--password-stdin"],
            "x\n",
        )
        .await
        .expect_err("unknown target");
        assert_eq!(e, "unknown target 'db01'");
        psmctl(&dir, &["grant", "add", "alice", "root@web01"], "")
            .await
            .expect("grant");
        let e = psmctl(&dir, &["grant", "add", "bob", "root@web01"], "")
            .await
            .expect_err("unknown user");
        assert_eq!(e, "unknown user 'bob'");

        let accounts = psmctl(&dir, &["account", "list"], "").await.expect("list");
        assert_eq!(
            accounts,
            "TARGET  USERNAME  CREDENTIAL\nweb01   deploy    private_key\nweb01   root      password\n"
        );
        let json = psmctl(&dir, &["account", "list", "--json"], "")
            .await
            .expect("json");
        assert!(!json.contains("hunter2") && !json.contains("PRIVATE KEY"));
        let v: serde_json::Value = serde_json::from_str(&json).expect("json array");
        assert_eq!(v.as_array().map(|a| a.len()), Some(2));
        let targets = psmctl(&dir, &["target", "list"], "")
            .await
            .expect("targets");
        assert!(targets.contains("ssh-ed25519 SHA256:"), "{targets}");
        let grants = psmctl(&dir, &["grant", "list", "--json"], "")
            .await
            .expect("grants");
        let v: serde_json::Value = serde_json::from_str(&grants).expect("json");
        assert_eq!(v[0]["user"], "alice");
        let users = psmctl(&dir, &["user", "list"], "").await.expect("users");
        assert!(users.contains("alice  yes"), "{users}");
        let sessions = psmctl(&dir, &["sessions", "list", "--json"], "")
            .await
            .expect("sessions");
        assert_eq!(sessions.trim(), "[]");

        let tail = psmctl(&dir, &["audit", "tail", "-n", "2"], "")
            .await
            .expect("tail");
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 2, "{tail}");
        let uid = nix::unistd::geteuid().as_raw();
        assert!(
            lines[1].contains("#6  control  admin_change  action=\"grant add\""),
            "{tail}"
        );
        assert!(lines[1].ends_with(&format!("actor_uid={uid}")), "{tail}");
        let tail = psmctl(&dir, &["audit", "tail", "--json"], "")
            .await
            .expect("tail");
        let v: serde_json::Value = serde_json::from_str(&tail).expect("json");
        assert_eq!(v.as_array().map(|a| a.len()), Some(6));
        assert_eq!(v[1]["action"], "user passwd");
        assert_eq!(v[1]["actor_uid"], uid);
        assert!(!tail.contains("hunter2") && !tail.contains("new password"));

        // target update keeps the accounts; the audit names old and new
        let out = psmctl(
            &dir,
            &[
                "target",
                "update",
                "web01",
                "--address",
                "127.0.0.1:2222",
                "--host-key",
                crate::testkeys::OTHER_PUB,
            ],
            "",
        )
        .await
        .expect("update");
        assert!(
            out.starts_with(
                "updated target web01 (address 127.0.0.1:2222, host key ssh-ed25519 SHA256:"
            ),
            "{out}"
        );
        let targets = psmctl(&dir, &["target", "list", "--json"], "")
            .await
            .expect("targets");
        let v: serde_json::Value = serde_json::from_str(&targets).expect("json");
        assert_eq!(v[0]["address"], "127.0.0.1:2222");
        assert_eq!(v[0]["host_key"], crate::testkeys::OTHER_PUB);
        let accounts = psmctl(&dir, &["account", "list"], "").await.expect("list");
        assert_eq!(accounts.lines().count(), 3, "{accounts}");
        let tail = psmctl(&dir, &["audit", "tail", "-n", "1", "--json"], "")
            .await
            .expect("tail");
        let v: serde_json::Value = serde_json::from_str(&tail).expect("json");
        let object = v[0]["object"].as_str().unwrap_or_default();
        assert!(
            object.starts_with(
                "web01 (address 127.0.0.1:22 -> 127.0.0.1:2222, host key ssh-ed25519 SHA256:"
            ),
            "{object}"
        );

        let out = psmctl(&dir, &["grant", "remove", "alice", "root@web01"], "")
            .await
            .expect("revoke");
        assert!(
            out.starts_with("removed grant alice -> root@web01"),
            "{out}"
        );
        let out = psmctl(&dir, &["target", "remove", "web01"], "")
            .await
            .expect("target remove");
        assert!(
            out.starts_with("removed target web01 (and 2 accounts)"),
            "{out}"
        );
        let list = psmctl(&dir, &["recordings", "list", "--json"], "")
            .await
            .expect("recs");
        assert_eq!(list.trim(), "[]");

        let _ = stop.send(());
        daemon.await.expect("join").expect("daemon");
        let e = psmctl(&dir, &["user", "list"], "")
            .await
            .expect_err("stopped");
        assert!(e.starts_with("psm-control is not running"), "{e}");
    }
}
