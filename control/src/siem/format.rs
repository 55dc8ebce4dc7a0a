//! What a sink sends: one RFC 5424 syslog message per audit event, its MSG in JSON, CEF or
//! OCSF ([`Format`]), and the octet-counted framing of RFC 6587 / RFC 5425 for TCP and TLS.
//! docs/siem.md documents every field of the CEF and OCSF mappings.
//!
//! The mappings read the event as its JSON object (as in `audit.jsonl`), by field name: an
//! event kind or a field that psm adds later is still exported (CEF: the common fields and
//! `msg`; OCSF: a Base Event with every field under `unmapped`), never refused.
//!
//! Pure functions of the event and the sink's settings: no I/O, no clock.

use psm_control_api::AuditEvent;
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

/// An audit event as its JSON object, with typed accessors.
struct Ev(Map<String, Value>);

impl Ev {
    fn new(event: &AuditEvent) -> Ev {
        match serde_json::to_value(event) {
            Ok(Value::Object(m)) => Ev(m),
            _ => Ev(Map::new()),
        }
    }
    fn from_line(line: &[u8]) -> Ev {
        match serde_json::from_slice(line) {
            Ok(Value::Object(m)) => Ev(m),
            _ => Ev(Map::new()),
        }
    }
    /// A string field ("" when absent).
    fn s(&self, k: &str) -> &str {
        self.0.get(k).and_then(Value::as_str).unwrap_or("")
    }
    /// A string field, when present.
    fn opt(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(Value::as_str)
    }
    /// A number field, when present.
    fn n(&self, k: &str) -> Option<u64> {
        self.0.get(k).and_then(Value::as_u64)
    }
    /// A boolean field (false when absent).
    fn b(&self, k: &str) -> bool {
        self.0.get(k).and_then(Value::as_bool).unwrap_or(false)
    }
    /// The `event` tag (`auth_success`, `session_end`, …).
    fn kind(&self) -> &str {
        self.s("event")
    }
}

/// The event's `event` tag as a syslog MSGID (at most 32 printable ASCII characters; `-`
/// when there is none).
fn msgid(ev: &Ev) -> String {
    let id: String = ev
        .kind()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    if id.is_empty() {
        "-".into()
    } else {
        id
    }
}

/// How grave an event is, on CEF's 0 to 10 scale; syslog severity and OCSF `severity_id` are
/// derived from it ([`syslog_severity`], [`ocsf_severity`]).
fn severity(ev: &Ev) -> u8 {
    match ev.kind() {
        "auth_failure" | "session_denied" => 6,
        "channel_request" if !ev.b("accepted") => 6,
        "file_transfer" if !ev.b("ok") => 5,
        "command" => match ev.s("decision") {
            "allow" => 3,
            "alert" => 7,
            "deny" => 8,
            _ => 9, // terminate, or anything new: the graver
        },
        "approval" => match ev.s("action") {
            "deny" | "denied" | "expired" => 5,
            _ => 3,
        },
        "admin_change" | "notice" | "rdp_channel" => 5,
        _ => 3,
    }
}

