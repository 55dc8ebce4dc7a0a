//! What a sink sends: one RFC 5424 syslog message per audit event, its MSG in JSON, CEF or
//! OCSF ([`Format`]), and the octet-counted framing of RFC 6587 / RFC 5425 for TCP and TLS.
//! docs/siem.md documents every field of the CEF and OCSF mappings.
//!
//! Pure functions of the event and the sink's settings: no I/O, no clock.

use psm_control_api::{AuditEvent, AuditKind};
use serde_json::{json, Map, Value};

use super::config::Format;

/// The OCSF schema version the OCSF format follows.
pub const OCSF_VERSION: &str = "1.3.0";
/// psm's version, in CEF's header and OCSF's `metadata.product.version`.
pub const PRODUCT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The syslog header fields that do not come from the event.
#[derive(Clone, Debug)]
pub struct Header {
    /// Facility number (0 to 23).
    pub facility: u8,
    /// HOSTNAME.
    pub hostname: String,
    /// APP-NAME.
    pub app_name: String,
    /// PROCID (psm-control's pid).
    pub procid: u32,
}

/// The event's `event` tag, as in `audit.jsonl` (`auth_success`, `session_end`, …); also the
/// syslog MSGID and CEF's Signature ID.
pub fn kind_name(kind: &AuditKind) -> &'static str {
    match kind {
        AuditKind::AuthSuccess { .. } => "auth_success",
        AuditKind::AuthFailure { .. } => "auth_failure",
        AuditKind::SessionDenied { .. } => "session_denied",
        AuditKind::SessionStart { .. } => "session_start",
        AuditKind::SessionEnd { .. } => "session_end",
        AuditKind::ChannelRequest { .. } => "channel_request",
        AuditKind::Command { .. } => "command",
        AuditKind::Approval { .. } => "approval",
        AuditKind::Forward { .. } => "forward",
        AuditKind::AdminChange { .. } => "admin_change",
        AuditKind::Notice { .. } => "notice",
    }
}

/// How grave an event is, on CEF's 0 to 10 scale; syslog severity and OCSF `severity_id` are
/// derived from it ([`syslog_severity`], [`ocsf_severity`]).
pub fn cef_severity(kind: &AuditKind) -> u8 {
    match kind {
        AuditKind::AuthSuccess { .. } | AuditKind::SessionStart { .. } => 3,
        AuditKind::SessionEnd { .. } | AuditKind::Forward { .. } => 3,
        AuditKind::AuthFailure { .. } | AuditKind::SessionDenied { .. } => 6,
        AuditKind::ChannelRequest { accepted, .. } => {
            if *accepted {
                3
            } else {
                6
            }
        }
        AuditKind::Command { decision, .. } => match decision.as_str() {
            "allow" => 3,
            "alert" => 7,
            "deny" => 8,
            _ => 9, // terminate, or anything new: the graver
        },
        AuditKind::Approval { action, .. } => match action.as_str() {
            "deny" | "denied" | "expired" => 5,
            _ => 3,
        },
        AuditKind::AdminChange { .. } | AuditKind::Notice { .. } => 5,
    }
}

/// RFC 5424 severity: 6 informational, 5 notice, 4 warning, 3 error, 2 critical.
pub fn syslog_severity(cef: u8) -> u8 {
    match cef {
        0..=3 => 6,
        4..=5 => 5,
        6..=7 => 4,
        8 => 3,
        _ => 2,
    }
}

/// OCSF `severity_id`: 1 Informational, 2 Low, 3 Medium, 4 High, 5 Critical.
pub fn ocsf_severity(cef: u8) -> (u8, &'static str) {
    match cef {
        0..=3 => (1, "Informational"),
        4..=5 => (2, "Low"),
        6..=7 => (3, "Medium"),
        8 => (4, "High"),
        _ => (5, "Critical"),
    }
}

/// `ms` since the epoch as an RFC 5424 TIMESTAMP (UTC, milliseconds).
pub fn timestamp(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| "-".to_string())
}

