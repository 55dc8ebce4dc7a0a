//! The daemon as a whole: started on a temporary data directory, driven through both sockets.

use super::*;
use crate::client::Client;
use crate::protocol::{Changed, Request, Response, SessionInfo, StatusInfo};
use crate::testkeys::USER_PUB;
use psm_control_api::{
    decode_line, AuditEvent, AuditKind, Credential, Protocol, RelayToControl, Secret,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

struct Daemon {
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ControlError>>,
}

impl Daemon {
    async fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, Options::default()).await
    }

    async fn start_with(dir: &Path, options: Options) -> Daemon {
        let (tx, rx) = oneshot::channel::<()>();
        let d = dir.to_path_buf();
        let task = tokio::spawn(run_until_with(d, options, async move {
            let _ = rx.await;
        }));
        let sock = dir.join("policy.sock");
        for _ in 0..200 {
            if sock.exists() && dir.join("control.sock").exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sock.exists(), "daemon did not start");
        Daemon {
            dir: dir.to_path_buf(),
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("daemon stops in time")
            .expect("daemon task");
        res.expect("daemon result");
        assert!(!self.dir.join("control.sock").exists());
        assert!(!self.dir.join("policy.sock").exists());
    }

    /// One request through control.sock, on a blocking thread (the client is blocking).
    async fn call(&self, req: Request) -> Result<serde_json::Value, String> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            Client::connect(&dir)
                .and_then(|mut c| c.call(&req))
                .map_err(|e| e.to_string())
        })
        .await
        .expect("blocking task")
    }

    async fn change(&self, req: Request) -> u64 {
        let v = self.call(req).await.expect("change accepted");
        serde_json::from_value::<Changed>(v)
            .expect("changed")
            .version
    }
}

struct FakeRelay {
    reader: BufReader<OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl FakeRelay {
    async fn connect(dir: &Path, id: &str) -> FakeRelay {
        let s = UnixStream::connect(dir.join("policy.sock"))
            .await
            .expect("connect policy.sock");
        let (r, w) = s.into_split();
        let mut relay = FakeRelay {
            reader: BufReader::new(r),
            writer: w,
        };
        relay
            .send(&RelayToControl::Hello {
                live: Vec::new(),
                relay_id: id.into(),
                have_version: None,
            })
            .await;
        relay
    }

    async fn send(&mut self, msg: &RelayToControl) {
        self.writer
            .write_all(&encode_line(msg))
            .await
            .expect("send");
    }

    async fn snapshot(&mut self) -> PolicySnapshot {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(1), self.reader.read_line(&mut line))
            .await
            .expect("a snapshot within 1 s")
            .expect("read");
        assert!(n > 0, "policy socket closed");
        let ControlToRelay::Snapshot(s) = decode_line(line.as_bytes()).expect("snapshot line")
        else {
            panic!("not a snapshot");
        };
        s
    }
}

fn audit_lines(dir: &Path) -> Vec<AuditEvent> {
    fs::read_to_string(dir.join("audit.jsonl"))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line"))
        .collect()
}

fn session_start(id: &str) -> AuditEvent {
    AuditEvent {
        seq: 0,
        ts_ms: 1000,
        origin: "relay-r1".into(),
        kind: AuditKind::SessionStart {
            protocol: psm_control_api::Protocol::Ssh,
            session_id: id.into(),
            user: "alice".into(),
            source: "127.0.0.1:5555".into(),
            target: "web01".into(),
            target_address: "127.0.0.1:22".into(),
            account: "root".into(),
            recording_id: format!("rec-{id}"),
            start_ms: 1000,
            justification: None,
            worker: None,
            recorded: true,
        },
    }
}

