//! psmctl's governance commands: grant conditions, groups and target groups, user state and
//! MFA enrolment, live kill, and the auditor's questions (`policy check`, `who-can-reach`).

use std::io::Write;
use std::path::Path;

use clap::{Args, Subcommand};
use psm_control_api::conditions::{
    parse_cidr, parse_duration, parse_forward_to, parse_time, ApprovalRule,
};
use psm_control_api::{ChannelKind, CommandAction, CommandRule, Conditions, RuleScope, TimeWindow};

use crate::cli::{print_json, CliError, JsonFlag};
use crate::client::Client;
use crate::protocol::{Changed, MfaEnrolment, PolicyAnswer, Reach, Request};
use crate::store::GroupInfo;
use crate::table::write_table;
use crate::validate::{self, Invalid};

/// The conditions flags of `grant add`.
#[derive(Debug, Default, Args)]
pub struct ConditionFlags {
    /// Days of a time window (`mon-fri`, `sat,sun`, `all`); with --hours and --tz. Repeat the
    /// three for several windows.
    #[arg(long, value_name = "DAYS")]
    pub days: Vec<String>,
    /// Hours of a time window, `HH:MM-HH:MM` (past midnight when the end is before the start).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    pub hours: Vec<String>,
    /// Time zone of the windows (IANA name; default UTC).
    #[arg(long, value_name = "ZONE")]
    pub tz: Vec<String>,
    /// The grant is valid from this time (RFC 3339 or a date).
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// The grant expires at this time (RFC 3339 or a date).
    #[arg(long, value_name = "TIME")]
    pub expires: Option<String>,
    /// A source network the user may connect from (repeat for more).
    #[arg(long = "from", value_name = "CIDR")]
    pub from: Vec<String>,
    /// Longest a session may last (`2h`).
    #[arg(long, value_name = "DURATION")]
    pub max_duration: Option<String>,
    /// End a session after this long without input from the user (`15m`).
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Channel kinds allowed, comma separated (shell, exec, sftp, scp, forward-local,
    /// forward-remote, agent; default shell,exec,sftp,scp).
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// A destination local forwards may reach, HOST:PORT (globs allowed; repeat for more).
    #[arg(long = "forward-to", value_name = "HOST:PORT")]
    pub forward_to: Vec<String>,
    /// The user must give a reason before the session starts.
    #[arg(long)]
    pub reason_required: bool,
    /// Allow a `tcp` target's payload to pass through unrecorded (required for `tcp` targets).
    #[arg(long)]
    pub unrecorded_tcp: bool,
    /// Relay this grant's SSH and RDP sessions without recording them (audited as
    /// `recorded: false`; psm-recorder being down does not refuse them).
    #[arg(long)]
    pub unrecorded: bool,
    /// Require the TOTP second factor.
    #[arg(long)]
    pub mfa: bool,
    /// Accept an MFA success by the same user from the same address within this long (`8h`).
    #[arg(long, value_name = "DURATION")]
    pub mfa_cache: Option<String>,
    /// Approvals needed before a session starts (dual control); with --approvers.
    #[arg(long, value_name = "N")]
    pub approval: Option<u32>,
    /// The group whose members may approve (`@secops`).
    #[arg(long, value_name = "@GROUP")]
    pub approvers: Option<String>,
    /// How long a request waits for approval (default 10m).
    #[arg(long, value_name = "DURATION")]
    pub approval_timeout: Option<String>,
    /// How long an approval also covers later sessions of the same user to the same account
    /// (default: this session only).
    #[arg(long, value_name = "DURATION")]
    pub approval_covers: Option<String>,
    /// What happens to a command no command rule matches: allow (default) or deny (an
    /// allow-list grant).
    #[arg(long, value_name = "allow|deny")]
    pub commands_default: Option<String>,
    /// RDP: which way the clipboard may carry data (default none). SSH sessions ignore the
    /// RDP flags, and RDP sessions the SSH-only ones (--allow, --forward-to, --allow-env,
    /// command rules).
    #[arg(
        long,
        value_name = "none|to-target|from-target|both",
        help_heading = "RDP"
    )]
    pub clipboard: Option<psm_control_api::ClipboardRule>,
    /// RDP: allow drive redirection.
    #[arg(long, help_heading = "RDP")]
    pub drive: bool,
    /// RDP: allow printer redirection.
    #[arg(long, help_heading = "RDP")]
    pub printer: bool,
    /// RDP: allow smart-card redirection.
    #[arg(long, help_heading = "RDP")]
    pub smartcard: bool,
    /// RDP: no audio (sound output and microphone); audio is allowed by default.
    #[arg(long, help_heading = "RDP")]
    pub no_audio: bool,
    /// RDP: allow another static or dynamic virtual channel by name (repeat for more).
    #[arg(long = "rdp-channel", value_name = "NAME", help_heading = "RDP")]
    pub rdp_channel: Vec<String>,
}