/// CEF's 0 to 10 severity of `event`.
pub fn cef_severity(event: &AuditEvent) -> u8 {
    severity(&Ev::new(event))
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

/// The whole RFC 5424 message for one line of `audit.jsonl` (`line`: the JSON object, hash
/// chain fields included): header, no structured data, the formatted MSG.
pub fn syslog_message(header: &Header, format: Format, line: &[u8]) -> Vec<u8> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let ev = Ev::from_line(line);
    let pri = u32::from(header.facility) * 8 + u32::from(syslog_severity(severity(&ev)));
    let mut out = format!(
        "<{pri}>1 {} {} {} {} {} - ",
        timestamp(ev.n("ts_ms").unwrap_or(0)),
        header.hostname,
        header.app_name,
        header.procid,
        msgid(&ev)
    )
    .into_bytes();
    match format {
        Format::Json => out.extend_from_slice(line),
        Format::Cef => out.extend_from_slice(cef_of(&header.hostname, &ev).as_bytes()),
        Format::Ocsf => {
            out.extend_from_slice(ocsf_of(&header.hostname, &ev).to_string().as_bytes())
        }
    }
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
fn cef_name(ev: &Ev) -> String {
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

fn cef_of(hostname: &str, ev: &Ev) -> String {
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

// ---------------------------------------------------------------------------------------------
// OCSF

/// An OCSF network endpoint from `ip:port` (a host name when it is not an address).
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

/// class_uid, class_name, category_uid, category_name.
type Class = (u32, &'static str, u32, &'static str);
const AUTHENTICATION: Class = (3002, "Authentication", 3, "Identity & Access Management");
const ENTITY_MANAGEMENT: Class = (3004, "Entity Management", 3, "Identity & Access Management");
const NETWORK_ACTIVITY: Class = (4001, "Network Activity", 4, "Network Activity");
const SSH_ACTIVITY: Class = (4007, "SSH Activity", 4, "Network Activity");
const PROCESS_ACTIVITY: Class = (1007, "Process Activity", 1, "System Activity");
const BASE_EVENT: Class = (0, "Base Event", 0, "Uncategorized");

/// The protocol a session or login event names (`ssh` for lines written before events named
/// it).
fn protocol(ev: &Ev) -> &str {
    match ev.s("protocol") {
        "" => "ssh",
        p => p,
    }
}

/// The OCSF class of a session's events: SSH Activity for SSH; Network Activity for RDP and
/// pass-through connections (their Open, Close and Refuse activities are the same ids).
fn session_class(ev: &Ev) -> Class {
    match protocol(ev) {
        "ssh" => SSH_ACTIVITY,
        _ => NETWORK_ACTIVITY,
    }
}

/// The OCSF object for `event` (docs/siem.md, "OCSF").
pub fn ocsf(hostname: &str, event: &AuditEvent) -> Value {
    ocsf_of(hostname, &Ev::new(event))
}

fn ocsf_of(hostname: &str, ev: &Ev) -> Value {
    // Every field not mapped below ends up in `unmapped`.
    let mut rest = ev.0.clone();
    for k in ["seq", "ts_ms", "event"] {
        rest.remove(k);
    }
    let mut take = |k: &str| rest.remove(k);
    let mut f = Map::new();
    let mut status: Option<bool> = None;
    let mut message: Option<String> = None;
    let user = |name: &str| json!({ "name": name });
    let kind = ev.kind().to_string();
    // The actor: the psm user and, within a session, the session.
    let actor = |take: &mut dyn FnMut(&str) -> Option<Value>| {
        let mut a = Map::new();
        if let Some(u) = take("user") {
            a.insert("user".into(), json!({ "name": u }));
        }
        if let Some(s) = take("session_id") {
            a.insert("session".into(), json!({ "uid": s }));
        }
        Value::Object(a)
    };
    let (class, activity_id, activity_name): (Class, u32, String) = match kind.as_str() {
        "auth_success" | "auth_failure" => {
            let ok = kind == "auth_success";
            let name = if ok {
                take("user")
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            } else {
                psm_control_api::Login::user_part(ev.s("login")).to_string()
            };
            f.insert("user".into(), user(&name));
            if let Some(s) = take("source") {
                f.insert("src_endpoint".into(), endpoint(s.as_str().unwrap_or("")));
            }
            f.insert("dst_endpoint".into(), json!({ "hostname": hostname }));
            f.insert("service".into(), json!({ "name": "psm", "uid": hostname }));
            let method = take("method")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            f.insert("auth_protocol_id".into(), 99.into());
            f.insert(
                "auth_protocol".into(),
                format!("{} {method}", protocol(ev)).into(),
            );
            f.insert("is_mfa".into(), method.contains("totp").into());
            f.insert("is_remote".into(), true.into());
            if let Some(r) = take("reason") {
                f.insert("status_detail".into(), r);
            }
            status = Some(ok);
            (AUTHENTICATION, 1, "Logon".into())
        }
        "session_denied" => {
            f.insert("actor".into(), actor(&mut take));
            if let Some(s) = take("source") {
                f.insert("src_endpoint".into(), endpoint(s.as_str().unwrap_or("")));
            }
            f.insert("dst_endpoint".into(), json!({ "hostname": hostname }));
            if let Some(r) = take("reason") {
                f.insert("status_detail".into(), r);
            }
            message = take("client_message").and_then(|v| v.as_str().map(str::to_string));
            status = Some(false);
            (session_class(ev), 5, "Refuse".into())
        }
        "session_start" | "session_end" => {
            let start = kind == "session_start";
            f.insert("actor".into(), actor(&mut take));
            if let Some(s) = take("source") {
                f.insert("src_endpoint".into(), endpoint(s.as_str().unwrap_or("")));
            }
            let mut dst = match take("target_address") {
                Some(Value::String(a)) => endpoint(&a),
                _ => json!({}),
            };
            if let (Value::Object(m), Some(t)) = (&mut dst, take("target")) {
                m.insert("name".into(), t);
            }
            f.insert("dst_endpoint".into(), dst);
            if let Some(v) = take("start_ms") {
                f.insert("start_time".into(), v);
            }
            if let Some(v) = take("end_ms") {
                f.insert("end_time".into(), v);
            }
            if let Some(v) = take("duration_ms") {
                f.insert("duration".into(), v);
            }
            if !start {
                let (up, down) = (
                    ev.n("bytes_up").unwrap_or(0),
                    ev.n("bytes_down").unwrap_or(0),
                );
                take("bytes_up");
                take("bytes_down");
                f.insert(
                    "traffic".into(),
                    json!({ "bytes_in": up, "bytes_out": down, "bytes": up.saturating_add(down) }),
                );
                if let Some(r) = take("reason") {
                    f.insert("status_detail".into(), r);
                }
            } else {
                status = Some(true);
            }
            if start {
                (session_class(ev), 1, "Open".into())
            } else {
                (session_class(ev), 2, "Close".into())
            }
        }
        "channel_request" => {
            f.insert("actor".into(), actor(&mut take));
            if let Some(t) = take("target") {
                f.insert("dst_endpoint".into(), json!({ "name": t }));
            }
            status = Some(ev.b("accepted"));
            take("accepted");
            (
                SSH_ACTIVITY,
                99,
                format!("Channel Request: {}", ev.s("request")),
            )
        }
        "rdp_channel" => {
            f.insert("actor".into(), actor(&mut take));
            if let Some(t) = take("target") {
                f.insert("dst_endpoint".into(), json!({ "name": t }));
            }
            if let Some(r) = take("reason") {
                f.insert("status_detail".into(), r);
            }
            message = Some(format!(
                "RDP channel {} refused ({})",
                psm_control_api::escape(ev.s("channel")),
                ev.s("what")
            ));
            status = Some(false);
            (NETWORK_ACTIVITY, 5, "Refuse".into())
        }
        "file_transfer" => {
            f.insert("actor".into(), actor(&mut take));
            if let Some(t) = take("target") {
                f.insert("dst_endpoint".into(), json!({ "name": t }));
            }
            let mut file = Map::new();
            if let Some(p) = take("path") {
                let name = p
                    .as_str()
                    .and_then(|p| p.rsplit('/').next())
                    .unwrap_or("")
                    .to_string();
                file.insert("name".into(), name.into());
                file.insert("path".into(), p);
            }
            if let Some(b) = take("bytes") {
                file.insert("size".into(), b);
            }
            if let Some(h) = take("sha256") {
                file.insert(
                    "hashes".into(),
                    json!([{ "algorithm_id": 3, "algorithm": "SHA-256", "value": h }]),
                );
            }
            f.insert("file".into(), Value::Object(file));
            status = Some(ev.b("ok"));
            take("ok");
            if let Some(s) = take("status") {
                f.insert("status_detail".into(), s);
            }
            (
                SSH_ACTIVITY,
                99,
                format!("File Transfer: {}", ev.s("operation")),
            )
        }
        "command" | "command_end" => {
            f.insert("actor".into(), actor(&mut take));
            let account = take("account")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut process = Map::new();
            if let Some(l) = take("line") {
                process.insert("cmd_line".into(), l);
            }
            process.insert("user".into(), user(&account));
            f.insert("process".into(), Value::Object(process));
            if let Some(t) = take("target") {
                f.insert(
                    "device".into(),
                    json!({ "hostname": t, "type_id": 1, "type": "Server" }),
                );
            }
            if kind == "command" {
                let allowed = matches!(ev.s("decision"), "allow" | "alert");
                f.insert("action_id".into(), if allowed { 1 } else { 2 }.into());
                f.insert(
                    "action".into(),
                    if allowed { "Allowed" } else { "Denied" }.into(),
                );
                f.insert("disposition_id".into(), if allowed { 1 } else { 2 }.into());
                f.insert(
                    "disposition".into(),
                    if allowed { "Allowed" } else { "Blocked" }.into(),
                );
                status = Some(allowed);
                (PROCESS_ACTIVITY, 1, "Launch".into())
            } else {
                if let Some(c) = take("exit_status") {
                    if !c.is_null() {
                        f.insert("exit_code".into(), c);
                    }
                }
                if let Some(d) = take("duration_ms") {
                    f.insert("duration".into(), d);
                }
                (PROCESS_ACTIVITY, 2, "Terminate".into())
            }
        }
        "forward" => {
            f.insert("actor".into(), actor(&mut take));
            if let Some(t) = take("target") {
                f.insert("src_endpoint".into(), json!({ "name": t }));
            }
            if let Some(Value::String(d)) = take("destination") {
                f.insert("dst_endpoint".into(), endpoint(&d));
            }
            if let Some(d) = take("duration_ms") {
                f.insert("duration".into(), d);
            }
            let (up, down) = (
                ev.n("bytes_up").unwrap_or(0),
                ev.n("bytes_down").unwrap_or(0),
            );
            take("bytes_up");
            take("bytes_down");
            f.insert(
                "traffic".into(),
                json!({ "bytes_in": up, "bytes_out": down, "bytes": up.saturating_add(down) }),
            );
            (NETWORK_ACTIVITY, 2, "Close".into())
        }
        "admin_change" => {
            let mut u = Map::new();
            if let Some(a) = take("actor") {
                u.insert("name".into(), a);
            }
            if let Some(uid) = take("actor_uid").and_then(|v| v.as_u64()) {
                u.insert("uid".into(), uid.to_string().into());
            }
            f.insert("actor".into(), json!({ "user": Value::Object(u) }));
            let action = ev.s("action");
            let entity_type = action.split(' ').next().unwrap_or(action);
            if let Some(o) = take("object") {
                f.insert("entity".into(), json!({ "name": o, "type": entity_type }));
            }
            status = Some(true);
            match action.rsplit(' ').next() {
                Some("add") => (ENTITY_MANAGEMENT, 1, "Create".into()),
                Some("remove") => (ENTITY_MANAGEMENT, 4, "Delete".into()),
                _ => (ENTITY_MANAGEMENT, 3, "Update".into()),
            }
        }
        "approval" => {
            if let Some(u) = take("user") {
                f.insert("actor".into(), json!({ "user": { "name": u } }));
            }
            message = Some(format!(
                "access request {}: {}",
                ev.n("request").unwrap_or(0),
                ev.s("action")
            ));
            (
                BASE_EVENT,
                99,
                format!("Access Request: {}", ev.s("action")),
            )
        }
        "notice" => {
            message = take("message").and_then(|v| v.as_str().map(str::to_string));
            if let Some(c) = take("count") {
                f.insert("count".into(), c);
            }
            (BASE_EVENT, 99, "Notice".into())
        }
        other => (BASE_EVENT, 99, other.replace('_', " ")),
    };
    let (class_uid, class_name, category_uid, category_name) = class;
    let (severity_id, severity_name) = ocsf_severity(severity(ev));
    let seq = ev.n("seq").unwrap_or(0);
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
    out.insert("time".into(), ev.n("ts_ms").unwrap_or(0).into());
    out.insert("severity_id".into(), severity_id.into());
    out.insert("severity".into(), severity_name.into());
    if let Some(ok) = status {
        out.insert("status_id".into(), if ok { 1 } else { 2 }.into());
        out.insert(
            "status".into(),
            if ok { "Success" } else { "Failure" }.into(),
        );
    }
    out.insert(
        "message".into(),
        message.unwrap_or_else(|| cef_name(ev)).into(),
    );
    out.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": { "name": "psm", "vendor_name": "psm", "version": PRODUCT_VERSION },
            "uid": seq.to_string(),
            "sequence": seq,
            "log_name": "audit",
            "event_code": ev.kind(),
        }),
    );
    out.extend(f);
    out.insert("unmapped".into(), Value::Object(rest));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_control_api::AuditKind;

    fn ev(kind: AuditKind) -> AuditEvent {
        AuditEvent {
            seq: 42,
            ts_ms: 1_796_304_000_123,
            origin: "relay-h:1".into(),
            kind,
        }
    }

    #[test]
    fn rdp_channel_refusals_map_to_each_format() {
        let e = ev(AuditKind::RdpChannel {
            session_id: "s9".into(),
            user: "alice".into(),
            target: "win01".into(),
            account: "Administrator".into(),
            channel: "cliprdr".into(),
            what: "from-target".into(),
            reason: "grant allows clipboard to-target".into(),
        });
        assert_eq!(cef_severity(&e), 5);
        let cef = cef_line("gw1", &e);
        for part in [
            "|RDP channel refused|5|",
            "act=from-target",
            "outcome=failure",
            "app=rdp",
            "suser=alice",
            "duser=Administrator",
            "dhost=win01",
            "cs4Label=rdpChannel cs4=cliprdr",
            "reason=grant allows clipboard to-target",
        ] {
            assert!(cef.contains(part), "{part}: {cef}");
        }
        let o = ocsf("gw1", &e);
        assert_eq!(o["class_uid"], 4001);
        assert_eq!(o["activity_name"], "Refuse");
        assert_eq!(o["status"], "Failure");
        assert_eq!(o["actor"]["user"]["name"], "alice");
        assert_eq!(o["dst_endpoint"]["name"], "win01");
        assert_eq!(o["message"], "RDP channel cliprdr refused (from-target)");
    }

    #[test]
    fn an_unrecorded_session_start_names_no_recording() {
        let start = |recorded: bool| {
            ev(AuditKind::SessionStart {
                protocol: psm_control_api::Protocol::Ssh,
                session_id: "s1".into(),
                user: "alice".into(),
                source: "10.0.0.1:5000".into(),
                target: "web01".into(),
                target_address: "10.0.0.9:22".into(),
                account: "root".into(),
                recording_id: "s1".into(),
                start_ms: 1,
                justification: None,
                worker: None,
                recorded,
            })
        };
        assert!(cef_line("gw1", &start(true)).contains("cs2Label=recordingId cs2=s1"));
        let cef = cef_line("gw1", &start(false));
        assert!(!cef.contains("recordingId"), "{cef}");
        assert_eq!(ocsf("gw1", &start(false))["unmapped"]["recorded"], false);
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
        let m = syslog_message(
            &header(),
            Format::Json,
            &serde_json::to_vec(&e).expect("json"),
        );
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
                protocol: psm_control_api::Protocol::Ssh,
                login: "bob@root@web01".into(),
                method: "password".into(),
                source: "[::1]:5022".into(),
                reason: "wrong password".into(),
                side: String::new(),
            }),
        );
        assert!(
            end.contains("|auth_failure|authentication failed|6|"),
            "{end}"
        );
        assert!(
            end.contains(
                " suser=bob src=::1 spt=5022 outcome=failure app=ssh reason=wrong password "
            ),
            "{end}"
        );
    }

    #[test]
    fn ocsf_classes() {
        let auth = ocsf(
            "gw1",
            &ev(AuditKind::AuthSuccess {
                protocol: psm_control_api::Protocol::Ssh,
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
                protocol: psm_control_api::Protocol::Ssh,
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
                unconfirmed_bytes: None,
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

    #[test]
    fn rdp_sessions_and_logins_are_named_rdp_and_old_lines_ssh() {
        let start = ev(AuditKind::SessionStart {
            protocol: psm_control_api::Protocol::Rdp,
            session_id: "s2".into(),
            user: "alice".into(),
            source: "10.0.0.1:5000".into(),
            target: "win01".into(),
            target_address: "10.0.0.7:3389".into(),
            account: "Administrator".into(),
            recording_id: "s2".into(),
            start_ms: 1,
            justification: None,
            worker: None,
            recorded: true,
        });
        let cef = cef_line("gw1", &start);
        assert!(cef.contains(" app=rdp "), "{cef}");
        assert!(!cef.contains("app=ssh"), "{cef}");
        let o = ocsf("gw1", &start);
        assert_eq!(o["class_uid"], 4001, "{o}");
        assert_eq!(o["activity_name"], "Open");
        assert_eq!(o["dst_endpoint"]["name"], "win01");

        let login = ev(AuditKind::AuthSuccess {
            protocol: psm_control_api::Protocol::Rdp,
            login: "alice@Administrator@win01".into(),
            user: "alice".into(),
            method: "nla+totp".into(),
            source: "10.0.0.1:5000".into(),
        });
        assert!(cef_line("gw1", &login).contains(" app=rdp "));
        let o = ocsf("gw1", &login);
        assert_eq!(o["auth_protocol"], "rdp nla+totp");
        assert_eq!(o["is_mfa"], true);

        // a line written before events named their protocol reads as SSH
        let old = raw(json!({
            "seq": 3, "ts_ms": 5, "origin": "relay-r", "event": "session_start",
            "session_id": "s1", "user": "alice", "source": "10.0.0.1:5000", "target": "web01",
            "target_address": "10.0.0.9:22", "account": "root", "recording_id": "s1",
            "start_ms": 1
        }));
        assert!(cef_of("gw1", &old).contains(" app=ssh "));
        assert_eq!(ocsf_of("gw1", &old)["class_uid"], 4007);
        let parsed: AuditEvent = serde_json::from_value(Value::Object(old.0.clone()))
            .expect("an older session_start parses");
        assert!(matches!(
            parsed.kind,
            AuditKind::SessionStart {
                protocol: psm_control_api::Protocol::Ssh,
                ..
            }
        ));
    }

    fn raw(v: Value) -> Ev {
        match v {
            Value::Object(m) => Ev(m),
            _ => panic!("an object"),
        }
    }

    #[test]
    fn kinds_added_later_are_exported_too() {
        let ft = raw(json!({
            "seq": 9, "ts_ms": 5, "origin": "relay-r", "event": "file_transfer",
            "session_id": "s1", "user": "alice", "target": "web01", "account": "root",
            "channel": 0, "protocol": "sftp", "operation": "write", "path": "/tmp/a.bin",
            "bytes": 1024, "sha256": "ab", "partial": false, "ok": true
        }));
        let o = ocsf_of("gw1", &ft);
        assert_eq!(o["class_uid"], 4007);
        assert_eq!(o["file"]["name"], "a.bin");
        assert_eq!(o["file"]["size"], 1024);
        assert_eq!(o["file"]["hashes"][0]["value"], "ab");
        assert_eq!(o["unmapped"]["protocol"], "sftp");
        let c = cef_of("gw1", &ft);
        assert!(c.contains("|file_transfer|file write|3|"), "{c}");
        assert!(
            c.contains(
                " act=write outcome=success app=sftp filePath=/tmp/a.bin fsize=1024 fileHash=ab "
            ),
            "{c}"
        );

        let future = raw(json!({
            "seq": 10, "ts_ms": 5, "origin": "control", "event": "something_new",
            "user": "bob", "detail": "x"
        }));
        let o = ocsf_of("gw1", &future);
        assert_eq!(
            (o["class_uid"].clone(), o["type_uid"].clone()),
            (json!(0), json!(99))
        );
        assert_eq!(o["unmapped"]["detail"], "x");
        assert_eq!(o["unmapped"]["user"], "bob");
        let c = cef_of("gw1", &future);
        assert!(
            c.contains("|something_new|something new|3|") && c.contains(" suser=bob"),
            "{c}"
        );
    }
}