async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn relays_get_snapshots_and_send_audit_events() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let d = Daemon::start(&dir).await;
    for sock in ["control.sock", "policy.sock"] {
        let mode = fs::metadata(dir.join(sock))
            .expect("sock")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{sock}");
    }

    let mut relay = FakeRelay::connect(&dir, "r1").await;
    let first = relay.snapshot().await;
    assert_eq!(first.version, 1);
    assert!(first.recording_required);
    assert!(first.users.is_empty());

    let v1 = d
        .change(Request::UserAdd {
            name: "alice".into(),
            password: Some(Secret::new("correct horse battery".into())),
            ssh_keys: vec![USER_PUB.into()],
        })
        .await;
    let s = relay.snapshot().await;
    assert_eq!(s.version, v1);
    assert!(v1 > first.version);
    assert_eq!(s.users[0].ssh_keys, vec![USER_PUB.to_string()]);

    d.change(Request::TargetAdd {
        name: "web01".into(),
        address: "127.0.0.1:22".into(),
        host_key: USER_PUB.into(),
        protocol: Protocol::Ssh,
        listen: None,
    })
    .await;
    relay.snapshot().await;
    d.change(Request::AccountAdd {
        target: "web01".into(),
        username: "root".into(),
        credential: Credential::Password(Secret::new("hunter2".into())),
        domain: None,
    })
    .await;
    relay.snapshot().await;
    let v4 = d
        .change(Request::GrantAdd {
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            allow_env: Vec::new(),
            conditions: Default::default(),
        })
        .await;
    let s = relay.snapshot().await;
    assert_eq!(s.version, v4);
    let (_, account) = s
        .authorize_local("alice", "root", "web01")
        .expect("granted");
    assert_eq!(
        account.credential,
        Credential::Password(Secret::new("hunter2".into()))
    );

    // refused changes push nothing and say why
    let e = d
        .call(Request::GrantAdd {
            user: "bob".into(),
            target: "web01".into(),
            account: "root".into(),
            allow_env: Vec::new(),
            conditions: Default::default(),
        })
        .await
        .expect_err("unknown user");
    assert_eq!(e, "unknown user 'bob'");

    // a second relay gets the latest snapshot right away
    let mut relay2 = FakeRelay::connect(&dir, "r2").await;
    assert_eq!(relay2.snapshot().await.version, v4);

    // lists never carry secrets
    let accounts = d.call(Request::AccountList).await.expect("list");
    assert!(!accounts.to_string().contains("hunter2"));
    let status: StatusInfo =
        serde_json::from_value(d.call(Request::Status).await.expect("status")).expect("status");
    assert_eq!(status.version, v4);
    assert_eq!(status.relays.len(), 2);

    // audit events from a relay are numbered after control's own
    relay
        .send(&RelayToControl::Audit(session_start("s1")))
        .await;
    wait_for("session_start in the audit log", || {
        audit_lines(&dir).len() == 5
    })
    .await;
    let events = audit_lines(&dir);
    let me = Actor::lookup(nix::unistd::geteuid().as_raw());
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(events[3].origin, "control");
    assert_eq!(
        events[3].kind,
        AuditKind::AdminChange {
            action: "grant add".into(),
            object: "alice -> root@web01".into(),
            actor_uid: Some(me.uid),
            actor: me.name.clone(),
        }
    );
    assert!(matches!(events[4].kind, AuditKind::SessionStart { .. }));
    assert_eq!(events[4].origin, "relay-r1");
    let text = fs::read_to_string(dir.join("audit.jsonl")).expect("audit");
    assert!(!text.contains("hunter2"));

    let sessions: Vec<SessionInfo> =
        serde_json::from_value(d.call(Request::SessionsList).await.expect("sessions"))
            .expect("sessions");
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].relay, "r1");
    relay
        .send(&RelayToControl::Audit(AuditEvent {
            seq: 0,
            ts_ms: 2000,
            origin: "relay-r1".into(),
            kind: AuditKind::SessionEnd {
                protocol: psm_control_api::Protocol::Ssh,
                session_id: "s1".into(),
                user: "alice".into(),
                source: "127.0.0.1:5555".into(),
                target: "web01".into(),
                account: "root".into(),
                start_ms: 1000,
                end_ms: 2000,
                duration_ms: 1000,
                bytes_up: 1,
                bytes_down: 2,
                exit_status: Some(0),
                exit_signal: None,
                recording_id: "rec-s1".into(),
                reason: "client closed".into(),
                reason_code: "client_closed".into(),
                side: "client".into(),
                justification: None,
                unconfirmed_bytes: None,
            },
        }))
        .await;
    relay
        .send(&RelayToControl::Audit(session_start("s2")))
        .await;
    wait_for("two more events", || audit_lines(&dir).len() == 7).await;
    let sessions: Vec<SessionInfo> =
        serde_json::from_value(d.call(Request::SessionsList).await.expect("sessions"))
            .expect("sessions");
    assert_eq!(
        sessions
            .iter()
            .map(|s| s.session.session_id.as_str())
            .collect::<Vec<_>>(),
        vec!["s2"]
    );

    // a relay that goes away takes its live sessions with it
    drop(relay);
    let mut empty = false;
    for _ in 0..100 {
        let v = d.call(Request::SessionsList).await.expect("sessions");
        if v.as_array().is_some_and(|a| a.is_empty()) {
            empty = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(empty, "sessions of a gone relay are dropped");

    // a removal pushes too
    let v5 = d
        .change(Request::UserRemove {
            name: "alice".into(),
        })
        .await;
    let s = relay2.snapshot().await;
    assert_eq!(s.version, v5);
    assert!(s.grants.is_empty());

    d.stop().await;

    // the version and the audit sequence survive a restart
    let d = Daemon::start(&dir).await;
    let mut relay = FakeRelay::connect(&dir, "r1").await;
    assert_eq!(relay.snapshot().await.version, v5);
    let v6 = d
        .change(Request::TargetRemove {
            name: "web01".into(),
        })
        .await;
    assert_eq!(v6, v5 + 1);
    assert_eq!(relay.snapshot().await.version, v6);
    let events = audit_lines(&dir);
    // 8 events, the shutdown checkpoint (9), then the target removal
    assert_eq!(events.last().map(|e| e.seq), Some(10));
    assert!(
        events.iter().any(|e| matches!(&e.kind, AuditKind::Notice { kind: Some(k), .. } if k == "audit checkpoint")),
        "no shutdown checkpoint: {events:?}"
    );
    let before = audit_lines(&dir).len();
    // a relay cannot pass its events off as control's or another relay's
    for forged in ["control", "relay-r2"] {
        let e = AuditEvent {
            seq: 0,
            ts_ms: 1500,
            origin: forged.into(),
            kind: AuditKind::Notice {
                message: "forged origin".into(),
                session_id: None,
                kind: None,
                count: None,
            },
        };
        relay.send(&RelayToControl::Audit(e)).await;
    }
    wait_for("the forged events in the audit log", || {
        audit_lines(&dir).len() == before + 2
    })
    .await;
    let events = audit_lines(&dir);
    assert_eq!(events[before].origin, "relay-r1");
    assert_eq!(events[before + 1].origin, "relay-r1");
    d.stop().await;
}

#[tokio::test]
async fn mfa_required_by_configuration_is_in_every_snapshot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let d = Daemon::start_with(
        &dir,
        Options {
            mfa_required: true,
            ..Options::default()
        },
    )
    .await;
    let mut relay = FakeRelay::connect(&dir, "r1").await;
    assert!(relay.snapshot().await.mfa_required, "first snapshot");
    d.change(Request::GroupAdd {
        name: "ops".into(),
        targets: false,
    })
    .await;
    assert!(relay.snapshot().await.mfa_required, "after a change");
    d.stop().await;
}

