//! `psmctl policy …`: the auditor's questions (`check`, `who-can-reach`) and the policy as one
//! TOML document (`export`, `import`, which refuses an unknown condition key).

use std::io::Write;
use std::path::Path;

use clap::Subcommand;
use psm_control_api::conditions::{parse_cidr, parse_time, ApprovalRule};
use psm_control_api::{ChannelKind, CommandAction, Conditions, TimeWindow};

use super::usage;
use crate::cli::{print_json, CliError};
use crate::client::Client;
use crate::protocol::{PolicyAnswer, Reach, Request};
use crate::table::write_table;
use crate::validate;

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
