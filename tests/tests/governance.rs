//! Policy that governs sessions (issue #6), against real OpenSSH and asyncssh: TOTP second
//! factor (right, wrong, replayed, lockout and unlock, MFA cache), grant conditions (source
//! networks, time windows, maximum duration, idle timeout), channel kinds, groups and target
//! groups, the auditor's questions, and live control (kill, revocation, disable), each ending a
//! live session within a second.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use psm_tests::*;

fn py(script: &str) -> Command {
    let mut c = Command::new(python3());
    c.arg(format!("{}/py/{script}", env!("CARGO_MANIFEST_DIR")));
    c
}

fn account() -> String {
    format!("{TARGET_USER}@web01")
}

/// Enrols alice for TOTP; returns her secret (base32) from the printed URI.
fn enroll(w: &World) -> String {
    enroll_user(w, "alice")
}

/// Enrols `user` for TOTP; returns the secret (base32) from the printed URI.
fn enroll_user(w: &World, user: &str) -> String {
    let out = w.psm.psmctl_ok(&["user", "mfa", "enroll", user], None);
    assert!(
        out.contains(&format!("otpauth://totp/psm:{user}?secret=")) && out.contains("issuer=psm"),
        "{out}"
    );
    assert!(
        out.contains('█') || out.contains('▀') || out.contains('▄'),
        "a QR code is drawn:\n{out}"
    );
    let start = out.find("secret=").expect("secret") + "secret=".len();
    out[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// The TOTP code of `secret` for the time step `offset` steps from now.
fn code(secret: &str, offset: i64) -> String {
    let raw = totp_rs::Secret::Encoded(secret.to_string())
        .to_bytes()
        .expect("base32");
    let t =
        totp_rs::TOTP::new_unchecked(totp_rs::Algorithm::SHA1, 6, 1, 30, raw, None, String::new());
    let now = psm_control_api_now_secs() as i64 + offset * 30;
    t.generate(now as u64)
}

fn psm_control_api_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mfa_login(w: &World, code: &str, source: Option<&str>) -> CmdOut {
    let mut c = py("mfa_login.py");
    c.arg(w.psm.port().to_string())
        .arg(alice_login())
        .arg(&w.alice_key)
        .arg(code)
        .arg("echo mfa-ok");
    if let Some(s) = source {
        c.arg(s);
    }
    run_cmd(&mut c, None, CMD_TIMEOUT)
}

#[test]
fn totp_right_wrong_replayed_then_lockout_and_unlock() {
    let w = World::new();
    let secret = enroll(&w);
    w.regrant(&["--mfa"]);
    // the key alone is not enough any more
    let out = run_ssh(w.ssh().arg("true"));
    assert!(!out.success(), "{}", out.describe());
    // a wrong code is refused and audited as such
    let bad = if code(&secret, 0) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let out = mfa_login(&w, bad, None);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert!(
        out.stdout_str().contains("prompt: psm verification code: "),
        "{}",
        out.describe()
    );
    w.psm.wait_audit("wrong code", Duration::from_secs(5), |e| {
        jstr(e, "event") == "auth_failure" && jstr(e, "reason") == "wrong verification code"
    });
    // the right one works
    let right = code(&secret, 0);
    let out = mfa_login(&w, &right, None);
    assert!(
        out.success() && out.stdout_str().contains("mfa-ok"),
        "{}",
        out.describe()
    );
    w.psm
        .wait_audit("totp success", Duration::from_secs(5), |e| {
            jstr(e, "event") == "auth_success" && jstr(e, "method") == "publickey+totp"
        });
    // ... once
    let out = mfa_login(&w, &right, None);
    assert_eq!(out.code(), Some(3), "replayed code: {}", out.describe());
    w.psm.wait_audit("replay", Duration::from_secs(5), |e| {
        jstr(e, "event") == "auth_failure" && jstr(e, "reason") == "verification code already used"
    });
    // 5 failures since the last success lock alice
    for _ in 0..4 {
        let out = mfa_login(&w, bad, None);
        assert_eq!(out.code(), Some(3), "{}", out.describe());
    }
    w.psm.wait_audit("lock", Duration::from_secs(5), |e| {
        jstr(e, "event") == "notice" && jstr(e, "kind") == "user locked"
    });
    let users = w.psm.psmctl_ok(&["user", "list"], None);
    assert!(users.contains("locked"), "{users}");
    // locked: even the next valid code gets the same refusal; the audit log says why
    let next = code(&secret, 1);
    let mark = w.psm.audit_mark();
    let out = mfa_login(&w, &next, None);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    w.psm
        .wait_audit_after(mark, "locked refusal", Duration::from_secs(5), |e| {
            jstr(e, "event") == "auth_failure" && jstr(e, "reason") == "locked"
        });
    w.psm.psmctl_ok(&["user", "unlock", "alice"], None);
    let mut last = None;
    assert!(
        wait_for(Duration::from_secs(5), || {
            let out = mfa_login(&w, &next, None);
            let ok = out.success();
            last = Some(out);
            ok
        }),
        "after unlock: {}",
        last.map(|o| o.describe()).unwrap_or_default()
    );
    // reset removes the enrolment: MFA can no longer be passed
    w.psm.psmctl_ok(&["user", "mfa", "reset", "alice"], None);
    let out = mfa_login(&w, &code(&secret, 1), None);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
}

#[test]
fn mfa_cache_hit_from_the_same_address_and_miss_from_another() {
    let w = World::new();
    let secret = enroll(&w);
    w.regrant(&["--mfa-cache", "1h"]);
    let out = mfa_login(&w, &code(&secret, 0), Some("127.0.0.1"));
    assert!(out.success(), "{}", out.describe());
    // hit: the key alone from the same address
    let out = run_ssh(w.ssh().arg("echo cached"));
    assert!(
        out.success() && out.stdout_str().contains("cached"),
        "{}",
        out.describe()
    );
    // miss: another address must answer the prompt again
    let out = run_ssh(w.ssh().args(["-b", "127.0.0.2"]).arg("echo cached"));
    assert!(!out.success(), "{}", out.describe());
    let out = mfa_login(&w, &code(&secret, 1), Some("127.0.0.2"));
    assert!(out.success(), "{}", out.describe());
}

#[test]
fn source_networks_and_time_windows_allow_and_refuse() {
    let w = World::new();
    w.regrant(&["--from", "127.0.0.2/32"]);
    let out = run_ssh(w.ssh().arg("echo hi"));
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr_str().contains("may not be used from 127.0.0.1"),
        "{}",
        out.describe()
    );
    w.psm
        .wait_audit("source denial", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_denied" && jstr(e, "reason").contains("127.0.0.2/32")
        });
    let out = run_ssh(w.ssh().args(["-b", "127.0.0.2"]).arg("echo hi"));
    assert!(
        out.success() && out.stdout_str().contains("hi"),
        "{}",
        out.describe()
    );
    // a window that holds now, and one that does not (both in UTC, by the clock of this run)
    let now = psm_control_api_now_secs();
    let minute = (now / 60) % (24 * 60);
    let hm = |m: u64| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let open = format!(
        "{}-{}",
        hm(minute.saturating_sub(2)),
        hm((minute + 3) % 1440)
    );
    let closed = format!("{}-{}", hm((minute + 10) % 1440), hm((minute + 20) % 1440));
    w.regrant(&["--days", "all", "--hours", &closed, "--tz", "UTC"]);
    let out = run_ssh(w.ssh().arg("echo hi"));
    assert!(
        !out.success() && out.stderr_str().contains("is not available now"),
        "{}",
        out.describe()
    );
    if minute >= 2 && minute + 3 < 1440 {
        w.regrant(&["--days", "all", "--hours", &open, "--tz", "UTC"]);
        let out = run_ssh(w.ssh().arg("echo hi"));
        assert!(out.success(), "{}", out.describe());
    }
    // a zone the relay could not evaluate is refused by psmctl, not at connect time
    let bad = w.psm.psmctl(
        &[
            "grant",
            "add",
            "alice",
            &account(),
            "--days",
            "mon",
            "--tz",
            "Mars/Olympus",
        ],
        None,
    );
    assert!(
        !bad.success() && bad.stderr_str().contains("unknown time zone"),
        "{}",
        bad.describe()
    );
}