#[tokio::test]
async fn the_daemon_checks_and_hashes_passwords_and_names_the_actor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let d = Daemon::start_with(
        &dir,
        Options {
            lockout: Default::default(),
            mfa_required: false,
            min_password_length: 20,
            ..Default::default()
        },
    )
    .await;
    let mut relay = FakeRelay::connect(&dir, "r1").await;
    relay.snapshot().await;
    let nineteen = "0123456789abcdefghi";
    let twenty = "0123456789abcdefghij";
    let add = |pw: &str| Request::UserAdd {
        name: "alice".into(),
        password: Some(Secret::new(pw.into())),
        ssh_keys: Vec::new(),
    };
    let e = d.call(add(nineteen)).await.expect_err("too short");
    assert_eq!(
        e,
        "password is too short: psm requires at least 20 characters"
    );
    // characters, not bytes: 19 two-byte characters are still too short
    let e = d.call(add(&"é".repeat(19))).await.expect_err("too short");
    assert!(e.contains("at least 20"), "{e}");
    let v = d.change(add(twenty)).await;
    let snap = relay.snapshot().await;
    assert_eq!(snap.version, v);
    let hash = snap.users[0].password.clone().expect("a verifier");
    assert!(hash.verify(twenty));

    let passwd = |pw: &str| Request::UserPasswd {
        name: "alice".into(),
        password: Secret::new(pw.into()),
    };
    let e = d.call(passwd(nineteen)).await.expect_err("too short");
    assert!(e.contains("at least 20"), "{e}");
    d.change(passwd("an even longer passphrase")).await;
    let snap = relay.snapshot().await;
    let hash = snap.users[0].password.clone().expect("a verifier");
    assert!(hash.verify("an even longer passphrase") && !hash.verify(twenty));

    // a client that hashes for itself (the old protocol) cannot skip the check
    let s = UnixStream::connect(dir.join("control.sock"))
        .await
        .expect("connect");
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(
        br#"{"cmd":"user_add","name":"bob","password":{"iterations":1,"salt":"AAAAAAAAAAA=","hash":"AAAA"}}
"#,
    )
    .await
    .expect("write");
    let mut line = String::new();
    r.read_line(&mut line).await.expect("read");
    let resp: Response = serde_json::from_str(&line).expect("response");
    assert!(
        resp.error
            .unwrap_or_default()
            .starts_with("malformed request"),
        "{line}"
    );

    // every change names who made it; no password is in the log
    let me = Actor::lookup(nix::unistd::geteuid().as_raw());
    let events = audit_lines(&dir);
    assert_eq!(
        events.len(),
        2,
        "refused changes are not audited: {events:?}"
    );
    for (e, action) in events.iter().zip(["user add", "user passwd"]) {
        assert_eq!(
            e.kind,
            AuditKind::AdminChange {
                action: action.into(),
                object: "alice".into(),
                actor_uid: Some(me.uid),
                actor: me.name.clone(),
            }
        );
    }
    if me.uid == 0 {
        assert_eq!(me.name.as_deref(), Some("root"));
    }
    let text = fs::read_to_string(dir.join("audit.jsonl")).expect("audit");
    assert!(!text.contains(twenty) && !text.contains("longer passphrase"));
    d.stop().await;
}

