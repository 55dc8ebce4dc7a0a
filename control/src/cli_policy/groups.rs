//! `psmctl group …` and `psmctl target-group …`: groups of users and of targets, and their
//! members.

use std::io::Write;
use std::path::Path;

use clap::Subcommand;

use super::{bare, change};
use crate::cli::{print_json, CliError, JsonFlag};
use crate::client::Client;
use crate::protocol::Request;
use crate::store::GroupInfo;
use crate::table::write_table;
use crate::validate;

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