/// Starts `ssh alice@… COMMAND` in the background.
fn background(w: &World, command: &str) -> Child {
    let mut c = w.ssh();
    c.arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("ssh")
}

fn live_session(w: &World) -> String {
    let mut id = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let list = w.psm.psmctl_ok(&["sessions", "list", "--json"], None);
            let v: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
            id = v
                .as_array()
                .and_then(|a| a.first())
                .map(|s| jstr(s, "session_id").to_string())
                .unwrap_or_default();
            !id.is_empty()
        }),
        "no live session"
    );
    // the session is live once its command runs, not when it is listed
    w.psm
        .wait_audit("the exec accepted", Duration::from_secs(10), |e| {
            jstr(e, "event") == "channel_request"
                && jstr(e, "session_id") == id
                && jstr(e, "request") == "exec"
                && e["accepted"] == true
        });
    id
}

/// Waits for the background ssh to end; returns its stderr and how long it took.
fn ended(child: Child, since: Instant) -> (String, Duration) {
    ended_within(child, since, Duration::from_secs(15))
}

/// Like [`ended`], waiting up to `timeout`.
fn ended_within(mut child: Child, since: Instant, timeout: Duration) -> (String, Duration) {
    let st = wait_child(&mut child, timeout);
    let took = since.elapsed();
    assert!(st.is_some(), "the session did not end");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut err);
    }
    (err, took)
}

fn end_event(w: &World, id: &str) -> serde_json::Value {
    w.psm
        .wait_audit("session_end", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_end" && jstr(e, "session_id") == id
        })
}

#[test]
fn kill_revocation_and_disable_end_live_sessions_within_a_second() {
    let w = World::new();
    // kill
    let child = background(&w, "sleep 30");
    let id = live_session(&w);
    let t = Instant::now();
    w.psm
        .psmctl_ok(&["sessions", "kill", &id, "--reason", "incident 42"], None);
    let (err, took) = ended(child, t);
    assert!(took < Duration::from_secs(1), "kill took {took:?}");
    assert!(
        err.contains("psm: session ended by an operator: incident 42"),
        "{err}"
    );
    let e = end_event(&w, &id);
    assert_eq!(
        (jstr(&e, "reason_code"), jstr(&e, "side")),
        ("operator_kill", "operator")
    );
    assert!(jstr(&e, "reason").contains("incident 42"), "{e}");
    // revocation
    let child = background(&w, "sleep 30");
    let id = live_session(&w);
    let t = Instant::now();
    w.psm
        .psmctl_ok(&["grant", "remove", "alice", &account()], None);
    let (err, took) = ended(child, t);
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert!(
        err.contains("psm: session ended: access was revoked"),
        "{err}"
    );
    let e = end_event(&w, &id);
    assert_eq!(
        (jstr(&e, "reason_code"), jstr(&e, "side")),
        ("grant_revoked", "policy")
    );
    // disable
    w.psm
        .psmctl_ok(&["grant", "add", "alice", &account()], None);
    w.wait_session_works(&alice_login(), Duration::from_secs(5));
    let child = background(&w, "sleep 30");
    let id = live_session(&w);
    let t = Instant::now();
    w.psm.psmctl_ok(&["user", "disable", "alice"], None);
    let (err, took) = ended(child, t);
    assert!(took < Duration::from_secs(1), "disable took {took:?}");
    assert!(err.contains("psm: session ended"), "{err}");
    assert_eq!(jstr(&end_event(&w, &id), "reason_code"), "user_disabled");
    // a disabled user cannot log in; the audit log says why
    let out = run_ssh(w.ssh().arg("true"));
    assert!(!out.success());
    w.psm.wait_audit("disabled", Duration::from_secs(5), |e| {
        jstr(e, "event") == "auth_failure" && jstr(e, "reason") == "disabled"
    });
    w.psm.psmctl_ok(&["user", "enable", "alice"], None);
    w.wait_session_works(&alice_login(), Duration::from_secs(5));
    let none = w.psm.psmctl(&["sessions", "kill", "nope"], None);
    assert!(
        !none.success() && none.stderr_str().contains("no live session"),
        "{}",
        none.describe()
    );
}