fn usage(e: String) -> CliError {
    CliError::Usage(e)
}

impl ConditionFlags {
    /// The conditions these flags set, validated (a condition the relay could not evaluate is
    /// refused here).
    pub fn conditions(&self, allow_env: Vec<String>) -> Result<Conditions, CliError> {
        let mut c = Conditions {
            allow_env,
            ..Conditions::default()
        };
        if self.hours.len() != self.days.len() && !(self.days.is_empty() || self.hours.is_empty()) {
            return Err(usage(
                "give --days and --hours the same number of times".into(),
            ));
        }
        let n = self.days.len().max(self.hours.len());
        for i in 0..n {
            let days = self.days.get(i).map(String::as_str).unwrap_or("all");
            let hours = self
                .hours
                .get(i)
                .map(String::as_str)
                .unwrap_or("00:00-24:00");
            let tz = self
                .tz
                .get(i)
                .or(self.tz.last())
                .map(String::as_str)
                .unwrap_or("UTC");
            c.windows
                .push(TimeWindow::parse(days, hours, tz).map_err(usage)?);
        }
        if n == 0 && !self.tz.is_empty() {
            return Err(usage("--tz needs --days and/or --hours".into()));
        }
        c.not_before_ms = self
            .not_before
            .as_deref()
            .map(parse_time)
            .transpose()
            .map_err(|e| usage(format!("--not-before: {e}")))?;
        c.expires_ms = self
            .expires
            .as_deref()
            .map(parse_time)
            .transpose()
            .map_err(|e| usage(format!("--expires: {e}")))?;
        for f in &self.from {
            c.from.push(parse_cidr(f).map_err(usage)?);
        }
        let dur = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| usage(format!("{flag}: {e}")))
        };
        c.max_duration_ms = dur("--max-duration", &self.max_duration)?;
        c.idle_timeout_ms = dur("--idle-timeout", &self.idle_timeout)?;
        c.mfa_cache_ms = dur("--mfa-cache", &self.mfa_cache)?;
        if !self.allow.is_empty() {
            let mut kinds = Vec::new();
            for k in &self.allow {
                let k = ChannelKind::parse(k.trim()).map_err(|e| usage(format!("--allow: {e}")))?;
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
            c.allow = Some(kinds);
        }
        for f in &self.forward_to {
            c.forward_to.push(parse_forward_to(f).map_err(usage)?);
        }
        c.reason_required = self.reason_required;
        c.unrecorded_tcp = self.unrecorded_tcp;
        c.unrecorded = self.unrecorded;
        c.command_default = match self.commands_default.as_deref() {
            None => None,
            Some("allow") => Some(CommandAction::Allow),
            Some("deny") => Some(CommandAction::Deny),
            Some(other) => {
                return Err(usage(format!(
                    "--commands-default '{other}': expected allow or deny"
                )))
            }
        };
        c.mfa = self.mfa || c.mfa_cache_ms.is_some();
        c.rdp = psm_control_api::RdpChannels {
            clipboard: self.clipboard.unwrap_or_default(),
            drive: self.drive,
            printer: self.printer,
            smartcard: self.smartcard,
            audio: !self.no_audio,
            channels: self.rdp_channel.clone(),
        };
        match (self.approval, &self.approvers) {
            (Some(count), Some(group)) => {
                let group = group.strip_prefix('@').unwrap_or(group).to_string();
                c.approval = Some(ApprovalRule {
                    count,
                    approvers: group,
                    timeout_ms: dur("--approval-timeout", &self.approval_timeout)?
                        .unwrap_or(10 * 60 * 1000),
                    covers_ms: dur("--approval-covers", &self.approval_covers)?.unwrap_or(0),
                });
            }
            (None, None) => {}
            _ => {
                return Err(usage(
                    "give --approval N together with --approvers @GROUP".into(),
                ))
            }
        }
        c.validate().map_err(usage)?;
        Ok(c)
    }
}