#[tokio::test]
async fn target_update_keeps_accounts_and_pushes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let d = Daemon::start(&dir).await;
    let mut relay = FakeRelay::connect(&dir, "r1").await;
    relay.snapshot().await;
    d.change(Request::UserAdd {
        name: "alice".into(),
        password: None,
        ssh_keys: vec![USER_PUB.into()],
    })
    .await;
    d.change(Request::TargetAdd {
        name: "web01".into(),
        address: "127.0.0.1:22".into(),
        host_key: USER_PUB.into(),
        protocol: Protocol::Ssh,
        listen: None,
    })
    .await;
    d.change(Request::AccountAdd {
        target: "web01".into(),
        username: "root".into(),
        credential: Credential::Password(Secret::new("hunter2".into())),
        domain: None,
    })
    .await;
    d.change(Request::GrantAdd {
        user: "alice".into(),
        target: "web01".into(),
        account: "root".into(),
        allow_env: Vec::new(),
        conditions: Default::default(),
    })
    .await;
    for _ in 0..4 {
        relay.snapshot().await;
    }
    let v = d
        .change(Request::TargetUpdate {
            name: "web01".into(),
            address: Some("127.0.0.1:2200".into()),
            host_key: Some(crate::testkeys::OTHER_PUB.into()),
        })
        .await;
    let snap = relay.snapshot().await;
    assert_eq!(snap.version, v);
    let (target, account) = snap
        .authorize_local("alice", "root", "web01")
        .expect("granted");
    assert_eq!(target.address, "127.0.0.1:2200");
    assert_eq!(target.host_key, crate::testkeys::OTHER_PUB);
    assert_eq!(account.username, "root");
    let e = d
        .call(Request::TargetUpdate {
            name: "db01".into(),
            address: Some("127.0.0.1:2200".into()),
            host_key: None,
        })
        .await
        .expect_err("unknown");
    assert_eq!(e, "unknown target 'db01'");
    let last = audit_lines(&dir).pop().expect("an event");
    match last.kind {
        AuditKind::AdminChange { action, object, .. } => {
            assert_eq!(action, "target update");
            assert!(
                object.starts_with("web01 (address 127.0.0.1:22 -> 127.0.0.1:2200, host key "),
                "{object}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    d.stop().await;
}

#[tokio::test]
async fn bad_requests_and_a_second_daemon_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let d = Daemon::start(&dir).await;
    let e = run_until(dir.clone(), async {})
        .await
        .expect_err("second daemon");
    assert!(e.to_string().contains("already serving"), "{e}");

    // raw protocol: malformed line, then a good one on the same connection
    let s = UnixStream::connect(dir.join("control.sock"))
        .await
        .expect("connect");
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"{\"cmd\":\"launch_missiles\"}\n{\"cmd\":\"user_list\"}\n")
        .await
        .expect("write");
    let mut line = String::new();
    r.read_line(&mut line).await.expect("read");
    let resp: Response = serde_json::from_str(&line).expect("response");
    assert!(!resp.ok);
    assert!(resp
        .error
        .unwrap_or_default()
        .starts_with("malformed request"));
    line.clear();
    r.read_line(&mut line).await.expect("read");
    assert_eq!(line, "{\"ok\":true,\"result\":[]}\n");

    // a relay that does not say hello gets nothing, and the daemon carries on
    let mut bad = UnixStream::connect(dir.join("policy.sock"))
        .await
        .expect("connect");
    bad.write_all(b"{\"type\":\"bogus\"}\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), bad.read_to_end(&mut buf))
        .await
        .expect("closed")
        .expect("read");
    assert_eq!(n, 0);
    assert!(d.call(Request::UserList).await.is_ok());
    d.stop().await;
}

/// Sends `n` approval-list calls from `relay` and waits for the answer to the last: each answer
/// was broadcast to every relay by then.
async fn flood(relay: &mut FakeRelay, corr: &mut u64, n: u64) {
    for _ in 0..n {
        *corr += 1;
        relay
            .send(&RelayToControl::Approval {
                corr: *corr,
                op: psm_control_api::ApprovalOp::List {
                    user: "nobody".into(),
                },
            })
            .await;
    }
    let last = *corr;
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), relay.reader.read_line(&mut line))
            .await
            .expect("answers within 10 s")
            .expect("read");
        assert!(n > 0, "policy socket closed");
        if let Ok(ControlToRelay::ApprovalReply { corr, .. }) = decode_line(line.as_bytes()) {
            if corr == last {
                return;
            }
        }
    }
}