/// An unrecorded session lasts only while the grant in force says `--unrecorded`: once a grant
/// that records decides instead, the session ends (it cannot be recorded from the middle).
#[test]
fn an_unrecorded_session_ends_when_a_recording_grant_takes_over() {
    let w = World::new();
    w.regrant(&["--unrecorded"]);
    w.wait_session_works(&alice_login(), Duration::from_secs(5));
    let child = background(&w, "sleep 30");
    let id = live_session(&w);
    // a second, recording grant after it (through a group): the first still decides, and the
    // session goes on
    w.psm.psmctl_ok(&["group", "add", "ops"], None);
    w.psm
        .psmctl_ok(&["group", "member", "add", "ops", "alice"], None);
    w.psm.psmctl_ok(&["grant", "add", "@ops", &account()], None);
    let mark = w.psm.audit_mark();
    let probe = run_ssh(w.ssh().arg("echo still-unrecorded"));
    assert_eq!(
        probe.stdout_str(),
        "still-unrecorded\n",
        "{}",
        probe.describe()
    );
    let start = w.psm.wait_audit_after(
        mark,
        "the probe's session_start",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_start",
    );
    assert_eq!(
        start.get("recorded"),
        Some(&serde_json::Value::Bool(false)),
        "the first grant no longer decides: {start}"
    );
    assert!(
        w.psm
            .psmctl_ok(&["sessions", "list", "--json"], None)
            .contains(&id),
        "the session ended under its own grant"
    );
    // the unrecorded grant goes: the recording one decides, and the session ends
    let t = Instant::now();
    w.psm
        .psmctl_ok(&["grant", "remove", "alice", &account()], None);
    let (err, took) = ended(child, t);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        err.contains("psm: session ended: the session must now be recorded"),
        "{err}"
    );
    let e = end_event(&w, &id);
    assert_eq!(
        (jstr(&e, "reason_code"), jstr(&e, "side")),
        ("recording_required", "policy")
    );
    // and the next session is recorded
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo recorded-now"));
    assert_eq!(out.stdout_str(), "recorded-now\n", "{}", out.describe());
    let start = w
        .psm
        .wait_audit_after(mark, "session_start", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_start"
        });
    assert!(start.get("recorded").is_none(), "{start}");
}

#[test]
fn maximum_duration_and_idle_timeout_end_sessions_with_a_message() {
    let w = World::new();
    w.regrant(&["--max-duration", "2s"]);
    let t = Instant::now();
    let out = run_ssh(w.ssh().arg("sleep 20"));
    let took = t.elapsed();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(
        out.stderr_str()
            .contains("psm: session ended: maximum duration of 2s reached"),
        "{}",
        out.describe()
    );
    let e = w
        .psm
        .wait_audit("max duration", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_end" && jstr(e, "reason_code") == "max_duration"
        });
    assert_eq!(jstr(&e, "side"), "policy");
    w.regrant(&["--idle-timeout", "2s"]);
    let out = run_ssh(w.ssh().arg("sleep 20"));
    assert!(
        out.stderr_str()
            .contains("psm: session ended: idle timeout of 2s reached"),
        "{}",
        out.describe()
    );
    w.psm.wait_audit("idle", Duration::from_secs(5), |e| {
        jstr(e, "event") == "session_end" && jstr(e, "reason_code") == "idle_timeout"
    });
}

#[test]
fn channel_kinds_are_allowed_or_refused_with_a_reason() {
    let w = World::new();
    w.regrant(&["--allow", "shell"]);
    let out = run_ssh(w.ssh().arg("echo hi"));
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr_str()
            .contains("psm: exec sessions are not permitted by policy"),
        "{}",
        out.describe()
    );
    w.regrant(&["--allow", "exec"]);
    let out = run_ssh(w.ssh().arg("echo hi"));
    assert!(
        out.success() && out.stdout_str().contains("hi"),
        "{}",
        out.describe()
    );
    let batch = w.psm.work_dir().join("batch");
    std::fs::write(&batch, "pwd\n").expect("batch");
    let out = run_cmd(&mut w.sftp(&batch), None, CMD_TIMEOUT);
    assert!(!out.success(), "sftp refused: {}", out.describe());
    w.psm
        .wait_audit("refused channel", Duration::from_secs(5), |e| {
            jstr(e, "event") == "channel_request"
                && jstr(e, "request") == "subsystem"
                && e["accepted"] == false
        });
    // a forward to a destination the grant does not list is refused
    let bad = w.psm.psmctl(
        &[
            "grant",
            "add",
            "alice",
            &account(),
            "--forward-to",
            "db:5432",
        ],
        None,
    );
    assert!(!bad.success() && bad.stderr_str().contains("needs --allow forward-local"));
    // a grant for legacy scp alone: an exec that runs scp and then more is an exec, refused
    w.regrant(&["--allow", "scp"]);
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("scp -t /tmp/psm-scp-only; echo ran-more"));
    assert!(!out.success(), "{}", out.describe());
    assert!(!out.stdout_str().contains("ran-more"), "{}", out.describe());
    assert!(
        out.stderr_str()
            .contains("psm: exec sessions are not permitted by policy"),
        "{}",
        out.describe()
    );
    w.psm
        .wait_audit_after(mark, "refused exec", Duration::from_secs(5), |e| {
            jstr(e, "event") == "channel_request"
                && jstr(e, "request") == "exec"
                && e["accepted"] == false
        });
}

#[test]
fn groups_target_groups_and_the_auditors_questions() {
    let w = World::new();
    w.psm
        .psmctl_ok(&["grant", "remove", "alice", &account()], None);
    w.psm.psmctl_ok(&["group", "add", "ops"], None);
    w.psm
        .psmctl_ok(&["group", "member", "add", "ops", "alice"], None);
    w.psm.psmctl_ok(&["target-group", "add", "prod"], None);
    w.psm
        .psmctl_ok(&["target-group", "member", "add", "prod", "web01"], None);
    let out = run_ssh(w.ssh().arg("true"));
    assert!(!out.success(), "no grant yet: {}", out.describe());
    let acct = format!("{TARGET_USER}@@prod");
    w.psm.psmctl_ok(
        &["grant", "add", "@ops", &acct, "--max-duration", "8h"],
        None,
    );
    w.wait_session_works(&alice_login(), Duration::from_secs(5));
    let check = w
        .psm
        .psmctl(&["policy", "check", "alice", &account()], None);
    assert!(check.success(), "{}", check.describe());
    let text = check.stdout_str();
    assert!(
        text.contains("allowed")
            && text.contains("@ops")
            && text.contains("through group @ops")
            && text.contains("max duration 8h"),
        "{text}"
    );
    let check = w.psm.psmctl(&["policy", "check", "bob", &account()], None);
    assert_eq!(check.code(), Some(1), "{}", check.describe());
    assert!(
        check.stdout_str().contains("denied"),
        "{}",
        check.describe()
    );
    let who = w
        .psm
        .psmctl_ok(&["policy", "who-can-reach", &account()], None);
    assert!(
        who.contains("alice") && who.contains("through group @ops"),
        "{who}"
    );
    // leaving the group revokes
    w.psm
        .psmctl_ok(&["group", "member", "remove", "ops", "alice"], None);
    let out = run_ssh(w.ssh().arg("true"));
    assert!(!out.success(), "{}", out.describe());
    let groups = w.psm.psmctl_ok(&["target-group", "list"], None);
    assert!(
        groups.contains("@prod") && groups.contains("web01"),
        "{groups}"
    );
}

