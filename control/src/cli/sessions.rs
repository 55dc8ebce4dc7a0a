//! `psmctl sessions …`: list the live sessions, watch one, end one.

use std::io::Write;
use std::path::Path;

use super::{change, check_data_dir_owner, human_bytes, print_json, CliError, SessionsCmd};
use crate::client::Client;
use crate::protocol::{Request, SessionInfo};
use crate::recordings;
use crate::table::write_table;
use crate::timefmt;

/// Runs one `psmctl sessions …` command.
pub(super) fn sessions(
    data_dir: &Path,
    cmd: SessionsCmd,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        SessionsCmd::List(f) => {
            let list: Vec<SessionInfo> =
                Client::connect(data_dir)?.call_as(&Request::SessionsList)?;
            print_sessions(out, &list, f.json, psm_control_api::now_ms())
        }
        SessionsCmd::Watch { id } => {
            check_data_dir_owner(data_dir)?;
            let live = |dir: &Path, id: &str| -> Result<Option<SessionInfo>, CliError> {
                let list: Vec<SessionInfo> =
                    Client::connect(dir)?.call_as(&Request::SessionsList)?;
                Ok(list.into_iter().find(|s| s.session.session_id == id))
            };
            let Some(s) = live(data_dir, &id)? else {
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
            let dir = data_dir.to_path_buf();
            let sid = id.clone();
            recordings::watch(
                data_dir,
                &s.session.recording_id,
                move || live(&dir, &sid).map(|s| s.is_some()).unwrap_or(false),
                out,
            )?;
            Ok(())
        }
        SessionsCmd::Kill { id, reason } => change(
            out,
            &mut Client::connect(data_dir)?,
            &Request::SessionKill {
                session_id: id,
                reason,
            },
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