/// `USERNAME@TARGET` or `USERNAME@@TARGETGROUP`: the account and the target side of a grant.
pub fn split_grant_target(spec: &str) -> Result<(String, String), Invalid> {
    match spec.split_once("@@") {
        Some((account, group)) => {
            validate::account_name(account)?;
            validate::target_name(group)?;
            Ok((account.to_string(), format!("@{group}")))
        }
        None => validate::split_account(spec),
    }
}

/// `psmctl group …` and `psmctl target-group …`
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Add a group.
    Add {
        /// Group name (with or without the leading @).
        name: String,
    },
    /// Remove a group and the grants that name it.
    Remove {
        /// Group name.
        name: String,
    },
    /// List groups with their members.
    List(JsonFlag),
    /// Add or remove members.
    Member {
        /// Member command.
        #[command(subcommand)]
        cmd: MemberCmd,
    },
}

/// `psmctl group member …`
#[derive(Debug, Subcommand)]
pub enum MemberCmd {
    /// Add a member.
    Add {
        /// Group name.
        group: String,
        /// User name (target name for a target group).
        member: String,
    },
    /// Remove a member.
    Remove {
        /// Group name.
        group: String,
        /// User name (target name for a target group).
        member: String,
    },
}

fn bare(name: &str) -> String {
    name.strip_prefix('@').unwrap_or(name).to_string()
}

fn change(out: &mut dyn Write, data_dir: &Path, req: &Request) -> Result<(), CliError> {
    let c: Changed = Client::connect(data_dir)?.call_as(req)?;
    writeln!(out, "{} (policy version {})", c.message, c.version)?;
    Ok(())
}

/// Runs `group …` (`targets` false) or `target-group …` (true).
pub fn group(
    data_dir: &Path,
    cmd: GroupCmd,
    targets: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        GroupCmd::Add { name } => {
            let name = bare(&name);
            validate::target_name(&name)?;
            change(out, data_dir, &Request::GroupAdd { name, targets })
        }
        GroupCmd::Remove { name } => change(
            out,
            data_dir,
            &Request::GroupRemove {
                name: bare(&name),
                targets,
            },
        ),
        GroupCmd::List(f) => {
            let list: Vec<GroupInfo> =
                Client::connect(data_dir)?.call_as(&Request::GroupList { targets })?;
            if f.json {
                return print_json(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|g| vec![format!("@{}", g.name), g.members.join(", ")])
                .collect();
            write_table(out, &["GROUP", "MEMBERS"], &rows)?;
            Ok(())
        }
        GroupCmd::Member { cmd } => {
            let (group, member, add) = match cmd {
                MemberCmd::Add { group, member } => (group, member, true),
                MemberCmd::Remove { group, member } => (group, member, false),
            };
            change(
                out,
                data_dir,
                &Request::GroupMember {
                    group: bare(&group),
                    member,
                    add,
                    targets,
                },
            )
        }
    }
}

