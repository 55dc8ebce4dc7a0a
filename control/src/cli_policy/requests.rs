//! `psmctl requests …`: the access requests of dual control (approvals).

use std::io::Write;
use std::path::Path;

use clap::Subcommand;

use crate::cli::{print_json, CliError, JsonFlag};
use crate::client::Client;
use crate::protocol::Request;
use crate::table::write_table;

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
