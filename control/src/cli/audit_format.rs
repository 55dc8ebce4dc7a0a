//! [`format_event`]: an audit event as one human-readable line (`psmctl audit tail`).

use psm_control_api::{AuditEvent, AuditKind};

use super::field;
use crate::timefmt;

/// One human-readable line for an audit event: time, seq, origin, event, key fields.
pub fn format_event(e: &AuditEvent) -> String {
    let (name, fields): (&str, Vec<(&str, String)>) = match &e.kind {
        AuditKind::AuthSuccess {
            login,
            user,
            method,
            source,
            protocol,
            ..
        } => {
            let mut f = vec![
                ("user", user.clone()),
                ("login", login.clone()),
                ("method", method.clone()),
                ("source", source.clone()),
            ];
            push_protocol(&mut f, protocol);
            ("auth_success", f)
        }
        AuditKind::AuthFailure {
            login,
            method,
            source,
            reason,
            side,
            protocol,
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
            push_protocol(&mut f, protocol);
            ("auth_failure", f)
        }
        AuditKind::SessionDenied {
            login,
            user,
            source,
            reason,
            reason_code,
            side,
            protocol,
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
            push_protocol(&mut f, protocol);
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
            protocol,
            ..
        } => {
            let mut f = vec![
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
            ];
            push_protocol(&mut f, protocol);
            ("session_start", f)
        }
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
            protocol,
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
            push_protocol(&mut f, protocol);
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
            source,
            bytes_up,
            bytes_down,
            duration_ms,
        } => ("forward", {
            let mut f = vec![
                ("session", session_id.clone()),
                ("user", user.clone()),
                ("account", format!("{account}@{target}")),
                ("channel", channel.to_string()),
                ("kind", kind.clone()),
                ("to", destination.clone()),
            ];
            if let Some(s) = source {
                f.push(("from", s.clone()));
            }
            f.extend([
                ("up", bytes_up.to_string()),
                ("down", bytes_down.to_string()),
                ("duration_ms", duration_ms.to_string()),
            ]);
            f
        }),
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

/// Names the protocol of a login or session line unless it is SSH (most lines; a line written
/// before the field existed reads as SSH).
fn push_protocol(f: &mut Vec<(&str, String)>, protocol: &psm_control_api::Protocol) {
    if !protocol.is_ssh() {
        f.push(("protocol", protocol.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recordings;

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
                protocol: psm_control_api::Protocol::Ssh,
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

    /// Every login and session line of an RDP session names its protocol; an SSH one's lines
    /// (most, and those written before the field existed) do not.
    #[test]
    fn login_and_session_lines_name_a_protocol_other_than_ssh() {
        use psm_control_api::Protocol;
        let kinds = |protocol: Protocol| {
            vec![
                AuditKind::AuthSuccess {
                    protocol,
                    login: "alice@Administrator@win1".into(),
                    user: "alice".into(),
                    method: "nla".into(),
                    source: "127.0.0.1:5000".into(),
                },
                AuditKind::AuthFailure {
                    protocol,
                    login: "alice@Administrator@win1".into(),
                    method: "nla".into(),
                    source: "127.0.0.1:5000".into(),
                    reason: "wrong password".into(),
                    side: String::new(),
                },
                AuditKind::SessionDenied {
                    protocol,
                    login: "alice@Administrator@win1".into(),
                    user: "alice".into(),
                    source: "127.0.0.1:5000".into(),
                    reason: "no grant".into(),
                    reason_code: "no_grant".into(),
                    side: "policy".into(),
                    client_message: String::new(),
                },
                AuditKind::SessionStart {
                    protocol,
                    session_id: "s1".into(),
                    user: "alice".into(),
                    source: "127.0.0.1:5000".into(),
                    target: "win1".into(),
                    target_address: "127.0.0.1:3389".into(),
                    account: "Administrator".into(),
                    recording_id: "rec-1".into(),
                    start_ms: 1_700_000_000_000,
                    justification: None,
                    worker: None,
                    recorded: true,
                },
                AuditKind::SessionEnd {
                    protocol,
                    session_id: "s1".into(),
                    user: "alice".into(),
                    source: "127.0.0.1:5000".into(),
                    target: "win1".into(),
                    account: "Administrator".into(),
                    start_ms: 1_700_000_000_000,
                    end_ms: 1_700_000_000_150,
                    duration_ms: 150,
                    bytes_up: 10,
                    bytes_down: 20,
                    exit_status: None,
                    exit_signal: None,
                    recording_id: "rec-1".into(),
                    reason: "client closed".into(),
                    reason_code: "client_closed".into(),
                    side: "client".into(),
                    justification: None,
                    unconfirmed_bytes: None,
                },
            ]
        };
        let line = |kind| {
            format_event(&AuditEvent {
                seq: 1,
                ts_ms: 1_700_000_000_000,
                origin: "relay-r1".into(),
                kind,
            })
        };
        for kind in kinds(Protocol::Rdp) {
            let l = line(kind);
            assert!(
                l.ends_with("  protocol=rdp") || l.contains("  protocol=rdp  "),
                "{l}"
            );
        }
        for kind in kinds(Protocol::Ssh) {
            let l = line(kind);
            assert!(!l.contains("protocol="), "{l}");
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
        let forward = |source: Option<&str>| AuditEvent {
            kind: AuditKind::Forward {
                session_id: "s1".into(),
                user: "alice".into(),
                target: "db01".into(),
                account: "psm-tcp".into(),
                channel: 2,
                kind: "tcp".into(),
                destination: "10.1.2.3:5432 from 10.0.0.9:40001".into(),
                source: source.map(str::to_string),
                bytes_up: 1,
                bytes_down: 2,
                duration_ms: 3,
            },
            ..e.clone()
        };
        assert!(
            format_event(&forward(Some("10.0.0.9:40001")))
                .contains("  to=\"10.1.2.3:5432 from 10.0.0.9:40001\"  from=10.0.0.9:40001  up=1  down=2  duration_ms=3"),
            "{}",
            format_event(&forward(Some("10.0.0.9:40001")))
        );
        assert!(!format_event(&forward(None)).contains("from="));
    }

    #[test]
    fn client_chosen_strings_are_escaped_in_audit_lines() {
        let e = AuditEvent {
            seq: 8,
            ts_ms: 1_700_000_000_000,
            origin: "relay-r1".into(),
            kind: AuditKind::AuthFailure {
                protocol: psm_control_api::Protocol::Ssh,
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
}