/// `psmctl user mfa …`
#[derive(Debug, Subcommand)]
pub enum MfaCmd {
    /// Enrol a user for TOTP: prints the otpauth:// URI and a QR code to scan.
    Enroll {
        /// User name.
        name: String,
        /// Print only the URI (no QR code).
        #[arg(long)]
        no_qr: bool,
    },
    /// Remove a user's TOTP enrolment.
    Reset {
        /// User name.
        name: String,
    },
}

/// Draws `text` as a QR code with Unicode half blocks (two rows per line).
pub fn qr(text: &str) -> Result<String, CliError> {
    let code = qrcode::QrCode::new(text.as_bytes())
        .map_err(|e| CliError::Usage(format!("cannot draw the QR code: {e}")))?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Runs `user mfa …`.
pub fn mfa(data_dir: &Path, cmd: MfaCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        MfaCmd::Enroll { name, no_qr } => {
            let e: MfaEnrolment = Client::connect(data_dir)?
                .call_as(&Request::UserMfaEnroll { name: name.clone() })?;
            writeln!(
                out,
                "enrolled {name} for TOTP (policy version {})",
                e.version
            )?;
            writeln!(out, "{}", e.uri)?;
            if !no_qr {
                writeln!(out, "{}", qr(&e.uri)?)?;
            }
            writeln!(
                out,
                "scan it with an authenticator app; it is not shown again (psmctl user mfa reset {name} to start over)"
            )?;
            Ok(())
        }
        MfaCmd::Reset { name } => change(out, data_dir, &Request::UserMfaReset { name }),
    }
}

/// Runs `user disable|enable|unlock`.
pub fn user_state(data_dir: &Path, req: Request, out: &mut dyn Write) -> Result<(), CliError> {
    change(out, data_dir, &req)
}

/// `psmctl command-rule …`
#[derive(Debug, Subcommand)]
pub enum CommandRuleCmd {
    /// Add a rule at the end of the order (first match wins).
    Add {
        /// Attach it to the grant of USER (or @GROUP) on USERNAME@TARGET (or
        /// USERNAME@@TARGETGROUP).
        #[arg(long, num_args = 2, value_names = ["USER", "ACCOUNT"], conflicts_with = "group", required_unless_present = "group")]
        grant: Option<Vec<String>>,
        /// Attach it to every session of a group's members.
        #[arg(long, value_name = "@GROUP")]
        group: Option<String>,
        /// Regular expression searched in the command line (`^rm\s+-rf`).
        #[arg(long)]
        pattern: String,
        /// allow, deny, terminate or alert.
        #[arg(long)]
        action: String,
    },
    /// Remove a rule.
    Remove {
        /// Rule id (from `command-rule list`).
        id: u64,
    },
    /// List rules in order.
    List(JsonFlag),
}

/// Runs `command-rule …`.
pub fn command_rule(
    data_dir: &Path,
    cmd: CommandRuleCmd,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        CommandRuleCmd::Add {
            grant,
            group,
            pattern,
            action,
        } => {
            let action = CommandAction::parse(&action).map_err(usage)?;
            psm_control_api::commands::validate_pattern(&pattern).map_err(usage)?;
            let scope = match (grant, group) {
                (Some(g), None) => {
                    let (account, target) = split_grant_target(&g[1])?;
                    RuleScope::Grant {
                        user: g[0].clone(),
                        target,
                        account,
                    }
                }
                (None, Some(group)) => RuleScope::Group {
                    group: bare(&group),
                },
                _ => {
                    return Err(usage(
                        "give --grant USER ACCOUNT@TARGET or --group @GROUP".into(),
                    ))
                }
            };
            change(
                out,
                data_dir,
                &Request::CommandRuleAdd {
                    scope,
                    pattern,
                    action,
                },
            )
        }
        CommandRuleCmd::Remove { id } => change(out, data_dir, &Request::CommandRuleRemove { id }),
        CommandRuleCmd::List(f) => {
            let list: Vec<CommandRule> =
                Client::connect(data_dir)?.call_as(&Request::CommandRuleList)?;
            if f.json {
                return print_json(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.scope.to_string(),
                        r.action.to_string(),
                        psm_control_api::escape(&r.pattern),
                    ]
                })
                .collect();
            write_table(out, &["ID", "ATTACHED TO", "ACTION", "PATTERN"], &rows)?;
            Ok(())
        }
    }
}

