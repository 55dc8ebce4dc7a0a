//! The typed audit events that relays (and control itself) append to the audit log.

use crate::Protocol;
use serde::{Deserialize, Serialize};

/// One audit event. Relays fill everything but `seq`; control assigns `seq` when it appends the
/// event to the log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// Position in the audit log (set by control).
    #[serde(default)]
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Which process reported it (`relay-<id>`, `control`).
    pub origin: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: AuditKind,
}

/// What an audit event records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditKind {
    /// A psm user proved their identity.
    AuthSuccess {
        /// Login string as sent by the client.
        login: String,
        /// psm user.
        user: String,
        /// `publickey` or `password`.
        method: String,
        /// Client `ip:port`.
        source: String,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// An authentication attempt failed.
    AuthFailure {
        /// Login string as sent by the client.
        login: String,
        /// `publickey` or `password`.
        method: String,
        /// Client `ip:port`.
        source: String,
        /// Full reason (for auditors only).
        reason: String,
        /// The side at fault when it is not the client's own attempt: `control` when
        /// psm-control did not answer an approval call, `policy` when dual control refused.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        side: String,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// An authenticated user was refused a session.
    SessionDenied {
        /// Login string as sent by the client.
        login: String,
        /// psm user.
        user: String,
        /// Client `ip:port`.
        source: String,
        /// Full reason.
        reason: String,
        /// Stable short code of the reason (`no_grant`, `host_key_mismatch`, …).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason_code: String,
        /// The side at fault: `policy`, `client`, `target` or `recorder`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        side: String,
        /// What the client was told.
        client_message: String,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// A session to a target started.
    SessionStart {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Client `ip:port`.
        source: String,
        /// Target name.
        target: String,
        /// Target `host:port`.
        target_address: String,
        /// Account on the target.
        account: String,
        /// Recording id.
        recording_id: String,
        /// Start, ms since the epoch.
        start_ms: u64,
        /// The reason or ticket the user gave, when the grant asks for one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        justification: Option<String>,
        /// The relay worker (core) serving it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<usize>,
        /// Whether the session is recorded (written only when it is not: under a grant that
        /// says `--unrecorded`, or when recording is optional and psm-recorder was unavailable;
        /// `recording_id` then names no recording).
        #[serde(default = "recorded_default", skip_serializing_if = "Clone::clone")]
        recorded: bool,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// A session ended.
    SessionEnd {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Client `ip:port`.
        source: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// Start, ms since the epoch.
        start_ms: u64,
        /// End, ms since the epoch.
        end_ms: u64,
        /// Duration in ms.
        duration_ms: u64,
        /// Bytes from the user to the target.
        bytes_up: u64,
        /// Bytes from the target to the user.
        bytes_down: u64,
        /// Exit status of the last command or shell, when the target sent one.
        exit_status: Option<u32>,
        /// Exit signal, when the target sent one.
        exit_signal: Option<String>,
        /// Recording id.
        recording_id: String,
        /// Why it ended (`client closed the session`, `target stopped responding`, …).
        reason: String,
        /// A stable code for the reason (`client_closed`, `target_unresponsive`, `relay_lost`, …).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason_code: String,
        /// The side the end came from: `client`, `target`, `recorder`, `policy`, `operator`,
        /// `relay` or `internal`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        side: String,
        /// The reason or ticket the user gave, when the grant asks for one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        justification: Option<String>,
        /// Relayed bytes psm-recorder never confirmed durable (0 in the normal case; more when
        /// the recorder link dropped mid-session). Absent when the session was not recorded or
        /// its relay vanished.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unconfirmed_bytes: Option<u64>,
        /// The protocol the user connected with (`ssh` in lines written before the field
        /// existed; `tcp`: a connection to a pass-through target's psm port).
        #[serde(default)]
        protocol: Protocol,
    },
    /// An RDP session's virtual channel was refused (removed or answered by the relay), or a
    /// refused use of an allowed one (a clipboard transfer the wrong way) was stopped.
    RdpChannel {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// Channel name as the client offered it (escaped), e.g. `cliprdr`, `rdpdr`.
        channel: String,
        /// What was refused: `channel` (the whole channel), `to-target` or `from-target` (a
        /// clipboard transfer that way), or a redirected device's kind: `drive`, `printer`,
        /// `smartcard`, `serial`, `parallel`, `device`.
        what: String,
        /// Why, for auditors (`grant allows clipboard none`).
        reason: String,
    },
    /// The user started a shell, a command or a subsystem on a channel of a session.
    ChannelRequest {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// `shell`, `exec` or `subsystem`.
        request: String,
        /// The command line (exec) or subsystem name; empty for a shell.
        command: String,
        /// Whether the target accepted it.
        accepted: bool,
    },
    /// A command the user submitted (an exec request, or a line typed in a shell), with the
    /// command-control decision.
    Command {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// The command line as reconstructed.
        line: String,
        /// `allow`, `deny`, `terminate` or `alert`.
        decision: String,
        /// The rule that decided (None: the grant's default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<u64>,
        /// How the line was read: `exec`, `shell` (screen model) or `stdin` (a shell without a
        /// terminal).
        source: String,
    },
    /// Dual control: a request was made, voted on, approved, denied or expired.
    Approval {
        /// Request id.
        request: u64,
        /// `requested`, `approve`, `deny`, `approved`, `denied`, `expired`, `covered`.
        action: String,
        /// The requesting user.
        user: String,
        /// Account.
        account: String,
        /// Target.
        target: String,
        /// Who voted (for votes and decisions).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// The reason given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A local port forward (`direct-tcpip`) ended: where it went and what it moved.
    Forward {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name (the forward leaves from there).
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// `local` (`ssh -L`/`-W`), `remote` (`ssh -R`), `agent` (`ssh -A`) or `tcp` (a
        /// connection to a tcp target's psm port, under the session's lease).
        #[serde(default = "local_forward")]
        kind: String,
        /// `host:port` (local), `address:port from originator:port` (remote),
        /// `auth-agent@openssh.com`, or `address:port from client:port` (tcp).
        destination: String,
        /// Where the connection came from, `address:port` (tcp: the user's end of it, which
        /// need not be the lease session's own address and port); absent for SSH forwards,
        /// which come over the session's connection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        /// Bytes from the user.
        bytes_up: u64,
        /// Bytes to the user.
        bytes_down: u64,
        /// How long it was open, ms.
        duration_ms: u64,
    },
    /// An exec command ended (one per exec channel that started, after its `command` event):
    /// how it ended, as the target reported it. Interactive shells have none per line.
    CommandEnd {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// The command line, as in its `command` event (cut at 4096 bytes).
        line: String,
        /// Exit status, when the target sent one.
        #[serde(default)]
        exit_status: Option<u32>,
        /// Exit signal, when the target sent one.
        #[serde(default)]
        exit_signal: Option<String>,
        /// How long the command ran (from its start to the channel's end), ms.
        #[serde(default)]
        duration_ms: u64,
        /// Bytes from the user on this channel.
        #[serde(default)]
        bytes_up: u64,
        /// Bytes to the user on this channel.
        #[serde(default)]
        bytes_down: u64,
    },
    /// One file operation over SFTP (OpenSSH's `sftp`, and `scp`, which speaks SFTP since
    /// OpenSSH 9) or the legacy SCP protocol (`scp -O`), read by the relay from the channel's
    /// bytes as they passed. A file opened, read or written and closed is one event, sent when
    /// it is closed (or when the channel ends).
    FileTransfer {
        /// Session id.
        session_id: String,
        /// psm user.
        user: String,
        /// Target name.
        target: String,
        /// Account on the target.
        account: String,
        /// User-side channel number.
        channel: u32,
        /// `sftp` or `scp` (the legacy protocol).
        protocol: String,
        /// `read` (file content went to the user: a download), `write` (from the user: an
        /// upload), `open` (opened, or refused, with nothing moved), `remove`, `rename`,
        /// `mkdir`, `rmdir`, `setstat`, `symlink` or `link`.
        operation: String,
        /// The path as the client (or, for downloads with `scp -O`, the target) named it.
        path: String,
        /// The second path: a rename's new name, the link of a symlink or hard link (`path`
        /// is what it points to); with `scp -O`, the file name the sending side gave.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path2: Option<String>,
        /// Bytes of file content that passed.
        #[serde(default)]
        bytes: u64,
        /// SHA-256 (hex) of the content as it passed, when it passed whole and in order from
        /// the start of the file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// The content that passed is not the file from its start, in order (random access, a
        /// resumed transfer, one cut short): no hash.
        #[serde(default)]
        partial: bool,
        /// Why there is no hash, or anything else worth knowing about the operation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// Whether it succeeded, as the peers reported it.
        ok: bool,
        /// What the peer reported when it failed (`permission denied: …`, scp's error line).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<String>,
    },
    /// An administrative change through psmctl.
    AdminChange {
        /// What was done (`user add`, `grant remove`, …).
        action: String,
        /// The object it was done to.
        object: String,
        /// Uid of the process that asked for the change (the control socket's peer
        /// credentials); absent in events written before psm recorded it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        actor_uid: Option<u32>,
        /// User name of `actor_uid`, when the system knows it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        actor: Option<String>,
    },
    /// A process-level or session-level event (refused forwarding, refused environment
    /// variables, channels a target opened unasked, …). Repeats within a session are aggregated:
    /// the first is audited with `count` 1, and one more event at the end carries the total.
    Notice {
        /// Message.
        message: String,
        /// The session (connection) it concerns, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        /// What kind of notice (`port forwarding refused`, …), for aggregation and search.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// How many of this kind the session had: 1 on the first, the total on the summary.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
    },
    /// Retention deleted a recording or a closed audit segment (written just before the file
    /// is removed).
    Retention {
        /// The recording deleted (empty when an audit segment was).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        recording_id: String,
        /// Its size.
        bytes: u64,
        /// `max_age` or `max_bytes`.
        reason: String,
        /// When it was last written, ms since the epoch.
        modified_ms: u64,
        /// The audit segment deleted, when it is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit_segment: Option<AuditSegment>,
    },
}

/// A closed segment of the audit log, as a `retention` event names it: what the verifier
/// needs to tell "deleted by retention" from "missing".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSegment {
    /// Its file name (in the data directory's `audit/`).
    pub file: String,
    /// Its first `seq`.
    pub first_seq: u64,
    /// Its last `seq` (its rotation checkpoint).
    pub last_seq: u64,
    /// SHA-256 (hex) of its last line: what the next segment's first line carries.
    pub last_hash: String,
}

/// The `kind` of a `forward` event written before there were other kinds.
fn local_forward() -> String {
    "local".into()
}

/// Milliseconds since the Unix epoch, for event timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn recorded_default() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_line, encode_line, RelayToControl};

    #[test]
    fn audit_event_round_trip() {
        let e = AuditEvent {
            seq: 0,
            ts_ms: 1,
            origin: "relay-1".into(),
            kind: AuditKind::AuthFailure {
                protocol: Protocol::Ssh,
                login: "alice@root@web01".into(),
                method: "password".into(),
                source: "127.0.0.1:5000".into(),
                reason: "wrong password".into(),
                side: String::new(),
            },
        };
        let line = encode_line(&RelayToControl::Audit(e.clone()));
        let text = String::from_utf8_lossy(&line);
        assert!(text.contains("\"event\":\"auth_failure\""), "{text}");
        match decode_line::<RelayToControl>(&line).expect("decodes") {
            RelayToControl::Audit(b) => assert_eq!(b, e),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn admin_change_actor_is_optional_on_the_wire() {
        // a line written before the actor was recorded still parses
        let old = br#"{"seq":4,"ts_ms":1,"origin":"control","event":"admin_change","action":"user add","object":"alice"}"#;
        let e: AuditEvent = decode_line(old).expect("old line decodes");
        assert_eq!(
            e.kind,
            AuditKind::AdminChange {
                action: "user add".into(),
                object: "alice".into(),
                actor_uid: None,
                actor: None,
            }
        );
        // absent fields are not written, present ones round-trip
        let text = String::from_utf8_lossy(&encode_line(&e)).into_owned();
        assert!(!text.contains("actor"), "{text}");
        let with = AuditEvent {
            kind: AuditKind::AdminChange {
                action: "user add".into(),
                object: "alice".into(),
                actor_uid: Some(0),
                actor: Some("root".into()),
            },
            ..e
        };
        let line = encode_line(&with);
        let text = String::from_utf8_lossy(&line);
        assert!(
            text.contains(r#""actor_uid":0"#) && text.contains(r#""actor":"root""#),
            "{text}"
        );
        assert_eq!(decode_line::<AuditEvent>(&line).expect("decodes"), with);
    }

    #[test]
    fn file_transfer_and_command_end_on_the_wire() {
        let line = br#"{"seq":7,"ts_ms":1,"origin":"relay-a","event":"file_transfer","session_id":"s","user":"alice","target":"web01","account":"root","channel":2,"protocol":"scp","operation":"write","path":"/tmp/a\nb","ok":true}"#;
        let e = decode_line::<AuditEvent>(line).expect("decodes");
        let AuditKind::FileTransfer {
            path,
            bytes,
            sha256,
            partial,
            ..
        } = &e.kind
        else {
            panic!("{e:?}");
        };
        assert_eq!(
            (path.as_str(), *bytes, sha256, *partial),
            ("/tmp/a\nb", 0, &None, false)
        );
        assert_eq!(
            decode_line::<AuditEvent>(&encode_line(&e)).expect("again"),
            e
        );
        let end = br#"{"seq":8,"ts_ms":1,"origin":"relay-a","event":"command_end","session_id":"s","user":"alice","target":"web01","account":"root","channel":2,"line":"exit 3","exit_status":3}"#;
        let e = decode_line::<AuditEvent>(end).expect("decodes");
        assert!(matches!(
            e.kind,
            AuditKind::CommandEnd {
                exit_status: Some(3),
                exit_signal: None,
                ..
            }
        ));
        let text = String::from_utf8_lossy(&encode_line(&e)).into_owned();
        assert!(text.contains(r#""exit_signal":null"#), "{text}");
    }
}
