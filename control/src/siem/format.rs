//! What a sink sends: one RFC 5424 syslog message per audit event, its MSG in JSON, CEF or
//! OCSF ([`Format`]), and the octet-counted framing of RFC 6587 / RFC 5425 for TCP and TLS.
//! docs/siem.md documents every field of the CEF and OCSF mappings.
//!
//! The mappings read the event as its JSON object (as in `audit.jsonl`), by field name: an
//! event kind or a field that psm adds later is still exported (CEF: the common fields and
//! `msg`; OCSF: a Base Event with every field under `unmapped`), never refused.
//!
//! Pure functions of the event and the sink's settings: no I/O, no clock.

mod cef;
mod ocsf;

use psm_control_api::AuditEvent;
use serde_json::{Map, Value};

use super::config::Format;
use cef::cef_of;
use ocsf::ocsf_of;

pub use cef::cef_line;
pub use ocsf::{ocsf, OCSF_VERSION};

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

/// The protocol a session or login event names (`ssh` for lines written before events named
/// it).
fn protocol(ev: &Ev) -> &str {
    match ev.s("protocol") {
        "" => "ssh",
        p => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_control_api::AuditKind;
    use serde_json::json;

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
    fn forwards_name_where_they_came_from_and_went() {
        let forward = |kind: &str, destination: &str, source: Option<&str>| {
            ev(AuditKind::Forward {
                session_id: "s1".into(),
                user: "alice".into(),
                target: "db01".into(),
                account: "psm-tcp".into(),
                channel: 3,
                kind: kind.into(),
                destination: destination.into(),
                source: source.map(str::to_string),
                bytes_up: 10,
                bytes_down: 20,
                duration_ms: 1500,
            })
        };
        // a tcp pass-through connection: from the user's end to the target's address
        let tcp = forward(
            "tcp",
            "10.1.2.3:5432 from 10.0.0.9:40001",
            Some("10.0.0.9:40001"),
        );
        let o = ocsf("gw1", &tcp);
        assert_eq!(o["class_uid"], 4001);
        assert_eq!(o["src_endpoint"]["ip"], "10.0.0.9");
        assert_eq!(o["src_endpoint"]["port"], 40001);
        assert_eq!(o["dst_endpoint"]["ip"], "10.1.2.3");
        assert_eq!(o["dst_endpoint"]["port"], 5432);
        assert_eq!(o["dst_endpoint"]["name"], "db01");
        assert_eq!(o["traffic"]["bytes"], 30);
        let c = cef_line("gw1", &tcp);
        assert!(c.contains(" src=10.0.0.9 spt=40001 "), "{c}");
        // an SSH forward leaves from the target and names no source
        let o = ocsf("gw1", &forward("local", "10.1.2.3:5432", None));
        assert_eq!(o["src_endpoint"]["name"], "db01");
        assert_eq!(o["dst_endpoint"]["ip"], "10.1.2.3");
        let c = cef_line("gw1", &forward("local", "10.1.2.3:5432", None));
        assert!(!c.contains(" src="), "{c}");
        // a remote forward's destination names its originator after " from "
        let o = ocsf(
            "gw1",
            &forward("remote", "127.0.0.1:8080 from 10.1.2.9:51000", None),
        );
        assert_eq!(o["dst_endpoint"]["ip"], "127.0.0.1");
        assert_eq!(o["dst_endpoint"]["port"], 8080);
        assert_eq!(o["src_endpoint"]["name"], "db01");
        // a tcp connection logged before `source` existed
        let o = ocsf(
            "gw1",
            &forward("tcp", "10.1.2.3:5432 from 10.0.0.9:40001", None),
        );
        assert_eq!(o["src_endpoint"]["ip"], "10.0.0.9");
        assert_eq!(o["dst_endpoint"]["ip"], "10.1.2.3");
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