/// `psmctl requests …`
#[derive(Debug, Subcommand)]
pub enum RequestsCmd {
    /// List access requests: pending ones and recent decisions.
    List(JsonFlag),
}

/// One line per request, as `psmctl requests list` and `ssh approver@gateway requests list`
/// print them.
pub fn request_rows(list: &[psm_control_api::ApprovalRequest]) -> Vec<Vec<String>> {
    use psm_control_api::ApprovalState;
    list.iter()
        .map(|r| {
            let state = match &r.state {
                ApprovalState::Pending { approvals } => {
                    format!("pending ({} of {})", approvals.len(), r.needed)
                }
                ApprovalState::Approved { by } => format!("approved by {}", by.join(", ")),
                ApprovalState::Denied { by, reason } => {
                    format!("denied by {by}: {}", psm_control_api::escape(reason))
                }
                ApprovalState::Expired => "expired".into(),
            };
            vec![
                r.id.to_string(),
                r.user.clone(),
                format!("{}@{}", r.account, r.target),
                r.source.clone(),
                format!("@{}", r.approvers),
                state,
                r.justification
                    .as_deref()
                    .map(psm_control_api::escape)
                    .unwrap_or_default(),
            ]
        })
        .collect()
}

/// The header of [`request_rows`].
pub const REQUEST_HEADER: [&str; 7] = [
    "ID",
    "USER",
    "ACCOUNT",
    "SOURCE",
    "APPROVERS",
    "STATE",
    "REASON",
];

/// Runs `requests …`.
pub fn requests(data_dir: &Path, cmd: RequestsCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        RequestsCmd::List(f) => {
            let list: Vec<psm_control_api::ApprovalRequest> =
                Client::connect(data_dir)?.call_as(&Request::RequestsList)?;
            if f.json {
                return print_json(out, &list);
            }
            write_table(out, &REQUEST_HEADER, &request_rows(&list))?;
            Ok(())
        }
    }
}

