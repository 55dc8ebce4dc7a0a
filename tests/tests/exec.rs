//! Exec sessions through psm: stdout and stderr kept apart, exact exit statuses, a remote command
//! killed by a signal (psm must behave like a direct OpenSSH login), binary-safe streams, and
//! both ways of authenticating to psm and both vaulted credential kinds.

use psm_tests::*;
use serde_json::Value;
use std::time::Duration;

const AUDIT_WAIT: Duration = Duration::from_secs(5);

fn is_end(e: &Value) -> bool {
    jstr(e, "event") == "session_end"
}

#[test]
fn exec_separates_stdout_and_stderr_and_returns_exit_codes() {
    let w = World::new();

    let out = run_ssh(w.ssh().arg("echo out; echo err >&2"));
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.stdout_str(),
        "out\n",
        "stdout must hold only stdout\n{}",
        out.describe()
    );
    assert_eq!(
        out.stderr_str(),
        "err\n",
        "stderr must hold only stderr\n{}",
        out.describe()
    );

    // the remote user is the vaulted account, not alice
    let out = run_ssh(w.ssh().arg("id -un"));
    assert_eq!(
        out.stdout_str(),
        format!("{TARGET_USER}\n"),
        "{}",
        out.describe()
    );

    for code in [0, 1, 7] {
        let mark = w.psm.audit_mark();
        let out = run_ssh(w.ssh().arg(format!("echo code{code}; exit {code}")));
        assert_eq!(
            out.code(),
            Some(code),
            "ssh must exit with the remote status\n{}",
            out.describe()
        );
        assert_eq!(
            out.stdout_str(),
            format!("code{code}\n"),
            "{}",
            out.describe()
        );
        let end = w.psm.wait_audit_after(
            mark,
            &format!("session_end with exit_status {code}"),
            AUDIT_WAIT,
            |e| is_end(e) && e.get("exit_status").and_then(Value::as_u64) == Some(code as u64),
        );
        if code == 7 {
            assert_eq!(jstr(&end, "user"), "alice", "{end}");
            assert_eq!(jstr(&end, "target"), "web01", "{end}");
            assert_eq!(jstr(&end, "account"), TARGET_USER, "{end}");
            assert!(
                jstr(&end, "source").starts_with("127.0.0.1:"),
                "source: {end}"
            );
            assert!(!jstr(&end, "session_id").is_empty(), "session_id: {end}");
            assert!(
                !jstr(&end, "recording_id").is_empty(),
                "recording_id: {end}"
            );
            assert!(
                end.get("exit_signal").is_none_or(Value::is_null),
                "exit_signal: {end}"
            );
            let start = end.get("start_ms").and_then(Value::as_u64).unwrap_or(0);
            let stop = end.get("end_ms").and_then(Value::as_u64).unwrap_or(0);
            let dur = end.get("duration_ms").and_then(Value::as_u64);
            assert!(start > 0 && stop >= start, "start_ms/end_ms: {end}");
            let dur = dur.unwrap_or_else(|| panic!("duration_ms missing: {end}"));
            assert!(
                dur.abs_diff(stop - start) <= 5,
                "duration_ms vs end_ms - start_ms: {end}"
            );
            assert!(
                end.get("bytes_down").and_then(Value::as_u64).unwrap_or(0) >= 6,
                "bytes_down: {end}"
            );
            assert!(
                end.get("bytes_up").and_then(Value::as_u64).is_some(),
                "bytes_up: {end}"
            );
            assert!(!jstr(&end, "reason").is_empty(), "reason: {end}");
            let sid = jstr(&end, "session_id").to_string();
            let start_ev = w
                .psm
                .wait_audit(&format!("session_start for {sid}"), AUDIT_WAIT, |e| {
                    jstr(e, "event") == "session_start" && jstr(e, "session_id") == sid
                });
            assert_eq!(
                jstr(&start_ev, "recording_id"),
                jstr(&end, "recording_id"),
                "{start_ev}"
            );
            assert_eq!(jstr(&start_ev, "user"), "alice", "{start_ev}");
            assert_eq!(jstr(&start_ev, "protocol"), "ssh", "{start_ev}");
            assert_eq!(jstr(&end, "protocol"), "ssh", "{end}");
        }
    }
}