fn kbdint(w: &World, login: &str, answers: &str, command: &str) -> CmdOut {
    let mut c = py("mfa_login.py");
    c.arg(w.psm.port().to_string())
        .arg(login)
        .arg(&w.alice_key)
        .arg(answers)
        .arg(command);
    run_cmd(&mut c, None, CMD_TIMEOUT)
}

#[test]
fn a_required_reason_is_asked_and_kept_with_the_session() {
    let w = World::new();
    w.regrant(&["--reason-required"]);
    // a client that cannot answer is not let in
    let out = run_ssh(w.ssh().arg("true"));
    assert!(!out.success(), "{}", out.describe());
    let out = kbdint(
        &w,
        &alice_login(),
        "CHG-4711 patch openssl",
        "echo with-reason",
    );
    assert!(
        out.success() && out.stdout_str().contains("with-reason"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout_str().contains(&format!(
            "prompt: psm: reason or ticket for {}: ",
            account()
        )),
        "{}",
        out.describe()
    );
    let start = w
        .psm
        .wait_audit("session_start", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_start"
                && jstr(e, "justification") == "CHG-4711 patch openssl"
        });
    let id = jstr(&start, "session_id").to_string();
    let end = end_event(&w, &id);
    assert_eq!(jstr(&end, "justification"), "CHG-4711 patch openssl");
}

#[test]
fn a_login_without_a_target_gets_a_menu_of_what_it_may_use_now() {
    let w = World::new();
    // a second account, and a grant outside its window that must not be offered
    w.psm.psmctl_ok(
        &["account", "add", "nobody@web01", "--password-stdin"],
        Some("x-unused-pw\n"),
    );
    w.psm.psmctl_ok(
        &[
            "grant",
            "add",
            "alice",
            "nobody@web01",
            "--days",
            "all",
            "--hours",
            "00:00-00:01",
            "--tz",
            "Pacific/Kiritimati",
        ],
        None,
    );
    let now_min = (psm_control_api_now_secs() / 60 + 14 * 60) % (24 * 60);
    let offered_nobody = now_min == 0;
    let mark = w.psm.audit_mark();
    let out = kbdint(&w, "alice", "1", "echo from-menu; id -un");
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_str();
    assert!(text.contains("psm: accounts you may use now:"), "{text}");
    assert!(text.contains(&format!("1) {}", account())), "{text}");
    if !offered_nobody {
        assert!(!text.contains("nobody@web01"), "{text}");
    }
    assert!(
        text.contains("prompt: psm: choose an account (number): "),
        "{text}"
    );
    // the command ran as the account: its output lines, not the menu's
    assert!(
        text.lines().any(|l| l == "from-menu") && text.lines().any(|l| l == TARGET_USER),
        "{text}"
    );
    // the session is recorded and audited as if alice had named the account
    w.psm
        .wait_audit_after(mark, "menu session", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_start"
                && jstr(e, "account") == TARGET_USER
                && jstr(e, "user") == "alice"
        });
    // a wrong choice is asked again
    let out = kbdint(&w, "alice", "9|1", "echo second-try");
    assert!(
        out.success() && out.stdout_str().contains("second-try"),
        "{}",
        out.describe()
    );
}

/// alice's grant asks one approval from the group secops (`members`), within `timeout`.
fn dual_control(w: &World, members: &[&str], timeout: &str) {
    w.psm.psmctl_ok(&["group", "add", "secops"], None);
    for u in members {
        w.psm
            .psmctl_ok(&["group", "member", "add", "secops", u], None);
    }
    w.regrant(&[
        "--approval",
        "1",
        "--approvers",
        "@secops",
        "--approval-timeout",
        timeout,
    ]);
}

/// alice's login waiting for approval, in the background (asyncssh answers the dialogue).
fn waiting_login(w: &World) -> std::process::Child {
    let mut c = py("mfa_login.py");
    c.arg(w.psm.port().to_string())
        .arg(alice_login())
        .arg(&w.alice_key)
        .arg("")
        .arg("echo approved-ok")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("python3")
}

fn child_output(mut child: std::process::Child) -> (Option<i32>, String) {
    let st = wait_child(&mut child, Duration::from_secs(30)).and_then(|s| s.code());
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read as _;
        let _ = o.read_to_string(&mut out);
    }
    (st, out)
}