/// `psmctl policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Would USER be allowed USERNAME@TARGET (exit 0) or not (exit 1), and why.
    Check {
        /// psm user.
        user: String,
        /// USERNAME@TARGET.
        account: String,
        /// Source address (default 127.0.0.1).
        #[arg(long, value_name = "ADDR")]
        from: Option<String>,
        /// When (RFC 3339; default now).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the whole policy (users, groups, targets, target groups, accounts without
    /// secrets, grants with conditions, command rules) as one TOML document.
    Export,
    /// Apply a policy document atomically: a bad document changes nothing and names the line
    /// and the problem.
    Import {
        /// The TOML document (`-` for standard input).
        file: std::path::PathBuf,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply even a document that would leave no grant or no user.
        #[arg(long)]
        force: bool,
    },
    /// Every user who can reach USERNAME@TARGET, through which grant, with its conditions.
    WhoCanReach {
        /// USERNAME@TARGET.
        account: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `policy …`; returns whether a `check` allowed (the exit status).
pub fn policy(data_dir: &Path, cmd: PolicyCmd, out: &mut dyn Write) -> Result<bool, CliError> {
    match cmd {
        PolicyCmd::Check {
            user,
            account,
            from,
            at,
            json,
        } => {
            let (account, target) = validate::split_account(&account)?;
            let at_ms = at
                .as_deref()
                .map(parse_time)
                .transpose()
                .map_err(|e| usage(format!("--at: {e}")))?;
            let a: PolicyAnswer = Client::connect(data_dir)?.call_as(&Request::PolicyCheck {
                user: user.clone(),
                account: account.clone(),
                target: target.clone(),
                from,
                at_ms,
            })?;
            if json {
                print_json(out, &a)?;
            } else if a.allowed {
                writeln!(
                    out,
                    "allowed: {user} -> {account}@{target} by grant {} ({})",
                    a.grant.as_deref().unwrap_or("?"),
                    a.via.as_deref().unwrap_or("?")
                )?;
                for c in &a.conditions {
                    writeln!(out, "  {c}")?;
                }
            } else {
                writeln!(
                    out,
                    "denied: {} ({})",
                    a.reason.as_deref().unwrap_or("?"),
                    a.code.as_deref().unwrap_or("?")
                )?;
            }
            Ok(a.allowed)
        }
        PolicyCmd::Export => {
            let doc: crate::store::PolicyDoc =
                Client::connect(data_dir)?.call_as(&Request::PolicyExport)?;
            let text = toml::to_string(&doc)
                .map_err(|e| usage(format!("cannot write the policy as TOML: {e}")))?;
            writeln!(
                out,
                "# psm policy (psmctl policy export); secrets are not in it"
            )?;
            out.write_all(text.as_bytes())?;
            Ok(true)
        }
        PolicyCmd::Import {
            file,
            dry_run,
            force,
        } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| CliError::Stdin(format!("cannot read the policy: {e}")))?;
                s
            } else {
                std::fs::read_to_string(&file).map_err(|e| CliError::File {
                    path: file.clone(),
                    reason: e.to_string(),
                })?
            };
            let doc: crate::store::PolicyDoc =
                toml::from_str(&text).map_err(|e| CliError::File {
                    path: file.clone(),
                    reason: e.to_string(),
                })?;
            if let Some(bad) = unknown_condition_key(&text) {
                return Err(CliError::File {
                    path: file.clone(),
                    reason: format!("{bad}: unknown key"),
                });
            }
            let r: crate::store::ImportReport =
                Client::connect(data_dir)?.call_as(&Request::PolicyImport {
                    doc,
                    dry_run,
                    force,
                })?;
            for c in &r.changes {
                writeln!(out, "{c}")?;
            }
            match (r.applied, r.changes.is_empty(), dry_run) {
                (_, true, _) => writeln!(out, "no change (policy version {})", r.version)?,
                (false, false, true) => writeln!(
                    out,
                    "dry run: {} change(s) not applied (policy version {})",
                    r.changes.len(),
                    r.version
                )?,
                _ => writeln!(
                    out,
                    "imported {} change(s) (policy version {})",
                    r.changes.len(),
                    r.version
                )?,
            }
            Ok(true)
        }
        PolicyCmd::WhoCanReach { account, json } => {
            let (account, target) = validate::split_account(&account)?;
            let list: Vec<Reach> =
                Client::connect(data_dir)?.call_as(&Request::WhoCanReach { account, target })?;
            if json {
                print_json(out, &list)?;
                return Ok(true);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|r| {
                    vec![
                        r.user.clone(),
                        r.grant.clone(),
                        r.via.clone(),
                        r.conditions.join("; "),
                        r.blocked.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            write_table(
                out,
                &["USER", "GRANT", "VIA", "CONDITIONS", "BLOCKED"],
                &rows,
            )?;
            Ok(true)
        }
    }
}

/// The first key of a grant's conditions (or of their windows and approval) that psm does not
/// know, as `grants[I].conditions.KEY`: serde ignores unknown keys there (the snapshot must stay
/// readable across versions), but a misspelt condition in a document must not pass unnoticed.
fn unknown_condition_key(text: &str) -> Option<String> {
    let full = Conditions {
        allow_env: vec!["X".into()],
        windows: vec![TimeWindow::parse("mon", "08:00-09:00", "UTC").ok()?],
        not_before_ms: Some(1),
        expires_ms: Some(2),
        from: vec![parse_cidr("10.0.0.0/8").ok()?],
        max_duration_ms: Some(1),
        idle_timeout_ms: Some(1),
        allow: Some(vec![ChannelKind::Shell]),
        forward_to: vec!["h:1".into()],
        reason_required: true,
        unrecorded_tcp: true,
        unrecorded: true,
        mfa: true,
        mfa_cache_ms: Some(1),
        approval: Some(ApprovalRule {
            count: 1,
            approvers: "g".into(),
            timeout_ms: 1,
            covers_ms: 1,
        }),
        command_default: Some(CommandAction::Deny),
        rdp: psm_control_api::RdpChannels {
            clipboard: psm_control_api::ClipboardRule::Both,
            drive: true,
            printer: true,
            smartcard: true,
            audio: false,
            channels: vec!["x".into()],
        },
    };
    let known = toml::Value::try_from(&full).ok()?;
    let doc: toml::Value = toml::from_str(text).ok()?;
    let keys = |v: &toml::Value| -> Vec<String> {
        v.as_table()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    };
    for (i, g) in doc.get("grants")?.as_array()?.iter().enumerate() {
        let Some(c) = g.get("conditions") else {
            continue;
        };
        for k in keys(c) {
            let Some(kv) = known.get(&k) else {
                return Some(format!("grants[{i}].conditions.{k}"));
            };
            let sub = |name: &str, v: &toml::Value| -> Option<String> {
                let model = match kv {
                    toml::Value::Array(a) => a.first()?.clone(),
                    other => other.clone(),
                };
                let items: Vec<&toml::Value> = match v {
                    toml::Value::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                for item in items {
                    if !item.is_table() {
                        continue;
                    }
                    for sk in keys(item) {
                        if model.get(&sk).is_none() {
                            return Some(format!("grants[{i}].conditions.{name}.{sk}"));
                        }
                    }
                }
                None
            };
            if let Some(bad) = c.get(&k).and_then(|v| sub(&k, v)) {
                return Some(bad);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_validated_conditions() {
        let f = ConditionFlags {
            days: vec!["mon-fri".into()],
            hours: vec!["08:00-18:00".into()],
            tz: vec!["Europe/Paris".into()],
            from: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            max_duration: Some("2h".into()),
            idle_timeout: Some("15m".into()),
            allow: vec!["shell".into(), "forward-local".into()],
            forward_to: vec!["db*:5432".into()],
            mfa_cache: Some("8h".into()),
            ..ConditionFlags::default()
        };
        let c = f.conditions(vec![]).expect("valid");
        assert_eq!(c.windows.len(), 1);
        assert_eq!(c.from.len(), 2);
        assert_eq!(c.max_duration_ms, Some(7_200_000));
        assert!(c.mfa, "a cache implies mfa");
        assert!(c.forward_allowed("db1", 5432) && !c.allows(ChannelKind::Exec));
        for (bad, needle) in [
            (
                ConditionFlags {
                    tz: vec!["Nowhere/City".into()],
                    days: vec!["mon".into()],
                    ..ConditionFlags::default()
                },
                "unknown time zone",
            ),
            (
                ConditionFlags {
                    forward_to: vec!["db:5432".into()],
                    ..ConditionFlags::default()
                },
                "needs --allow forward-local",
            ),
            (
                ConditionFlags {
                    approval: Some(2),
                    ..ConditionFlags::default()
                },
                "--approvers",
            ),
            (
                ConditionFlags {
                    not_before: Some("2027-01-02".into()),
                    expires: Some("2027-01-01".into()),
                    ..ConditionFlags::default()
                },
                "is not before",
            ),
            (
                ConditionFlags {
                    allow: vec!["x11".into()],
                    ..ConditionFlags::default()
                },
                "unknown channel kind",
            ),
        ] {
            let e = bad.conditions(vec![]).expect_err(needle).to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert_eq!(
            split_grant_target("root@@prod").expect("group"),
            ("root".to_string(), "@prod".to_string())
        );
        assert_eq!(
            split_grant_target("root@web01").expect("target"),
            ("root".to_string(), "web01".to_string())
        );
        assert!(qr("otpauth://totp/psm:alice?secret=AAAA&issuer=psm")
            .is_ok_and(|q| q.lines().count() > 10));
    }
}