/// The whole RFC 5424 message for `event`: header, no structured data, the formatted MSG.
pub fn syslog_message(header: &Header, format: Format, event: &AuditEvent) -> Vec<u8> {
    let cef = cef_severity(&event.kind);
    let pri = u32::from(header.facility) * 8 + u32::from(syslog_severity(cef));
    let mut out = format!(
        "<{pri}>1 {} {} {} {} {} - ",
        timestamp(event.ts_ms),
        header.hostname,
        header.app_name,
        header.procid,
        kind_name(&event.kind)
    )
    .into_bytes();
    let msg = match format {
        Format::Json => serde_json::to_string(event).unwrap_or_else(|_| "{}".into()),
        Format::Cef => cef_line(&header.hostname, event),
        Format::Ocsf => ocsf(&header.hostname, event).to_string(),
    };
    out.extend_from_slice(msg.as_bytes());
    out
}

/// RFC 6587 octet counting (and RFC 5425's framing): `LEN SP MSG`.
pub fn octet_counted(msg: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg);
    out
}

/// `ip:port` (or `[v6]:port`) split; the whole string as the address when there is no port.
fn split_addr(s: &str) -> (String, Option<u16>) {
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => match p.parse::<u16>() {
            Ok(port) => (
                h.strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(h)
                    .to_string(),
                Some(port),
            ),
            Err(_) => (s.to_string(), None),
        },
        _ => (s.to_string(), None),
    }
}

// ---------------------------------------------------------------------------------------------
// CEF

/// A CEF header field: `\` and `|` escaped.
fn cef_header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

/// A CEF extension value: first shown as psm shows peer strings (controls and bidi characters
/// as `\n`, `\u{1b}`, a backslash doubled), then `\` and `=` escaped as CEF wants.
fn cef_value(s: &str) -> String {
    psm_control_api::escape(s)
        .replace('\\', "\\\\")
        .replace('=', "\\=")
}

/// CEF's Name for an event.
fn cef_name(kind: &AuditKind) -> String {
    match kind {
        AuditKind::AuthSuccess { .. } => "authentication succeeded".into(),
        AuditKind::AuthFailure { .. } => "authentication failed".into(),
        AuditKind::SessionDenied { .. } => "session denied".into(),
        AuditKind::SessionStart { .. } => "session started".into(),
        AuditKind::SessionEnd { .. } => "session ended".into(),
        AuditKind::ChannelRequest { accepted, .. } => if *accepted {
            "channel request accepted"
        } else {
            "channel request refused"
        }
        .into(),
        AuditKind::Command { decision, .. } => match decision.as_str() {
            "allow" => "command allowed",
            "alert" => "command alert",
            "deny" => "command denied",
            "terminate" => "command terminated the session",
            _ => "command",
        }
        .into(),
        AuditKind::Approval { .. } => "access request".into(),
        AuditKind::Forward { .. } => "port forward closed".into(),
        AuditKind::AdminChange { .. } => "administrative change".into(),
        AuditKind::Notice { .. } => "notice".into(),
    }
}

