//! `psmctl command-rule …`: the command rules attached to a grant or a group.

use std::io::Write;
use std::path::Path;

use clap::Subcommand;
use psm_control_api::{CommandAction, CommandRule, RuleScope};

use super::{bare, change, split_grant_target, usage};
use crate::cli::{print_json, CliError, JsonFlag};
use crate::client::Client;
use crate::protocol::Request;
use crate::table::write_table;

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