#[test]
fn exec_killed_by_signal_behaves_like_direct_openssh() {
    let w = World::new();
    let direct = run_ssh(w.sshd.direct_ssh().arg("echo before; kill -9 $$"));
    let mark = w.psm.audit_mark();
    let via = run_ssh(w.ssh().arg("echo before; kill -9 $$"));
    assert_eq!(
        via.code(),
        direct.code(),
        "psm must exit like direct OpenSSH when the remote command is killed\ndirect:\n{}\nvia psm:\n{}",
        direct.describe(),
        via.describe()
    );
    assert_eq!(
        via.stdout_str(),
        direct.stdout_str(),
        "direct:\n{}\nvia psm:\n{}",
        direct.describe(),
        via.describe()
    );
    let end = w
        .psm
        .wait_audit_after(mark, "session_end with exit_signal", AUDIT_WAIT, |e| {
            // (the end of the harness's readiness session may land after `mark` too)
            is_end(e) && e.get("exit_signal").is_some_and(|v| !v.is_null())
        });
    let sig = jstr(&end, "exit_signal");
    assert!(
        sig.contains("KILL"),
        "session_end exit_signal should name KILL: {end}"
    );
    assert!(
        end.get("exit_status").is_none_or(Value::is_null),
        "no exit_status for a killed command: {end}"
    );
}

#[test]
fn exec_streams_are_binary_safe() {
    let w = World::new();
    let mut data = Vec::new();
    for i in 0..4096u32 {
        data.extend((0..=255u8).map(|b| b.wrapping_add((i % 251) as u8)));
    }
    let out = run_cmd(w.ssh().arg("cat"), Some(&data), CMD_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout == data,
        "stdout differs: {} bytes back of {}",
        out.stdout.len(),
        data.len()
    );
    let out = run_cmd(w.ssh().arg("cat >&2"), Some(&data), CMD_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.is_empty(), "nothing on stdout expected");
    assert!(
        out.stderr == data,
        "stderr differs: {} bytes back of {}",
        out.stderr.len(),
        data.len()
    );
    // stdin EOF reaches the remote command
    let out = run_cmd(w.ssh().arg("wc -c"), Some(b"12345"), CMD_TIMEOUT);
    assert_eq!(out.stdout_str().trim(), "5", "{}", out.describe());
}

#[test]
fn password_login_to_psm_and_private_key_credential_to_target() {
    let w = World::new();
    // alice with her password instead of her key
    let out = run_ssh(
        w.ssh_password(&alice_login(), ALICE_PASSWORD)
            .arg("echo pw-session"),
    );
    assert!(out.success(), "password login to psm:\n{}", out.describe());
    assert_eq!(out.stdout_str(), "pw-session\n");

    // an account whose vaulted credential is a private key
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "web01k",
            "--address",
            &w.sshd.address(),
            "--host-key",
            w.sshd.host_key(),
        ],
        None,
    );
    w.psm.psmctl_ok(
        &[
            "account",
            "add",
            &format!("{TARGET_USER}@web01k"),
            "--private-key",
            &w.sshd.target_key().display().to_string(),
        ],
        None,
    );
    w.psm.psmctl_ok(
        &["grant", "add", "alice", &format!("{TARGET_USER}@web01k")],
        None,
    );
    let login = format!("alice@{TARGET_USER}@web01k");
    w.wait_session_works(&login, Duration::from_secs(5));
    let out = run_ssh(w.ssh_as(&login, &w.alice_key).arg("echo key-cred; exit 3"));
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert_eq!(out.stdout_str(), "key-cred\n");
}