/// The CEF line for `event` (docs/siem.md, "CEF").
pub fn cef_line(hostname: &str, event: &AuditEvent) -> String {
    let mut ext: Vec<(&str, String)> = vec![
        ("rt", event.ts_ms.to_string()),
        ("externalId", event.seq.to_string()),
        ("dvchost", hostname.to_string()),
        ("deviceProcessName", event.origin.clone()),
    ];
    let src = |ext: &mut Vec<(&str, String)>, source: &str| {
        let (ip, port) = split_addr(source);
        ext.push(("src", ip));
        if let Some(p) = port {
            ext.push(("spt", p.to_string()));
        }
    };
    let session = |ext: &mut Vec<(&str, String)>, id: &str| {
        ext.push(("cs1Label", "sessionId".into()));
        ext.push(("cs1", id.to_string()));
    };
    match &event.kind {
        AuditKind::AuthSuccess {
            login,
            user,
            method,
            source,
        } => {
            ext.push(("suser", user.clone()));
            src(&mut ext, source);
            ext.push(("outcome", "success".into()));
            ext.push(("cs4Label", "method".into()));
            ext.push(("cs4", method.clone()));
            ext.push(("cs5Label", "login".into()));
            ext.push(("cs5", login.clone()));
        }
        AuditKind::AuthFailure {
            login,
            method,
            source,
            reason,
        } => {
            ext.push((
                "suser",
                psm_control_api::Login::user_part(login).to_string(),
            ));
            src(&mut ext, source);
            ext.push(("outcome", "failure".into()));
            ext.push(("reason", reason.clone()));
            ext.push(("cs4Label", "method".into()));
            ext.push(("cs4", method.clone()));
            ext.push(("cs5Label", "login".into()));
            ext.push(("cs5", login.clone()));
        }
        AuditKind::SessionDenied {
            login,
            user,
            source,
            reason,
            client_message,
        } => {
            ext.push(("suser", user.clone()));
            src(&mut ext, source);
            ext.push(("outcome", "failure".into()));
            ext.push(("reason", reason.clone()));
            ext.push(("msg", client_message.clone()));
            ext.push(("cs5Label", "login".into()));
            ext.push(("cs5", login.clone()));
        }
        AuditKind::SessionStart {
            session_id,
            user,
            source,
            target,
            target_address,
            account,
            recording_id,
            start_ms,
            justification,
            worker: _,
        } => {
            ext.push(("suser", user.clone()));
            src(&mut ext, source);
            ext.push(("duser", account.clone()));
            ext.push(("dhost", target.clone()));
            let (ip, port) = split_addr(target_address);
            if ip.parse::<std::net::IpAddr>().is_ok() {
                ext.push(("dst", ip));
            }
            if let Some(p) = port {
                ext.push(("dpt", p.to_string()));
            }
            ext.push(("app", "ssh".into()));
            ext.push(("start", start_ms.to_string()));
            session(&mut ext, session_id);
            ext.push(("cs2Label", "recordingId".into()));
            ext.push(("cs2", recording_id.clone()));
            if let Some(j) = justification {
                ext.push(("cs3Label", "justification".into()));
                ext.push(("cs3", j.clone()));
            }
        }
        AuditKind::SessionEnd {
            session_id,
            user,
            source,
            target,
            account,
            start_ms,
            end_ms,
            duration_ms,
            bytes_up,
            bytes_down,
            exit_status,
            exit_signal,
            recording_id,
            reason,
            reason_code,
            side,
            justification,
        } => {
            ext.push(("suser", user.clone()));
            src(&mut ext, source);
            ext.push(("duser", account.clone()));
            ext.push(("dhost", target.clone()));
            ext.push(("app", "ssh".into()));
            ext.push(("start", start_ms.to_string()));
            ext.push(("end", end_ms.to_string()));
            ext.push(("in", bytes_up.to_string()));
            ext.push(("out", bytes_down.to_string()));
            ext.push(("reason", reason.clone()));
            session(&mut ext, session_id);
            ext.push(("cs2Label", "recordingId".into()));
            ext.push(("cs2", recording_id.clone()));
            if let Some(j) = justification {
                ext.push(("cs3Label", "justification".into()));
                ext.push(("cs3", j.clone()));
            }
            ext.push(("cs4Label", "reasonCode".into()));
            ext.push(("cs4", reason_code.clone()));
            ext.push(("cs6Label", "side".into()));
            ext.push(("cs6", side.clone()));
            ext.push(("cn1Label", "durationMs".into()));
            ext.push(("cn1", duration_ms.to_string()));
            if let Some(s) = exit_status {
                ext.push(("cn3Label", "exitStatus".into()));
                ext.push(("cn3", s.to_string()));
            }
            if let Some(s) = exit_signal {
                ext.push(("cs5Label", "exitSignal".into()));
                ext.push(("cs5", s.clone()));
            }
        }
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
            ext.push(("suser", user.clone()));
            ext.push(("duser", account.clone()));
            ext.push(("dhost", target.clone()));
            ext.push(("act", request.clone()));
            ext.push((
                "outcome",
                if *accepted { "success" } else { "failure" }.into(),
            ));
            session(&mut ext, session_id);
            if !command.is_empty() {
                ext.push(("cs5Label", "command".into()));
                ext.push(("cs5", command.clone()));
            }
            ext.push(("cn2Label", "channel".into()));
            ext.push(("cn2", channel.to_string()));
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
            ext.push(("suser", user.clone()));
            ext.push(("duser", account.clone()));
            ext.push(("dhost", target.clone()));
            ext.push(("act", decision.clone()));
            session(&mut ext, session_id);
            ext.push(("cs4Label", "commandSource".into()));
            ext.push(("cs4", source.clone()));
            ext.push(("cs5Label", "command".into()));
            ext.push(("cs5", line.clone()));
            if let Some(r) = rule {
                ext.push(("cn1Label", "ruleId".into()));
                ext.push(("cn1", r.to_string()));
            }
            ext.push(("cn2Label", "channel".into()));
            ext.push(("cn2", channel.to_string()));
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
            ext.push(("suser", user.clone()));
            ext.push(("duser", account.clone()));
            ext.push(("dhost", target.clone()));
            ext.push(("act", action.clone()));
            if let Some(by) = by {
                ext.push(("cs6Label", "by".into()));
                ext.push(("cs6", by.clone()));
            }
            if let Some(r) = reason {
                ext.push(("reason", r.clone()));
            }
            ext.push(("cn1Label", "requestId".into()));
            ext.push(("cn1", request.to_string()));
        }
        AuditKind::Forward {
            session_id,
            user,
            target,
            account,
            channel,
            kind,
            destination,
            bytes_up,
            bytes_down,
            duration_ms,
        } => {
            ext.push(("suser", user.clone()));
            ext.push(("duser", account.clone()));
            ext.push(("dhost", target.clone()));
            ext.push(("in", bytes_up.to_string()));
            ext.push(("out", bytes_down.to_string()));
            session(&mut ext, session_id);
            ext.push(("cs5Label", "destination".into()));
            ext.push(("cs5", destination.clone()));
            ext.push(("cs6Label", "forwardKind".into()));
            ext.push(("cs6", kind.clone()));
            ext.push(("cn1Label", "durationMs".into()));
            ext.push(("cn1", duration_ms.to_string()));
            ext.push(("cn2Label", "channel".into()));
            ext.push(("cn2", channel.to_string()));
        }
        AuditKind::AdminChange {
            action,
            object,
            actor_uid,
            actor,
        } => {
            if let Some(a) = actor {
                ext.push(("suser", a.clone()));
            }
            if let Some(uid) = actor_uid {
                ext.push(("suid", uid.to_string()));
            }
            ext.push(("act", action.clone()));
            ext.push(("cs5Label", "object".into()));
            ext.push(("cs5", object.clone()));
        }
        AuditKind::Notice {
            message,
            session_id,
            kind,
            count,
        } => {
            ext.push(("msg", message.clone()));
            if let Some(id) = session_id {
                session(&mut ext, id);
            }
            if let Some(k) = kind {
                ext.push(("cs4Label", "noticeKind".into()));
                ext.push(("cs4", k.clone()));
            }
            if let Some(c) = count {
                ext.push(("cnt", c.to_string()));
            }
        }
    }
    let ext: Vec<String> = ext
        .iter()
        .map(|(k, v)| format!("{k}={}", cef_value(v)))
        .collect();
    format!(
        "CEF:0|psm|psm|{}|{}|{}|{}|{}",
        cef_header(PRODUCT_VERSION),
        kind_name(&event.kind),
        cef_header(&cef_name(&event.kind)),
        cef_severity(&event.kind),
        ext.join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// OCSF

/// An OCSF network endpoint from `ip:port`.
fn endpoint(addr: &str) -> Value {
    let (ip, port) = split_addr(addr);
    let mut m = Map::new();
    if ip.parse::<std::net::IpAddr>().is_ok() {
        m.insert("ip".into(), ip.into());
    } else {
        m.insert("hostname".into(), ip.into());
    }
    if let Some(p) = port {
        m.insert("port".into(), p.into());
    }
    Value::Object(m)
}

fn user(name: &str) -> Value {
    json!({ "name": name })
}

/// class_uid, class_name, category_uid, category_name.
const AUTHENTICATION: (u32, &str, u32, &str) =
    (3002, "Authentication", 3, "Identity & Access Management");
const ENTITY_MANAGEMENT: (u32, &str, u32, &str) =
    (3004, "Entity Management", 3, "Identity & Access Management");
const NETWORK_ACTIVITY: (u32, &str, u32, &str) = (4001, "Network Activity", 4, "Network Activity");
const SSH_ACTIVITY: (u32, &str, u32, &str) = (4007, "SSH Activity", 4, "Network Activity");
const PROCESS_ACTIVITY: (u32, &str, u32, &str) = (1007, "Process Activity", 1, "System Activity");
const BASE_EVENT: (u32, &str, u32, &str) = (0, "Base Event", 0, "Uncategorized");

/// The OCSF object for `event` (docs/siem.md, "OCSF").
pub fn ocsf(hostname: &str, event: &AuditEvent) -> Value {
    let mut unmapped = Map::new();
    unmapped.insert("origin".into(), event.origin.clone().into());
    let mut fields = Map::new();
    let mut status: Option<bool> = None;
    let mut message: Option<String> = None;
    let service = json!({ "name": "psm", "uid": hostname });
    let (class, activity_id, activity_name): ((u32, &str, u32, &str), u32, String) =
        match &event.kind {
            AuditKind::AuthSuccess {
                login,
                user: u,
                method,
                source,
            } => {
                fields.insert("user".into(), user(u));
                fields.insert("src_endpoint".into(), endpoint(source));
                fields.insert("dst_endpoint".into(), json!({ "hostname": hostname }));
                fields.insert("service".into(), service);
                fields.insert("auth_protocol_id".into(), 99.into());
                fields.insert("auth_protocol".into(), format!("ssh {method}").into());
                fields.insert("is_mfa".into(), method.contains("+totp").into());
                fields.insert("is_remote".into(), true.into());
                unmapped.insert("login".into(), login.clone().into());
                status = Some(true);
                (AUTHENTICATION, 1, "Logon".into())
            }
            AuditKind::AuthFailure {
                login,
                method,
                source,
                reason,
            } => {
                fields.insert(
                    "user".into(),
                    user(psm_control_api::Login::user_part(login)),
                );
                fields.insert("src_endpoint".into(), endpoint(source));
                fields.insert("dst_endpoint".into(), json!({ "hostname": hostname }));
                fields.insert("service".into(), service);
                fields.insert("auth_protocol_id".into(), 99.into());
                fields.insert("auth_protocol".into(), format!("ssh {method}").into());
                fields.insert("is_mfa".into(), method.contains("totp").into());
                fields.insert("is_remote".into(), true.into());
                fields.insert("status_detail".into(), reason.clone().into());
                unmapped.insert("login".into(), login.clone().into());
                status = Some(false);
                (AUTHENTICATION, 1, "Logon".into())
            }
            AuditKind::SessionDenied {
                login,
                user: u,
                source,
                reason,
                client_message,
            } => {
                fields.insert("actor".into(), json!({ "user": user(u) }));
                fields.insert("src_endpoint".into(), endpoint(source));
                fields.insert("dst_endpoint".into(), json!({ "hostname": hostname }));
                fields.insert("status_detail".into(), reason.clone().into());
                unmapped.insert("login".into(), login.clone().into());
                message = Some(client_message.clone());
                status = Some(false);
                (SSH_ACTIVITY, 5, "Refuse".into())
            }
            AuditKind::SessionStart {
                session_id,
                user: u,
                source,
                target,
                target_address,
                account,
                recording_id,
                start_ms,
                justification,
                worker,
            } => {
                fields.insert(
                    "actor".into(),
                    json!({ "user": user(u), "session": { "uid": session_id } }),
                );
                fields.insert("src_endpoint".into(), endpoint(source));
                let mut dst = endpoint(target_address);
                if let Value::Object(m) = &mut dst {
                    m.insert("name".into(), target.clone().into());
                }
                fields.insert("dst_endpoint".into(), dst);
                fields.insert("start_time".into(), (*start_ms).into());
                unmapped.insert("account".into(), account.clone().into());
                unmapped.insert("recording_id".into(), recording_id.clone().into());
                if let Some(j) = justification {
                    unmapped.insert("justification".into(), j.clone().into());
                }
                if let Some(w) = worker {
                    unmapped.insert("worker".into(), (*w).into());
                }
                status = Some(true);
                (SSH_ACTIVITY, 1, "Open".into())
            }
            AuditKind::SessionEnd {
                session_id,
                user: u,
                source,
                target,
                account,
                start_ms,
                end_ms,
                duration_ms,
                bytes_up,
                bytes_down,
                exit_status,
                exit_signal,
                recording_id,
                reason,
                reason_code,
                side,
                justification,
            } => {
                fields.insert(
                    "actor".into(),
                    json!({ "user": user(u), "session": { "uid": session_id } }),
                );
                fields.insert("src_endpoint".into(), endpoint(source));
                fields.insert("dst_endpoint".into(), json!({ "name": target }));
                fields.insert("start_time".into(), (*start_ms).into());
                fields.insert("end_time".into(), (*end_ms).into());
                fields.insert("duration".into(), (*duration_ms).into());
                fields.insert(
                    "traffic".into(),
                    json!({
                        "bytes_in": bytes_up,
                        "bytes_out": bytes_down,
                        "bytes": bytes_up.saturating_add(*bytes_down),
                    }),
                );
                fields.insert("status_detail".into(), reason.clone().into());
                unmapped.insert("account".into(), account.clone().into());
                unmapped.insert("recording_id".into(), recording_id.clone().into());
                unmapped.insert("reason_code".into(), reason_code.clone().into());
                unmapped.insert("side".into(), side.clone().into());
                if let Some(s) = exit_status {
                    unmapped.insert("exit_status".into(), (*s).into());
                }
                if let Some(s) = exit_signal {
                    unmapped.insert("exit_signal".into(), s.clone().into());
                }
                if let Some(j) = justification {
                    unmapped.insert("justification".into(), j.clone().into());
                }
                (SSH_ACTIVITY, 2, "Close".into())
            }
            AuditKind::ChannelRequest {
                session_id,
                user: u,
                target,
                account,
                channel,
                request,
                command,
                accepted,
            } => {
                fields.insert(
                    "actor".into(),
                    json!({ "user": user(u), "session": { "uid": session_id } }),
                );
                fields.insert("dst_endpoint".into(), json!({ "name": target }));
                unmapped.insert("account".into(), account.clone().into());
                unmapped.insert("channel".into(), (*channel).into());
                unmapped.insert("request".into(), request.clone().into());
                if !command.is_empty() {
                    unmapped.insert("command".into(), command.clone().into());
                }
                status = Some(*accepted);
                (SSH_ACTIVITY, 99, format!("Channel Request: {request}"))
            }
            AuditKind::Command {
                session_id,
                user: u,
                target,
                account,
                channel,
                line,
                decision,
                rule,
                source,
            } => {
                let allowed = matches!(decision.as_str(), "allow" | "alert");
                fields.insert(
                    "actor".into(),
                    json!({ "user": user(u), "session": { "uid": session_id } }),
                );
                fields.insert(
                    "process".into(),
                    json!({ "cmd_line": line, "user": user(account) }),
                );
                fields.insert(
                    "device".into(),
                    json!({ "hostname": target, "type_id": 1, "type": "Server" }),
                );
                fields.insert("action_id".into(), if allowed { 1 } else { 2 }.into());
                fields.insert(
                    "action".into(),
                    if allowed { "Allowed" } else { "Denied" }.into(),
                );
                fields.insert("disposition_id".into(), if allowed { 1 } else { 2 }.into());
                fields.insert(
                    "disposition".into(),
                    if allowed { "Allowed" } else { "Blocked" }.into(),
                );
                unmapped.insert("decision".into(), decision.clone().into());
                if let Some(r) = rule {
                    unmapped.insert("rule".into(), (*r).into());
                }
                unmapped.insert("source".into(), source.clone().into());
                unmapped.insert("channel".into(), (*channel).into());
                status = Some(allowed);
                (PROCESS_ACTIVITY, 1, "Launch".into())
            }
            AuditKind::Forward {
                session_id,
                user: u,
                target,
                account,
                channel,
                kind,
                destination,
                bytes_up,
                bytes_down,
                duration_ms,
            } => {
                fields.insert(
                    "actor".into(),
                    json!({ "user": user(u), "session": { "uid": session_id } }),
                );
                fields.insert("src_endpoint".into(), json!({ "name": target }));
                fields.insert("dst_endpoint".into(), endpoint(destination));
                fields.insert("duration".into(), (*duration_ms).into());
                fields.insert(
                    "traffic".into(),
                    json!({
                        "bytes_in": bytes_up,
                        "bytes_out": bytes_down,
                        "bytes": bytes_up.saturating_add(*bytes_down),
                    }),
                );
                unmapped.insert("account".into(), account.clone().into());
                unmapped.insert("channel".into(), (*channel).into());
                unmapped.insert("forward_kind".into(), kind.clone().into());
                (NETWORK_ACTIVITY, 2, "Close".into())
            }
            AuditKind::AdminChange {
                action,
                object,
                actor_uid,
                actor,
            } => {
                let mut u = Map::new();
                if let Some(a) = actor {
                    u.insert("name".into(), a.clone().into());
                }
                if let Some(uid) = actor_uid {
                    u.insert("uid".into(), uid.to_string().into());
                }
                fields.insert("actor".into(), json!({ "user": Value::Object(u) }));
                let entity_type = action.split(' ').next().unwrap_or(action);
                fields.insert(
                    "entity".into(),
                    json!({ "name": object, "type": entity_type }),
                );
                unmapped.insert("action".into(), action.clone().into());
                let (id, name) = match action.rsplit(' ').next() {
                    Some("add") => (1, "Create"),
                    Some("remove") => (4, "Delete"),
                    _ => (3, "Update"),
                };
                status = Some(true);
                (ENTITY_MANAGEMENT, id, name.into())
            }
            AuditKind::Approval {
                request,
                action,
                user: u,
                account,
                target,
                by,
                reason,
            } => {
                fields.insert("actor".into(), json!({ "user": user(u) }));
                unmapped.insert("request".into(), (*request).into());
                unmapped.insert("action".into(), action.clone().into());
                unmapped.insert("account".into(), account.clone().into());
                unmapped.insert("target".into(), target.clone().into());
                if let Some(b) = by {
                    unmapped.insert("by".into(), b.clone().into());
                }
                if let Some(r) = reason {
                    unmapped.insert("reason".into(), r.clone().into());
                }
                message = Some(format!("access request {request}: {action}"));
                (BASE_EVENT, 99, format!("Access Request: {action}"))
            }
            AuditKind::Notice {
                message: m,
                session_id,
                kind,
                count,
            } => {
                if let Some(id) = session_id {
                    unmapped.insert("session_id".into(), id.clone().into());
                }
                if let Some(k) = kind {
                    unmapped.insert("kind".into(), k.clone().into());
                }
                if let Some(c) = count {
                    fields.insert("count".into(), (*c).into());
                }
                message = Some(m.clone());
                (BASE_EVENT, 99, "Notice".into())
            }
        };
    let (class_uid, class_name, category_uid, category_name) = class;
    let (severity_id, severity) = ocsf_severity(cef_severity(&event.kind));
    let mut out = Map::new();
    out.insert("class_uid".into(), class_uid.into());
    out.insert("class_name".into(), class_name.into());
    out.insert("category_uid".into(), category_uid.into());
    out.insert("category_name".into(), category_name.into());
    out.insert("activity_id".into(), activity_id.into());
    out.insert("activity_name".into(), activity_name.clone().into());
    out.insert(
        "type_uid".into(),
        (u64::from(class_uid) * 100 + u64::from(activity_id)).into(),
    );
    out.insert(
        "type_name".into(),
        format!("{class_name}: {activity_name}").into(),
    );
    out.insert("time".into(), event.ts_ms.into());
    out.insert("severity_id".into(), severity_id.into());
    out.insert("severity".into(), severity.into());
    if let Some(ok) = status {
        out.insert("status_id".into(), if ok { 1 } else { 2 }.into());
        out.insert(
            "status".into(),
            if ok { "Success" } else { "Failure" }.into(),
        );
    }
    out.insert(
        "message".into(),
        message.unwrap_or_else(|| cef_name(&event.kind)).into(),
    );
    out.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": { "name": "psm", "vendor_name": "psm", "version": PRODUCT_VERSION },
            "uid": event.seq.to_string(),
            "sequence": event.seq,
            "log_name": "audit",
            "event_code": kind_name(&event.kind),
        }),
    );
    out.extend(fields);
    out.insert("unmapped".into(), Value::Object(unmapped));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: AuditKind) -> AuditEvent {
        AuditEvent {
            seq: 42,
            ts_ms: 1_796_304_000_123,
            origin: "relay-h:1".into(),
            kind,
        }
    }

    fn header() -> Header {
        Header {
            facility: 10,
            hostname: "gw1".into(),
            app_name: "psm".into(),
            procid: 77,
        }
    }

    fn command(decision: &str, line: &str) -> AuditEvent {
        ev(AuditKind::Command {
            session_id: "s1".into(),
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            channel: 0,
            line: line.into(),
            decision: decision.into(),
            rule: Some(3),
            source: "shell".into(),
        })
    }

    #[test]
    fn syslog_header_and_framing() {
        let e = command("deny", "rm -rf /");
        let m = syslog_message(&header(), Format::Json, &e);
        let text = String::from_utf8(m.clone()).expect("utf8");
        // authpriv (10) * 8 + error (3)
        assert!(
            text.starts_with("<83>1 2026-12-03T13:20:00.123Z gw1 psm 77 command - {"),
            "{text}"
        );
        let json: Value =
            serde_json::from_str(&text[text.find('{').expect("json")..]).expect("json");
        assert_eq!(json["seq"], 42);
        assert_eq!(json["event"], "command");
        let framed = octet_counted(&m);
        assert!(framed.starts_with(format!("{} <83>1 ", m.len()).as_bytes()));
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn cef_escapes_and_maps() {
        let line = cef_line("gw1", &command("deny", "echo a=b|c \\ \n\u{1b}[31m"));
        assert!(
            line.starts_with("CEF:0|psm|psm|0.1.0|command|command denied|8|rt=1796304000123 externalId=42 dvchost=gw1 deviceProcessName=relay-h:1 suser=alice duser=root dhost=web01 act=deny cs1Label=sessionId cs1=s1 "),
            "{line}"
        );
        assert!(
            line.contains("cs5=echo a\\=b|c \\\\\\\\ \\\\n\\\\u{1b}[31m cn1Label=ruleId cn1=3"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let end = cef_line(
            "gw1",
            &ev(AuditKind::AuthFailure {
                login: "bob@root@web01".into(),
                method: "password".into(),
                source: "[::1]:5022".into(),
                reason: "wrong password".into(),
            }),
        );
        assert!(
            end.contains("|auth_failure|authentication failed|6|"),
            "{end}"
        );
        assert!(
            end.contains(" suser=bob src=::1 spt=5022 outcome=failure reason=wrong password "),
            "{end}"
        );
    }

    #[test]
    fn ocsf_classes() {
        let auth = ocsf(
            "gw1",
            &ev(AuditKind::AuthSuccess {
                login: "alice@root@web01".into(),
                user: "alice".into(),
                method: "publickey+totp".into(),
                source: "10.0.0.9:40000".into(),
            }),
        );
        assert_eq!(auth["class_uid"], 3002);
        assert_eq!(auth["type_uid"], 300201);
        assert_eq!(auth["status_id"], 1);
        assert_eq!(auth["is_mfa"], true);
        assert_eq!(auth["src_endpoint"]["ip"], "10.0.0.9");
        assert_eq!(auth["src_endpoint"]["port"], 40000);
        assert_eq!(auth["user"]["name"], "alice");
        assert_eq!(auth["metadata"]["uid"], "42");
        assert_eq!(auth["metadata"]["version"], OCSF_VERSION);

        let cmd = ocsf("gw1", &command("terminate", "reboot"));
        assert_eq!(cmd["class_uid"], 1007);
        assert_eq!(cmd["type_uid"], 100701);
        assert_eq!(cmd["process"]["cmd_line"], "reboot");
        assert_eq!(cmd["action_id"], 2);
        assert_eq!(cmd["device"]["hostname"], "web01");
        assert_eq!(cmd["severity_id"], 5);

        let end = ocsf(
            "gw1",
            &ev(AuditKind::SessionEnd {
                session_id: "s1".into(),
                user: "alice".into(),
                source: "127.0.0.1:1".into(),
                target: "web01".into(),
                account: "root".into(),
                start_ms: 1,
                end_ms: 5,
                duration_ms: 4,
                bytes_up: 10,
                bytes_down: 20,
                exit_status: Some(0),
                exit_signal: None,
                recording_id: "r".into(),
                reason: "client closed the session".into(),
                reason_code: "client_closed".into(),
                side: "client".into(),
                justification: None,
            }),
        );
        assert_eq!(end["class_uid"], 4007);
        assert_eq!(end["activity_id"], 2);
        assert_eq!(end["traffic"]["bytes"], 30);
        assert_eq!(end["unmapped"]["exit_status"], 0);

        let admin = ocsf(
            "gw1",
            &ev(AuditKind::AdminChange {
                action: "user add".into(),
                object: "bob".into(),
                actor_uid: Some(0),
                actor: Some("root".into()),
            }),
        );
        assert_eq!(admin["class_uid"], 3004);
        assert_eq!(admin["activity_id"], 1);
        assert_eq!(admin["entity"]["type"], "user");
        assert_eq!(admin["actor"]["user"]["name"], "root");
    }
}
