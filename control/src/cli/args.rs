//! The command line: clap's definition of every psmctl command and its arguments (the group,
//! command-rule, request, MFA and policy commands' own are in [`crate::cli_policy`], the RDP
//! file's in [`crate::cli_rdp`]).

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::cli_policy::{CommandRuleCmd, ConditionFlags, GroupCmd, MfaCmd, PolicyCmd, RequestsCmd};
use crate::recordings::{self, ExportFormat};

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

#[cfg(test)]
pub(super) mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Parses psmctl's arguments (without the program name).
    pub(in crate::cli) fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
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
}
