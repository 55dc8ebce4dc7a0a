//! `psmctl status`: whether psm-control runs, its relays, recording space and SIEM sinks.

use std::io::Write;
use std::path::Path;

use super::{field, human_bytes, print_json, CliError, StatusArgs};
use crate::client::Client;
use crate::protocol::{Request, StatusInfo};

/// Runs `psmctl status`.
pub(super) fn status(data_dir: &Path, f: StatusArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let s: StatusInfo = Client::connect(data_dir)?.call_as(&Request::Status)?;
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