#[test]
fn dual_control_approved_denied_and_timed_out() {
    let w = World::new();
    let bob = w.add_user_with_key("bob");
    let carol = w.add_user_with_key("carol");
    dual_control(&w, &["bob", "carol"], "3s");
    // approved
    let mark = w.psm.audit_mark();
    let child = waiting_login(&w);
    let id = w.psm.approval_requested(mark);
    let list = run_ssh(w.ssh_as("bob", &bob).arg("requests list"));
    assert!(list.success(), "{}", list.describe());
    assert!(
        list.stdout_str()
            .contains(&format!("{id}\talice\t{}", account())),
        "{}",
        list.describe()
    );
    // alice is not an approver; bob may not vote twice
    let out = run_ssh(w.ssh_as("bob", &bob).arg(format!("requests approve {id}")));
    assert!(
        out.success() && out.stdout_str().contains("approved"),
        "{}",
        out.describe()
    );
    let (code, text) = child_output(child);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("waiting for approval of request {id}")),
        "{text}"
    );
    assert!(text.contains("approved-ok"), "{text}");
    let again = run_ssh(w.ssh_as("bob", &bob).arg(format!("requests approve {id}")));
    assert!(
        !again.success() && again.stdout_str().contains("already decided"),
        "{}",
        again.describe()
    );
    // denied, with a reason the user sees
    let mark = w.psm.audit_mark();
    let child = waiting_login(&w);
    let id = w.psm.approval_requested(mark);
    let out = run_ssh(
        w.ssh_as("carol", &carol)
            .arg(format!("requests deny {id} --reason not during the freeze")),
    );
    assert!(out.success(), "{}", out.describe());
    let (code, text) = child_output(child);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(&format!(
            "request {id} was denied by carol: not during the freeze"
        )),
        "{text}"
    );
    w.psm.wait_audit("denied", Duration::from_secs(5), |e| {
        jstr(e, "event") == "approval" && jstr(e, "action") == "denied" && jstr(e, "by") == "carol"
    });
    // timed out
    let mark = w.psm.audit_mark();
    let child = waiting_login(&w);
    let id = w.psm.approval_requested(mark);
    let (code, text) = child_output(child);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(&format!("request {id} was not approved in time")),
        "{text}"
    );
    w.psm.wait_audit("expired", Duration::from_secs(5), |e| {
        jstr(e, "event") == "approval" && jstr(e, "action") == "expired"
    });
    let all = w.psm.psmctl_ok(&["requests", "list"], None);
    assert!(
        all.contains("approved by bob")
            && all.contains("denied by carol")
            && all.contains("expired"),
        "{all}"
    );
}

/// A client that never answers the "waiting for approval" step: asyncssh, holding that
/// challenge unanswered; prints how long the gateway kept the connection.
const SILENT_AT_APPROVAL: &str = r#"
import asyncio, sys, time
import asyncssh

class Client(asyncssh.SSHClient):
    def kbdint_auth_requested(self):
        return ""
    async def kbdint_challenge_received(self, name, instructions, lang, prompts):
        if "waiting for approval" in instructions:
            print("waiting", flush=True)
            await asyncio.sleep(3600)
        return []

async def main():
    start = time.time()
    try:
        conn, _ = await asyncssh.create_connection(
            Client, "127.0.0.1", int(sys.argv[1]), username=sys.argv[2],
            client_keys=[sys.argv[3]], known_hosts=None, agent_path=None,
            preferred_auth="publickey,keyboard-interactive")
        print("logged-in", flush=True)
        conn.close()
    except Exception as e:
        print(f"closed after {time.time() - start:.1f} s: {type(e).__name__}", flush=True)

asyncio.run(asyncio.wait_for(main(), 40))
"#;

#[test]
fn a_login_that_never_answers_the_approval_step_is_cut_when_its_request_expires() {
    let w = World::build_opts(
        PsmMode::Up,
        Sshd::start(),
        PsmOpts {
            config: Some("[relay]\nlogin_grace_secs = 2\n".into()),
            ..Default::default()
        },
    );
    dual_control(&w, &[], "2s");
    let mark = w.psm.audit_mark();
    let mut c = Command::new(python3());
    c.arg("-c")
        .arg(SILENT_AT_APPROVAL)
        .arg(w.psm.port().to_string())
        .arg(alice_login())
        .arg(&w.alice_key);
    let out = run_cmd(&mut c, None, Duration::from_secs(60));
    let text = out.stdout_str();
    assert!(text.contains("waiting"), "{}", out.describe());
    assert!(!text.contains("logged-in"), "{}", out.describe());
    // the request expires after 2 s and a login waits 5 s more for its word: cut by then
    let secs: f64 = text
        .split("closed after ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("the gateway closed the connection: {}", out.describe()));
    assert!(secs < 15.0, "{}", out.describe());
    w.psm
        .wait_audit_after(mark, "expired", Duration::from_secs(5), |e| {
            jstr(e, "event") == "approval" && jstr(e, "action") == "expired"
        });
}

/// An approver's vote opens a session for someone else: one who has enrolled a second factor
/// gives it before voting, even where the grant they vote on asks alice for none.
#[test]
fn an_enrolled_approver_votes_only_with_a_verification_code() {
    let w = World::new();
    let bob = w.add_user_with_key("bob");
    let secret = enroll_user(&w, "bob");
    dual_control(&w, &["bob"], "60s");
    let mark = w.psm.audit_mark();
    let child = waiting_login(&w);
    let id = w.psm.approval_requested(mark);
    // bob's key alone does not log him in: no vote
    let out = run_ssh(w.ssh_as("bob", &bob).arg(format!("requests approve {id}")));
    assert!(!out.success(), "{}", out.describe());
    assert!(!out.stdout_str().contains("approved"), "{}", out.describe());
    let list = w.psm.psmctl_ok(&["requests", "list"], None);
    assert!(list.contains("pending (0 of 1)"), "{list}");
    // with his code he votes, and alice's session opens
    let mut c = py("mfa_login.py");
    c.arg(w.psm.port().to_string())
        .arg("bob")
        .arg(&bob)
        .arg(code(&secret, 0))
        .arg(format!("requests approve {id}"));
    let out = run_cmd(&mut c, None, CMD_TIMEOUT);
    assert!(
        out.success() && out.stdout_str().contains("prompt: psm verification code: "),
        "{}",
        out.describe()
    );
    assert!(out.stdout_str().contains("approved"), "{}", out.describe());
    let (code, text) = child_output(child);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("approved-ok"), "{text}");
}

