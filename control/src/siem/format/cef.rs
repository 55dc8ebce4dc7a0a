//! CEF: an audit event as one ArcSight Common Event Format line (docs/siem.md, "CEF").

use psm_control_api::AuditEvent;
use serde_json::Value;

use super::{protocol, severity, split_addr, Ev, PRODUCT_VERSION};

/// A CEF header field: first shown as psm shows peer strings (controls, a line break
/// included, and bidi characters escaped: the header ends at the line's end), then `\` and
/// `|` escaped as CEF wants.
fn cef_header(s: &str) -> String {
    psm_control_api::escape(s)
        .replace('\\', "\\\\")
        .replace('|', "\\|")
}

/// A CEF extension value: first shown as psm shows peer strings (controls and bidi characters
/// as `\n`, `\u{1b}`, a backslash doubled), then `\` and `=` escaped as CEF wants.
fn cef_value(s: &str) -> String {
    psm_control_api::escape(s)
        .replace('\\', "\\\\")
        .replace('=', "\\=")
}

/// CEF's Name for an event.
pub(super) fn cef_name(ev: &Ev) -> String {
    match ev.kind() {
        "auth_success" => "authentication succeeded".into(),
        "auth_failure" => "authentication failed".into(),
        "session_denied" => "session denied".into(),
        "session_start" => "session started".into(),
        "session_end" => "session ended".into(),
        "channel_request" if ev.b("accepted") => "channel request accepted".into(),
        "channel_request" => "channel request refused".into(),
        "rdp_channel" => "RDP channel refused".into(),
        "command" => match ev.s("decision") {
            "allow" => "command allowed".into(),
            "alert" => "command alert".into(),
            "deny" => "command denied".into(),
            "terminate" => "command terminated the session".into(),
            other => format!("command {other}"),
        },
        "command_end" => "command ended".into(),
        "file_transfer" => format!("file {}", ev.s("operation")),
        "approval" => "access request".into(),
        "forward" => "port forward closed".into(),
        "admin_change" => "administrative change".into(),
        "notice" => "notice".into(),
        other => other.replace('_', " "),
    }
}

/// The CEF line for `event` (docs/siem.md, "CEF").
pub fn cef_line(hostname: &str, event: &AuditEvent) -> String {
    cef_of(hostname, &Ev::new(event))
}