/// A relay that stops reading falls behind the broadcast of kills and approval replies; the
/// messages it missed are gone from the channel, but a kill of one of its sessions is not lost:
/// it is sent again once the relay reads again.
#[tokio::test]
async fn a_relay_that_falls_behind_the_broadcast_still_gets_its_sessions_kill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let d = Daemon::start(&dir).await;
    let mut slow = FakeRelay::connect(&dir, "r1").await;
    slow.snapshot().await;
    slow.send(&RelayToControl::Audit(session_start("s1"))).await;
    let mut busy = FakeRelay::connect(&dir, "r2").await;
    busy.snapshot().await;
    // `busy` asks for approval lists: every answer is broadcast to both relays, and `slow`
    // reads nothing, so its socket fills and the broadcast channel (1,024) laps it
    let mut corr = 0u64;
    let mut listed = false;
    for _ in 0..100 {
        let v = d.call(Request::SessionsList).await.expect("sessions");
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(listed, "s1 is a live session");
    flood(&mut busy, &mut corr, 6000).await;
    d.call(Request::SessionKill {
        session_id: "s1".into(),
        reason: Some("the kill that matters".into()),
    })
    .await
    .expect("kill accepted");
    flood(&mut busy, &mut corr, 3000).await;

    // `slow` reads again: the kill of s1 reaches it
    let killed = async {
        loop {
            let mut line = String::new();
            let n = slow.reader.read_line(&mut line).await.expect("read");
            assert!(n > 0, "policy socket closed");
            if let Ok(ControlToRelay::Kill {
                session_id, reason, ..
            }) = decode_line(line.as_bytes())
            {
                assert_eq!(session_id, "s1");
                assert_eq!(reason, "the kill that matters");
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), killed)
        .await
        .expect("the kill of s1 reaches the relay that fell behind");
    d.stop().await;
}

/// A session control learnt of from its session_start, announced again by its relay after a
/// reconnection, then lost with the relay: the session_end control writes names the protocol
/// the session_start did (RDP here), not SSH.
#[tokio::test]
async fn a_lost_rdp_session_ends_as_rdp_after_its_relay_reconnected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let d = Daemon::start_with(
        &dir,
        Options {
            relay_lost_grace: Duration::from_millis(200),
            ..Options::default()
        },
    )
    .await;
    let mut start = session_start("r1");
    // stamped now (the fixture's 1970 stamp would make the audit log rotate it away at once)
    start.ts_ms = 0;
    if let AuditKind::SessionStart { protocol, .. } = &mut start.kind {
        *protocol = Protocol::Rdp;
    }
    let live = match &start.kind {
        AuditKind::SessionStart {
            session_id,
            user,
            source,
            target,
            target_address,
            account,
            recording_id,
            start_ms,
            ..
        } => psm_control_api::LiveSession {
            session_id: session_id.clone(),
            user: user.clone(),
            source: source.clone(),
            target: target.clone(),
            target_address: target_address.clone(),
            account: account.clone(),
            recording_id: recording_id.clone(),
            recorded: true,
            start_ms: *start_ms,
            justification: None,
            worker: None,
        },
        _ => unreachable!(),
    };
    let mut relay = FakeRelay::connect(&dir, "relay-a").await;
    relay.snapshot().await;
    relay.send(&RelayToControl::Audit(start)).await;
    let logged = |dir: &Path, end: bool| {
        audit_lines(dir).into_iter().find(|e| match e.kind {
            AuditKind::SessionStart { .. } => !end,
            AuditKind::SessionEnd { .. } => end,
            _ => false,
        })
    };
    let mut seen = None;
    for _ in 0..500 {
        seen = logged(&dir, false);
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen.expect("the session_start is logged within 5 s");
    drop(relay);
    // the relay comes back and announces the session again
    let s = UnixStream::connect(dir.join("policy.sock"))
        .await
        .expect("connect policy.sock");
    let (r, w) = s.into_split();
    let mut back = FakeRelay {
        reader: BufReader::new(r),
        writer: w,
    };
    back.send(&RelayToControl::Hello {
        live: vec![live],
        relay_id: "relay-a".into(),
        have_version: None,
    })
    .await;
    back.snapshot().await;
    drop(back);
    let mut end = None;
    for _ in 0..500 {
        end = logged(&dir, true);
        if end.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = end.expect("control ends the lost session within 5 s");
    let AuditKind::SessionEnd {
        protocol,
        reason_code,
        session_id,
        ..
    } = &end.kind
    else {
        unreachable!()
    };
    assert_eq!(session_id, "r1");
    assert_eq!(reason_code, "relay_lost");
    assert_eq!(*protocol, Protocol::Rdp, "{end:?}");
    d.stop().await;
}

#[tokio::test]
async fn a_data_directory_of_another_user_is_refused_at_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    init_data_dir(&dir).expect("init");
    let me = nix::unistd::geteuid().as_raw();
    let other = if me == 4242 { 4343 } else { 4242 };
    if std::os::unix::fs::chown(&dir, Some(other), None).is_err() {
        panic!("this test must run as root: it chowns a directory to uid {other}");
    }
    let e = run_until(dir.clone(), std::future::pending())
        .await
        .expect_err("refused");
    assert!(
        matches!(e, ControlError::NotOwner { owner, .. } if owner == other),
        "{e}"
    );
    assert!(
        e.to_string().contains(&format!("owned by uid {other}")),
        "{e}"
    );
    assert!(!dir.join("control.sock").exists(), "no socket left behind");
    // an empty directory of another user: refused before anything is written into it
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::chown(&empty, Some(other), None).expect("chown");
    let e = run_until(empty.clone(), std::future::pending())
        .await
        .expect_err("refused");
    assert!(
        matches!(e, ControlError::NotOwner { owner, .. } if owner == other),
        "{e}"
    );
    assert_eq!(fs::read_dir(&empty).expect("read_dir").count(), 0);
}

#[tokio::test]
async fn only_the_data_directory_owner_may_connect() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    init_data_dir(&dir).expect("init");
    let d = Daemon::start(&dir).await;
    // Open the directory and both sockets to everybody, as a careless operator might: the
    // peer-credential check still refuses a stranger.
    for (p, mode) in [
        (tmp.path().to_path_buf(), 0o755),
        (dir.clone(), 0o755),
        (dir.join("control.sock"), 0o666),
        (dir.join("policy.sock"), 0o666),
    ] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let stranger = async |socket: &str, line: &str| {
        let out = tokio::process::Command::new("setpriv")
            .args([
                "--reuid=4242",
                "--regid=4242",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(
                "import socket,sys\n\
                 s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n\
                 data=b''\n\
                 try:\n\
                 \x20 if sys.argv[2]: s.sendall(sys.argv[2].encode())\n\
                 \x20 while True:\n\
                 \x20   b=s.recv(65536)\n\
                 \x20   if not b: break\n\
                 \x20   data+=b\n\
                 except (ConnectionResetError, BrokenPipeError):\n\
                 \x20 pass\n\
                 sys.stdout.write(data.decode())",
            )
            .arg(dir.join(socket))
            .arg(line)
            .output()
            .await
            .expect("setpriv (util-linux) runs");
        assert!(
            out.status.success(),
            "stranger client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // the refusal comes unasked, before any request is read
    let answer = stranger("control.sock", "").await;
    assert!(answer.contains("permission denied: uid 4242"), "{answer}");
    let hello = String::from_utf8(encode_line(&RelayToControl::Hello {
        live: Vec::new(),
        relay_id: "x".into(),
        have_version: None,
    }))
    .expect("utf8");
    assert_eq!(
        stranger("policy.sock", &hello).await,
        "",
        "no snapshot for a stranger"
    );
    assert!(
        d.call(Request::UserList).await.is_ok(),
        "the owner still is served"
    );
    d.stop().await;
}