#[test]
fn watch_shows_a_live_session_as_it_happens() {
    let w = World::new();
    let mut c = w.ssh();
    c.arg("for i in 1 2 3 4 5 6 7 8; do echo watch-$i; sleep 0.5; done")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut session = c.spawn().expect("ssh");
    let id = live_session(&w);
    let mut watcher = Command::new(bin("psmctl"))
        .args([
            "--data-dir",
            &w.psm.data_dir().display().to_string(),
            "sessions",
            "watch",
            &id,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psmctl");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = watcher.stdout.take().expect("stdout");
    let s2 = seen.clone();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    // the output shows up while the session still runs, not at its end
    assert!(
        wait_for(Duration::from_secs(10), || seen
            .lock()
            .expect("lock")
            .contains("watch-2")),
        "watch showed nothing: {:?}",
        seen.lock().expect("lock")
    );
    assert!(
        session.try_wait().expect("try_wait").is_none(),
        "the session had already ended"
    );
    assert!(wait_child(&mut session, Duration::from_secs(15)).is_some_and(|s| s.success()));
    let st = wait_child(&mut watcher, Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "watch ends with the session"
    );
    let text = seen.lock().expect("lock").clone();
    for i in 1..=8 {
        assert!(
            text.contains(&format!("watch-{i}")),
            "watch-{i} missing:\n{text}"
        );
    }
    let none = w.psm.psmctl(&["sessions", "watch", &id], None);
    assert!(
        !none.success() && none.stderr_str().contains("no live session"),
        "{}",
        none.describe()
    );
}

#[test]
fn policy_export_import_round_trip_and_bad_imports_change_nothing() {
    let w = World::new();
    w.psm.psmctl_ok(&["group", "add", "ops"], None);
    w.psm
        .psmctl_ok(&["group", "member", "add", "ops", "alice"], None);
    w.psm.psmctl_ok(&["target-group", "add", "prod"], None);
    w.psm
        .psmctl_ok(&["target-group", "member", "add", "prod", "web01"], None);
    let acct = format!("{TARGET_USER}@@prod");
    w.psm.psmctl_ok(
        &[
            "grant",
            "add",
            "@ops",
            &acct,
            "--days",
            "mon-fri",
            "--hours",
            "08:00-18:00",
            "--tz",
            "Europe/Paris",
            "--from",
            "10.0.0.0/8",
            "--max-duration",
            "2h",
            "--mfa-cache",
            "8h",
        ],
        None,
    );
    w.psm.psmctl_ok(
        &[
            "command-rule",
            "add",
            "--group",
            "@ops",
            "--pattern",
            "^reboot",
            "--action",
            "deny",
        ],
        None,
    );
    let doc = w.psm.psmctl_ok(&["policy", "export"], None);
    assert!(
        doc.contains("[[grants]]") && doc.contains("Europe/Paris") && doc.contains("^reboot"),
        "{doc}"
    );
    assert!(
        !doc.contains(TARGET_PASSWORD) && !doc.contains("argon2") && !doc.contains("iterations"),
        "no secret: {doc}"
    );
    let file = w.psm.work_dir().join("policy.toml");
    std::fs::write(&file, &doc).expect("write");
    let f = file.display().to_string();
    let out = w.psm.psmctl_ok(&["policy", "import", &f], None);
    assert!(out.contains("no change"), "{out}");
    assert_eq!(
        w.psm.psmctl_ok(&["policy", "export"], None),
        doc,
        "round trip"
    );
    let version = |w: &World| -> u64 {
        let s = w.psm.psmctl_ok(&["status", "--json"], None);
        serde_json::from_str::<serde_json::Value>(&s).expect("json")["version"]
            .as_u64()
            .expect("v")
    };
    let v0 = version(&w);
    // a bad document changes nothing and names the field
    let bad = doc.replace("user = \"@ops\"", "user = \"@nobody\"");
    std::fs::write(&file, &bad).expect("write");
    let out = w.psm.psmctl(&["policy", "import", &f], None);
    assert!(
        !out.success()
            && out
                .stderr_str()
                .contains("grants[1].user: unknown group '@nobody'"),
        "{}",
        out.describe()
    );
    // a syntax error names the line
    std::fs::write(&file, format!("{doc}\n[[grants]\n")).expect("write");
    let out = w.psm.psmctl(&["policy", "import", &f], None);
    assert!(
        !out.success() && out.stderr_str().contains("line"),
        "{}",
        out.describe()
    );
    // an unknown time zone is refused at import, not at connect time
    std::fs::write(&file, doc.replace("Europe/Paris", "Europe/Atlantis")).expect("write");
    let out = w.psm.psmctl(&["policy", "import", &f], None);
    assert!(
        !out.success() && out.stderr_str().contains("unknown time zone"),
        "{}",
        out.describe()
    );
    // an empty policy would lock everyone out
    std::fs::write(&file, "").expect("write");
    let out = w.psm.psmctl(&["policy", "import", &f], None);
    assert!(
        !out.success() && out.stderr_str().contains("--force"),
        "{}",
        out.describe()
    );
    assert_eq!(version(&w), v0, "nothing changed");
    assert_eq!(w.psm.psmctl_ok(&["policy", "export"], None), doc);
    // a dry run says what would change and changes nothing; the import then applies it
    let edited = doc.replace("\"^reboot\"", "\"^halt\"");
    std::fs::write(&file, &edited).expect("write");
    let out = w
        .psm
        .psmctl_ok(&["policy", "import", &f, "--dry-run"], None);
    assert!(
        out.contains("dry run") && out.contains("~ command rules"),
        "{out}"
    );
    assert_eq!(version(&w), v0);
    let out = w.psm.psmctl_ok(&["policy", "import", &f], None);
    assert!(out.contains("imported"), "{out}");
    assert!(version(&w) > v0);
    let rules = w.psm.psmctl_ok(&["command-rule", "list"], None);
    assert!(
        rules.contains("^halt") && !rules.contains("^reboot"),
        "{rules}"
    );
}

/// A destination that says "bye\n" to each connection and closes it (every connection: a retry,
/// or a stray connect from another test, must not use it up), granted to alice as a local
/// forward, and her `ssh -L LOCAL:DEST` session running `sleep 60`: (DEST, LOCAL, the audit
/// mark before the session, the ssh).
fn forward_to_bye(w: &World) -> (String, u16, usize, Child) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut s, b"bye\n");
        }
    });
    let dest = format!("127.0.0.1:{port}");
    w.regrant(&["--allow", "shell,exec,forward-local", "--forward-to", &dest]);
    w.psm.wait_policy_applied();
    let local = free_port();
    let mark = w.psm.audit_mark();
    let ssh = w
        .ssh()
        .args(["-L", &format!("{local}:{dest}")])
        .arg("sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    (dest, local, mark, ssh)
}

