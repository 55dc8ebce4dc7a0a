//! psmctl's governance commands: grant conditions, groups and target groups, user state and
//! MFA enrolment, live kill, and the auditor's questions (`policy check`, `who-can-reach`).

mod commands;
mod conditions;
mod groups;
mod policy;
mod requests;
mod users;

use std::io::Write;
use std::path::Path;

use crate::cli::CliError;
use crate::client::Client;
use crate::protocol::{Changed, Request};

pub use commands::{command_rule, CommandRuleCmd};
pub use conditions::{split_grant_target, ConditionFlags};
pub use groups::{group, GroupCmd, MemberCmd};
pub use policy::{policy, PolicyCmd};
pub use requests::{request_rows, requests, RequestsCmd, REQUEST_HEADER};
pub use users::{mfa, qr, user_state, MfaCmd};

fn usage(e: String) -> CliError {
    CliError::Usage(e)
}

fn bare(name: &str) -> String {
    name.strip_prefix('@').unwrap_or(name).to_string()
}

fn change(out: &mut dyn Write, data_dir: &Path, req: &Request) -> Result<(), CliError> {
    let c: Changed = Client::connect(data_dir)?.call_as(req)?;
    writeln!(out, "{} (policy version {})", c.message, c.version)?;
    Ok(())
}
