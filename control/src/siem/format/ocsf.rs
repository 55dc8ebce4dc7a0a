//! OCSF: an audit event as one Open Cybersecurity Schema Framework object (docs/siem.md,
//! "OCSF"): its class and activity, the mapped fields, and every other field under `unmapped`.

use psm_control_api::AuditEvent;
use serde_json::{json, Map, Value};

use super::cef::cef_name;
use super::{ocsf_severity, protocol, severity, split_addr, Ev, PRODUCT_VERSION};

/// The OCSF schema version the OCSF format follows.
pub const OCSF_VERSION: &str = "1.3.0";

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

pub(super) fn ocsf_of(hostname: &str, ev: &Ev) -> Value {
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
            let target = take("target");
            match take("source") {
                // a tcp pass-through connection: from the user's end to the target's address
                // (`destination` is "ADDR:PORT from CLIENT:PORT")
                Some(Value::String(src)) => {
                    f.insert("src_endpoint".into(), endpoint(&src));
                    if let Some(Value::String(d)) = take("destination") {
                        let to = d.split(" from ").next().unwrap_or(&d);
                        let mut dst = endpoint(to);
                        if let (Value::Object(m), Some(t)) = (&mut dst, target) {
                            m.insert("name".into(), t);
                        }
                        f.insert("dst_endpoint".into(), dst);
                    }
                }
                // an SSH forward leaves from the target; a remote forward's destination, and a
                // tcp connection's logged before `source` existed, say "ADDR:PORT from ORIG:PORT"
                _ => {
                    let d = match take("destination") {
                        Some(Value::String(d)) => Some(d),
                        _ => None,
                    };
                    let (to, from) = match d.as_deref().and_then(|d| d.split_once(" from ")) {
                        Some((to, from)) => (Some(to.to_string()), Some(from.to_string())),
                        None => (d, None),
                    };
                    match (ev.s("kind"), from) {
                        ("tcp", Some(from)) => {
                            f.insert("src_endpoint".into(), endpoint(&from));
                        }
                        _ => {
                            if let Some(t) = target {
                                f.insert("src_endpoint".into(), json!({ "name": t }));
                            }
                        }
                    }
                    if let Some(to) = to {
                        f.insert("dst_endpoint".into(), endpoint(&to));
                    }
                }
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