/// A forwarded connection the user closes ends at once, while its session goes on: its
/// `forward` event comes then (before, russh never handed psm the target's answer to the
/// close, so the forward, its tasks and its own target connection stayed until the session
/// ended); and a forward's end is that forward's, not the session's: the user leaving later
/// ends the session as the user's doing.
#[test]
fn a_forward_the_user_closes_ends_at_once_and_does_not_decide_the_sessions_end() {
    let w = World::build(PsmMode::Up, Sshd::start_with(true));
    let (dest, local, mark, mut ssh) = forward_to_bye(&w);
    let mut said = String::new();
    assert!(
        wait_for(Duration::from_secs(15), || {
            let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", local)) else {
                return false;
            };
            said.clear();
            std::io::Read::read_to_string(&mut c, &mut said).is_ok() && said == "bye\n"
        }),
        "the forward carried the line: {said:?}"
    );
    // at once: well before the session's end (its command sleeps 60 s); 15 s leaves room for a
    // busy machine (the forward's event once failed to come within 5 s here, cause not found)
    let fwd = w
        .psm
        .wait_audit_after(mark, "the forward's end", Duration::from_secs(15), |e| {
            jstr(e, "event") == "forward"
                && jstr(e, "destination") == dest
                && e["bytes_down"].as_u64() == Some(4)
        });
    assert!(matches!(ssh.try_wait(), Ok(None)), "the session still runs");
    let id = jstr(&fwd, "session_id").to_string();
    // the user leaves
    let _ = ssh.kill();
    let _ = ssh.wait();
    let end = w
        .psm
        .wait_audit("session_end", Duration::from_secs(15), |e| {
            jstr(e, "event") == "session_end" && jstr(e, "session_id") == id
        });
    assert_eq!(jstr(&end, "side"), "client", "{end}");
}

/// Forwards the target closes first (a destination that says one line and hangs up) end
/// whole: all their tasks, not only the part toward the target, while the session goes on, and
/// the session's own channel goes when it ends. The relay's `psm_relay_channels_live` counts a
/// relayed channel until its last task ends. (A review suspected that the user's reply to psm's
/// close, which russh does not hand to psm's reader, kept each such forward's reader until the
/// session ended; this test shows it does not.)
#[test]
fn forwards_the_target_closes_first_leave_no_task_behind() {
    let metrics = free_port();
    let opts = PsmOpts {
        relay_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{metrics}")],
        ..PsmOpts::default()
    };
    let w = World::build_opts(PsmMode::Separate, Sshd::start_with(true), opts);
    let live = || relay_counter(metrics, "psm_relay_channels_live");
    let (dest, local, mark, mut ssh) = forward_to_bye(&w);
    const FORWARDS: usize = 12;
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < FORWARDS && Instant::now() < deadline {
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", local)) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let mut said = String::new();
        if std::io::Read::read_to_string(&mut c, &mut said).is_ok() && said == "bye\n" {
            done += 1;
        }
    }
    assert_eq!(done, FORWARDS, "forwards that carried their line");
    let ended = || {
        w.psm
            .audit()
            .iter()
            .skip(mark)
            .filter(|e| {
                jstr(e, "event") == "forward"
                    && jstr(e, "destination") == dest
                    && e["bytes_down"].as_u64() == Some(4)
            })
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(15), || ended() >= FORWARDS),
        "{} forward events of {FORWARDS}",
        ended()
    );
    // the session's channel, and at most the last forward (its flow is let go when the next
    // channel opens), against one per forward before
    assert!(
        wait_for(Duration::from_secs(10), || live() <= 2.0),
        "{} relayed channels still live after {FORWARDS} forwards ended",
        live()
    );
    assert!(matches!(ssh.try_wait(), Ok(None)), "the session still runs");
    let _ = ssh.kill();
    let _ = ssh.wait();
    assert!(
        wait_for(Duration::from_secs(15), || live() == 0.0),
        "{} relayed channels live after the session ended",
        live()
    );
}

#[test]
fn local_forwards_follow_the_grant_and_are_audited() {
    let w = World::build(PsmMode::Up, Sshd::start_with(true));
    let port = echo_server(4);
    let other = echo_server(1);
    let dest = format!("127.0.0.1:{port}");
    let forward = |to: &str| {
        // INFO: ssh prints why a channel open failed
        let mut c = w.ssh_with(&["-o", "LogLevel=INFO"], &alice_login(), &w.alice_key);
        c.args(["-W", to]);
        run_cmd(&mut c, Some(b"ping through psm\n"), CMD_TIMEOUT)
    };
    // not allowed by default
    let out = forward(&dest);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr_str().contains("not permitted by policy"),
        "{}",
        out.describe()
    );
    w.regrant(&[
        "--allow",
        "shell,exec,forward-local",
        "--forward-to",
        &format!("127.0.0.1:{port}"),
    ]);
    let out = forward(&dest);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout_str(), "ping through psm\n", "bytes intact");
    let e = w.psm.wait_audit("forward", Duration::from_secs(5), |e| {
        jstr(e, "event") == "forward" && jstr(e, "destination") == dest
    });
    assert_eq!(
        (e["bytes_up"].as_u64(), e["bytes_down"].as_u64()),
        (Some(17), Some(17)),
        "{e}"
    );
    // a destination the grant does not list is refused, with the reason audited
    let out = forward(&format!("127.0.0.1:{other}"));
    assert!(
        !out.success() && out.stderr_str().contains("not permitted by policy"),
        "{}",
        out.describe()
    );
    w.psm
        .wait_audit("refused forward", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_denied"
                && jstr(e, "reason").contains(&format!("127.0.0.1:{other}"))
        });
}

#[test]
fn putty_plink_answers_the_verification_code() {
    if std::process::Command::new("plink")
        .arg("-V")
        .output()
        .is_err()
    {
        panic!("plink (Debian: putty-tools) is required; scripts/test.sh installs it");
    }
    let w = World::new();
    let secret = enroll(&w);
    w.regrant(&["--mfa"]);
    // plink checks psm's host key against the fingerprint it is given
    let host_pub = run_cmd(
        Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(w.psm.data_dir().join("ssh_host_ed25519_key")),
        None,
        CMD_TIMEOUT,
    );
    assert!(host_pub.success(), "{}", host_pub.describe());
    let pub_file = w.psm.work_dir().join("gateway.pub");
    std::fs::write(&pub_file, host_pub.stdout_str()).expect("gateway.pub");
    let fp = fingerprint(&pub_file);
    let mut plink = Command::new("plink");
    plink.args([
        "-ssh",
        "-no-antispoof",
        "-P",
        &w.psm.port().to_string(),
        "-hostkey",
        &fp,
        "-l",
        &alice_login(),
        "-pw",
        ALICE_PASSWORD,
        "127.0.0.1",
        "echo via-plink",
    ]);
    let mut pty = PtySession::spawn(&plink, &[], 24, 80);
    pty.expect("psm verification code: ", CMD_TIMEOUT);
    pty.send(&format!("{}\r", code(&secret, 0)));
    pty.expect("via-plink", CMD_TIMEOUT);
    assert_eq!(pty.wait(CMD_TIMEOUT), Some(0), "{}", pty.output());
    w.psm
        .wait_audit("plink password+totp", Duration::from_secs(5), |e| {
            jstr(e, "event") == "auth_success" && jstr(e, "method") == "password+totp"
        });
}