pub(super) fn cef_of(hostname: &str, ev: &Ev) -> String {
    let mut ext: Vec<(&str, String)> = vec![
        ("rt", ev.n("ts_ms").unwrap_or(0).to_string()),
        ("externalId", ev.n("seq").unwrap_or(0).to_string()),
        ("dvchost", hostname.to_string()),
        ("deviceProcessName", ev.s("origin").to_string()),
    ];
    let kind = ev.kind().to_string();
    let mut put = |k: &'static str, v: String| ext.push((k, v));
    let labeled = |put: &mut dyn FnMut(&'static str, String),
                   key: &'static str,
                   label: &'static str,
                   v: Option<String>| {
        if let Some(v) = v {
            let label_key: &'static str = match key {
                "cs1" => "cs1Label",
                "cs2" => "cs2Label",
                "cs3" => "cs3Label",
                "cs4" => "cs4Label",
                "cs5" => "cs5Label",
                "cs6" => "cs6Label",
                "cn1" => "cn1Label",
                "cn2" => "cn2Label",
                _ => "cn3Label",
            };
            put(label_key, label.to_string());
            put(key, v);
        }
    };
    let own = |k: &str| ev.opt(k).map(str::to_string);
    let num = |k: &str| ev.n(k).map(|n| n.to_string());
    // who and where, the same keys for every kind
    match kind.as_str() {
        "auth_failure" => put(
            "suser",
            psm_control_api::Login::user_part(ev.s("login")).to_string(),
        ),
        "admin_change" => {
            if let Some(a) = own("actor") {
                put("suser", a);
            }
            if let Some(u) = num("actor_uid") {
                put("suid", u);
            }
        }
        _ => {
            if let Some(u) = own("user") {
                put("suser", u);
            }
        }
    }
    if kind != "command" && kind != "command_end" {
        if let Some(source) = ev.opt("source") {
            let (ip, port) = split_addr(source);
            put("src", ip);
            if let Some(p) = port {
                put("spt", p.to_string());
            }
        }
    }
    if let Some(a) = own("account") {
        put("duser", a);
    }
    if let Some(t) = own("target") {
        put("dhost", t);
    }
    if let Some(ta) = ev.opt("target_address") {
        let (ip, port) = split_addr(ta);
        if ip.parse::<std::net::IpAddr>().is_ok() {
            put("dst", ip);
        }
        if let Some(p) = port {
            put("dpt", p.to_string());
        }
    }
    match kind.as_str() {
        "auth_success" => {
            put("outcome", "success".into());
            put("app", protocol(ev).into());
        }
        "auth_failure" | "session_denied" => {
            put("outcome", "failure".into());
            put("app", protocol(ev).into());
        }
        "channel_request" => {
            put("act", ev.s("request").to_string());
            put(
                "outcome",
                if ev.b("accepted") {
                    "success"
                } else {
                    "failure"
                }
                .into(),
            );
        }
        "command" => put("act", ev.s("decision").to_string()),
        "rdp_channel" => {
            put("act", ev.s("what").to_string());
            put("outcome", "failure".into());
            put("app", "rdp".into());
        }
        "approval" | "admin_change" => put("act", ev.s("action").to_string()),
        "file_transfer" => {
            put("act", ev.s("operation").to_string());
            put(
                "outcome",
                if ev.b("ok") { "success" } else { "failure" }.into(),
            );
            put("app", ev.s("protocol").to_string());
            put("filePath", ev.s("path").to_string());
            if let Some(n) = num("bytes") {
                put("fsize", n);
            }
            if let Some(h) = own("sha256") {
                put("fileHash", h);
            }
        }
        "session_start" | "session_end" => put("app", protocol(ev).into()),
        _ => {}
    }
    if let Some(r) = own("reason") {
        put("reason", r);
    } else if let Some(r) = own("status") {
        put("reason", r);
    }
    if let Some(m) = own("client_message")
        .or_else(|| own("message"))
        .or_else(|| own("note"))
    {
        put("msg", m);
    }
    if let Some(n) = num("start_ms") {
        put("start", n);
    }
    if let Some(n) = num("end_ms") {
        put("end", n);
    }
    if let Some(n) = num("bytes_up") {
        put("in", n);
    }
    if let Some(n) = num("bytes_down") {
        put("out", n);
    }
    if let Some(n) = num("count") {
        put("cnt", n);
    }
    let p = &mut put;
    labeled(p, "cs1", "sessionId", own("session_id"));
    // an unrecorded session (`recorded: false`) names no recording
    if ev.0.get("recorded").and_then(Value::as_bool) != Some(false) {
        labeled(p, "cs2", "recordingId", own("recording_id"));
    }
    labeled(p, "cs3", "justification", own("justification"));
    let (cs4_label, cs4) = match kind.as_str() {
        "auth_success" | "auth_failure" => ("method", own("method")),
        "session_end" => ("reasonCode", own("reason_code")),
        "command" => ("commandSource", own("source")),
        "forward" => ("forwardKind", own("kind")),
        "notice" => ("noticeKind", own("kind")),
        "rdp_channel" => ("rdpChannel", own("channel")),
        _ => ("", None),
    };
    labeled(p, "cs4", cs4_label, cs4);
    let (cs5_label, cs5) = match kind.as_str() {
        "auth_success" | "auth_failure" | "session_denied" => ("login", own("login")),
        "command" | "command_end" => ("command", own("line")),
        "channel_request" => ("command", own("command").filter(|c| !c.is_empty())),
        "forward" => ("destination", own("destination")),
        "admin_change" => ("object", own("object")),
        "file_transfer" => ("path2", own("path2")),
        "session_end" => ("exitSignal", own("exit_signal")),
        _ => ("", None),
    };
    labeled(p, "cs5", cs5_label, cs5);
    let (cs6_label, cs6) = match kind.as_str() {
        "session_end" => ("side", own("side")),
        "approval" => ("by", own("by")),
        _ => ("", None),
    };
    labeled(p, "cs6", cs6_label, cs6);
    let (cn1_label, cn1) = match kind.as_str() {
        "command" => ("ruleId", num("rule")),
        "approval" => ("requestId", num("request")),
        _ => ("durationMs", num("duration_ms")),
    };
    labeled(p, "cn1", cn1_label, cn1);
    labeled(p, "cn2", "channel", num("channel"));
    labeled(p, "cn3", "exitStatus", num("exit_status"));
    let ext: Vec<String> = ext
        .iter()
        .map(|(k, v)| format!("{k}={}", cef_value(v)))
        .collect();
    format!(
        "CEF:0|psm|psm|{}|{}|{}|{}|{}",
        cef_header(PRODUCT_VERSION),
        cef_header(ev.kind()),
        cef_header(&cef_name(ev)),
        severity(ev),
        ext.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_field_stays_on_its_line() {
        let h = cef_header("deny|x\nCEF:0|forged");
        assert!(!h.contains('\n'), "{h}");
        assert!(!h.contains("x|") && h.contains("deny\\|x"), "{h}");
    }
}