#[test]
fn stock_openssh_answers_the_verification_code_through_ssh_askpass() {
    let w = World::new();
    let secret = enroll(&w);
    w.regrant(&["--mfa"]);
    // password first, then the code: both asked through SSH_ASKPASS, told apart by the prompt
    let askpass = w.psm.work_dir().join("askpass-mfa.sh");
    let prompts = w.psm.work_dir().join("prompts.txt");
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$1\" >> '{}'\ncase \"$1\" in\n  *'verification code'*) printf '%s\\n' '{}' ;;\n  *) printf '%s\\n' '{}' ;;\nesac\n",
        prompts.display(),
        code(&secret, 0),
        ALICE_PASSWORD
    );
    std::fs::write(&askpass, script).expect("askpass");
    let mut c = Command::new("ssh");
    c.args(common_ssh_opts())
        .args([
            "-o",
            "BatchMode=no",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "NumberOfPasswordPrompts=1",
            "-p",
            &w.psm.port().to_string(),
            &format!("{}@127.0.0.1", alice_login()),
            "echo via-askpass",
        ])
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .env_remove("SSH_AUTH_SOCK");
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let out = run_ssh(&mut c);
    assert!(
        out.success() && out.stdout_str().contains("via-askpass"),
        "{}",
        out.describe()
    );
    let asked = std::fs::read_to_string(&prompts).unwrap_or_default();
    assert!(
        asked.contains("psm verification code: "),
        "prompts: {asked}"
    );
    w.psm
        .wait_audit("password+totp", Duration::from_secs(5), |e| {
            jstr(e, "event") == "auth_success" && jstr(e, "method") == "password+totp"
        });
}

#[test]
fn an_expiry_that_passes_ends_the_live_session_within_a_second() {
    let w = World::new();
    let expires = psm_control_api_now_secs() + 4;
    let at = format!("@{expires}");
    // RFC 3339 from the epoch seconds, as an operator would write it
    let out = Command::new("date")
        .args(["-u", "-d", &at, "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    let when = String::from_utf8_lossy(&out.stdout).trim().to_string();
    w.regrant(&["--expires", &when]);
    let child = background(&w, "sleep 30");
    let id = live_session(&w);
    let deadline = std::time::UNIX_EPOCH + Duration::from_secs(expires);
    let (err, _) = ended(child, Instant::now());
    let late = std::time::SystemTime::now()
        .duration_since(deadline)
        .unwrap_or_default();
    assert!(
        late < Duration::from_secs(1),
        "ended {late:?} after the expiry"
    );
    assert!(
        err.contains("psm: session ended: the grant expired"),
        "{err}"
    );
    assert_eq!(jstr(&end_event(&w, &id), "reason_code"), "grant_expired");
    // and no new session starts
    let out = run_ssh(w.ssh().arg("true"));
    assert!(
        !out.success() && out.stderr_str().contains("has expired"),
        "{}",
        out.describe()
    );
}

#[test]
fn a_closing_time_window_ends_the_live_session_within_a_second() {
    let w = World::new();
    // a window that ends at the next minute boundary (at least 15 s away, time for the
    // session to start inside it)
    let mut now = psm_control_api_now_secs();
    if 60 - now % 60 < 15 {
        std::thread::sleep(Duration::from_secs(60 - now % 60 + 1));
        now = psm_control_api_now_secs();
    }
    let minute = (now / 60) % (24 * 60);
    let hm = |m: u64| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let hours = format!("{}-{}", hm(minute), hm((minute + 1) % 1440));
    w.regrant(&["--days", "all", "--hours", &hours, "--tz", "UTC"]);
    let child = background(&w, "sleep 90");
    let id = live_session(&w);
    let closes = std::time::UNIX_EPOCH + Duration::from_secs((now / 60 + 1) * 60);
    let (err, _) = ended_within(child, Instant::now(), Duration::from_secs(75));
    let at = std::time::SystemTime::now();
    assert!(at >= closes, "ended before the window closed");
    let late = at.duration_since(closes).unwrap_or_default();
    assert!(
        late < Duration::from_secs(1),
        "ended {late:?} after the window closed"
    );
    assert!(
        err.contains("psm: session ended: the permitted time window closed"),
        "{err}"
    );
    assert_eq!(jstr(&end_event(&w, &id), "reason_code"), "window_closed");
}

#[test]
fn an_approval_psm_control_cannot_answer_refuses_the_login_naming_control() {
    let mut w = World::build(PsmMode::Separate, Sshd::start());
    w.psm.psmctl_ok(&["group", "add", "secops"], None);
    w.regrant(&["--approval", "1", "--approvers", "@secops"]);
    w.psm.wait_policy_applied();
    // the relay keeps serving on its snapshot, but the approval call has no one to answer it
    w.psm.kill_control();
    let out = kbdint(&w, &alice_login(), "", "echo must-not-run");
    assert!(!out.success(), "{}", out.describe());
    assert!(
        !out.stdout_str().contains("must-not-run"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout_str().contains("approvals are unavailable")
            || out.stderr_str().contains("approvals are unavailable"),
        "{}",
        out.describe()
    );
    // the relay's buffered audit events reach psm-control when it is back
    w.psm.start_control();
    let e = w
        .psm
        .wait_audit("refused approval call", Duration::from_secs(15), |e| {
            jstr(e, "event") == "auth_failure" && jstr(e, "side") == "control"
        });
    assert!(
        jstr(&e, "reason").contains("psm-control did not answer"),
        "{e}"
    );
}
