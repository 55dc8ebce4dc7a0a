//! Everything psm must refuse, with what the ssh client is told and what the audit log records:
//! failed authentication, policy denials after authentication, targets psm cannot reach or log
//! in to, and forwarding requests.

use psm_tests::*;
use serde_json::Value;
use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const AUDIT_WAIT: Duration = Duration::from_secs(5);

fn assert_permission_denied(out: &CmdOut) {
    assert_eq!(
        out.code(),
        Some(255),
        "expected ssh exit 255\n{}",
        out.describe()
    );
    assert!(
        out.stderr_str().contains("Permission denied"),
        "expected OpenSSH's Permission denied\n{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "nothing may run\n{}", out.describe());
}

fn auth_failure(w: &World, mark: usize, login: &str, method: &str) -> Value {
    let ev = w.psm.wait_audit_after(
        mark,
        &format!("auth_failure for {login} ({method})"),
        AUDIT_WAIT,
        |e| {
            jstr(e, "event") == "auth_failure"
                && jstr(e, "login") == login
                && jstr(e, "method") == method
        },
    );
    assert!(
        !jstr(&ev, "reason").is_empty(),
        "auth_failure needs a reason: {ev}"
    );
    assert!(
        jstr(&ev, "source").starts_with("127.0.0.1:"),
        "auth_failure needs the source: {ev}"
    );
    ev
}

fn session_denied(w: &World, mark: usize, login: &str) -> Value {
    let ev = w.psm.wait_audit_after(
        mark,
        &format!("session_denied for {login}"),
        AUDIT_WAIT,
        |e| jstr(e, "event") == "session_denied" && jstr(e, "login") == login,
    );
    assert!(
        !jstr(&ev, "reason").is_empty(),
        "session_denied needs a reason: {ev}"
    );
    ev
}

fn no_session_started(w: &World, mark: usize) {
    let started: Vec<Value> = w
        .psm
        .audit()
        .into_iter()
        .skip(mark)
        .filter(|e| jstr(e, "event") == "session_start")
        .collect();
    assert!(
        started.is_empty(),
        "a refused login must not start a session: {started:?}"
    );
}

#[test]
fn authentication_failures_are_refused_and_audited() {
    let w = World::new();

    // unknown psm user
    let login = format!("mallory@{TARGET_USER}@web01");
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_as(&login, &w.alice_key).arg("echo ran"));
    assert_permission_denied(&out);
    auth_failure(&w, mark, &login, "publickey");
    no_session_started(&w, mark);

    // unknown psm user with a password
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_password(&login, ALICE_PASSWORD).arg("echo ran"));
    assert_permission_denied(&out);
    auth_failure(&w, mark, &login, "password");

    // wrong password
    let mark = w.psm.audit_mark();
    let out = run_ssh(
        w.ssh_password(&alice_login(), "not-alices-password")
            .arg("echo ran"),
    );
    assert_permission_denied(&out);
    auth_failure(&w, mark, &alice_login(), "password");
    no_session_started(&w, mark);

    // a key alice never registered
    let stranger = w.psm.work_dir().join("stranger_ed25519");
    gen_key(&stranger);
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_as(&alice_login(), &stranger).arg("echo ran"));
    assert_permission_denied(&out);
    auth_failure(&w, mark, &alice_login(), "publickey");
    no_session_started(&w, mark);

    // the vaulted target password is not a psm password
    let mark = w.psm.audit_mark();
    let out = run_ssh(
        w.ssh_password(&alice_login(), TARGET_PASSWORD)
            .arg("echo ran"),
    );
    assert_permission_denied(&out);
    auth_failure(&w, mark, &alice_login(), "password");

    // and alice still gets in afterwards
    let out = run_ssh(w.ssh().arg("echo still-ok"));
    assert_eq!(out.stdout_str(), "still-ok\n", "{}", out.describe());
}

#[test]
fn policy_denials_after_authentication() {
    let w = World::new();
    let bob_key = w.add_user_with_key("bob");

    // unknown target: same wording as a missing grant, nothing about existence
    let login = format!("alice@{TARGET_USER}@nope");
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_as(&login, &w.alice_key).arg("echo ran"));
    let line = assert_refused(&out, "psm: access denied: you have no grant for ");
    // the same form as for a target that exists (`…for <account>@<target>`), so that the answer
    // does not tell whether `nope` is a target
    assert_eq!(
        line,
        format!("psm: access denied: you have no grant for {TARGET_USER}@nope"),
        "an unknown target must get the same text form as a missing grant\n{}",
        out.describe()
    );
    assert!(
        !out.stderr_str().to_lowercase().contains("unknown"),
        "must not reveal that the target is unknown\n{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "{}", out.describe());
    let ev = session_denied(&w, mark, &login);
    assert_eq!(jstr(&ev, "user"), "alice", "{ev}");
    no_session_started(&w, mark);

    // unknown account on a known target
    let login = "alice@nobody@web01".to_string();
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_as(&login, &w.alice_key).arg("echo ran"));
    let line = assert_refused(&out, "psm: access denied: you have no grant for ");
    assert_eq!(
        line,
        "psm: access denied: you have no grant for nobody@web01",
        "{}",
        out.describe()
    );
    assert!(
        !out.stderr_str().to_lowercase().contains("unknown"),
        "{}",
        out.describe()
    );
    session_denied(&w, mark, &login);
    no_session_started(&w, mark);

    // known user and account, no grant
    let login = format!("bob@{TARGET_USER}@web01");
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_as(&login, &bob_key).arg("echo ran"));
    let line = assert_refused(&out, "psm: access denied: you have no grant for ");
    assert_eq!(
        line,
        format!("psm: access denied: you have no grant for {TARGET_USER}@web01"),
        "{}",
        out.describe()
    );
    let ev = session_denied(&w, mark, &login);
    assert_eq!(jstr(&ev, "user"), "bob", "{ev}");
    assert_eq!(
        (jstr(&ev, "reason_code"), jstr(&ev, "side")),
        ("no_grant", "policy"),
        "a typed refusal naming the side at fault: {ev}"
    );
    no_session_started(&w, mark);

    // a malformed login, once alice has authenticated (a login without any target gets the
    // target menu instead: see governance.rs)
    {
        let login = "alice@web01";
        let mark = w.psm.audit_mark();
        let out = run_ssh(w.ssh_as(login, &w.alice_key).arg("echo ran"));
        assert_refused(&out, "psm: malformed login");
        assert!(out.stdout.is_empty(), "{}", out.describe());
        let ev = session_denied(&w, mark, login);
        assert_eq!(
            (jstr(&ev, "reason_code"), jstr(&ev, "side")),
            ("malformed_login", "client"),
            "{ev}"
        );
        no_session_started(&w, mark);
    }

    // and alice's own grant still works
    let out = run_ssh(w.ssh().arg("echo still-ok"));
    assert_eq!(out.stdout_str(), "still-ok\n", "{}", out.describe());
}

#[test]
fn unreachable_or_untrusted_targets_are_refused() {
    let w = World::new();
    let add = |name: &str, address: &str, host_key: &str, password: &str| {
        w.psm.psmctl_ok(
            &[
                "target",
                "add",
                name,
                "--address",
                address,
                "--host-key",
                host_key,
            ],
            None,
        );
        let acct = format!("{TARGET_USER}@{name}");
        w.psm.psmctl_ok(
            &["account", "add", &acct, "--password-stdin"],
            Some(&format!("{password}\n")),
        );
        w.psm.psmctl_ok(&["grant", "add", "alice", &acct], None);
    };
    // host key mismatch: pinned key is some other key
    let other = w.psm.work_dir().join("other_host_key");
    let wrong_key = gen_key(&other);
    add("web02", &w.sshd.address(), &wrong_key, TARGET_PASSWORD);
    // target down: nothing listens there
    let closed = free_port();
    add(
        "web03",
        &format!("127.0.0.1:{closed}"),
        w.sshd.host_key(),
        TARGET_PASSWORD,
    );
    // target refuses the vaulted credential
    add(
        "web04",
        &w.sshd.address(),
        w.sshd.host_key(),
        "wrong-target-password",
    );
    w.psm.wait_policy_applied();

    let cases: [(&str, &str, &str, &str); 3] = [
        (
            "web02",
            "psm: cannot connect to web02:",
            "host key",
            "host_key_mismatch",
        ),
        (
            "web03",
            "psm: cannot connect to web03:",
            "unreachable",
            "target_unreachable",
        ),
        (
            "web04",
            &format!("psm: cannot log in to {TARGET_USER}@web04:"),
            "",
            "credential_refused",
        ),
    ];
    for (target, prefix, needle, code) in cases {
        let login = format!("alice@{TARGET_USER}@{target}");
        let mark = w.psm.audit_mark();
        let out = run_ssh(w.ssh_as(&login, &w.alice_key).arg("echo ran"));
        let line = assert_refused(&out, prefix);
        assert!(
            line.contains(needle),
            "{target}: expected {needle:?} in {line:?}\n{}",
            out.describe()
        );
        assert!(out.stdout.is_empty(), "{}", out.describe());
        assert!(
            !out.stderr_str().contains(TARGET_PASSWORD)
                && !out.stderr_str().contains("wrong-target-password"),
            "a credential leaked to the client\n{}",
            out.describe()
        );
        let ev = session_denied(&w, mark, &login);
        assert_eq!(
            (jstr(&ev, "reason_code"), jstr(&ev, "side")),
            (code, "target"),
            "{ev}"
        );
    }
    // the audit log never holds the vaulted passwords
    let audit = std::fs::read_to_string(w.psm.data_dir().join("audit.jsonl")).unwrap_or_default();
    assert!(
        !audit.contains(TARGET_PASSWORD) && !audit.contains("wrong-target-password"),
        "credential in audit.jsonl"
    );

    let out = run_ssh(w.ssh().arg("echo still-ok"));
    assert_eq!(out.stdout_str(), "still-ok\n", "{}", out.describe());
}

#[test]
fn forwarding_is_refused() {
    // this target would forward: psm must be the one saying no
    let sshd = Sshd::start_with(true);
    let direct = run_cmd(
        sshd.direct_ssh().arg("-W").arg(sshd.address()),
        Some(b""),
        Duration::from_secs(20),
    );
    assert!(
        direct.stdout_str().starts_with("SSH-2.0-"),
        "control: direct -W to the target should reach its sshd\n{}",
        direct.describe()
    );
    let w = World::build(PsmMode::Up, sshd);
    let target_addr = w.sshd.address();

    // stdio forwarding (-W)
    let mark = w.psm.audit_mark();
    let out = run_cmd(
        w.ssh().arg("-W").arg(&target_addr),
        Some(b""),
        Duration::from_secs(20),
    );
    assert_eq!(
        out.code(),
        Some(255),
        "-W through psm must fail\n{}",
        out.describe()
    );
    assert!(
        !out.stdout_str().contains("SSH-2.0-"),
        "-W reached the target through psm\n{}",
        out.describe()
    );
    assert!(
        out.stderr_str().contains("forwarding failed") || out.stderr_str().contains("open failed"),
        "{}",
        out.describe()
    );
    // the refusal is audited
    w.psm.wait_audit_after(
        mark,
        "an audit event about the refused forwarding",
        AUDIT_WAIT,
        |e| e.to_string().to_lowercase().contains("forward"),
    );

    // remote forwarding with ExitOnForwardFailure
    let rport = free_port();
    let out = run_ssh(
        w.ssh()
            .args(["-o", "ExitOnForwardFailure=yes", "-R"])
            .arg(format!("127.0.0.1:{rport}:{target_addr}"))
            .arg("sleep 2"),
    );
    assert_eq!(
        out.code(),
        Some(255),
        "-R through psm must fail\n{}",
        out.describe()
    );

    // local forwarding: the session itself works, the forwarded connection does not
    let lport = free_port();
    // (OpenSSH reports a failed forward at log level INFO)
    let mut cmd = w.ssh_with(&["-o", "LogLevel=INFO"], &alice_login(), &w.alice_key);
    cmd.arg("-L")
        .arg(format!("127.0.0.1:{lport}:{target_addr}"))
        .arg("sleep 4; echo session-ok")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("ssh -L");
    let opened = wait_for(Duration::from_secs(10), || port_open(lport));
    assert!(opened, "ssh did not open its -L port");
    let mut got = Vec::new();
    {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", lport)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 256];
            if let Ok(n) = s.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
    let status = wait_child(&mut child, Duration::from_secs(30));
    let mut stdout = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        !String::from_utf8_lossy(&got).contains("SSH-2.0-"),
        "-L forwarded a connection to the target through psm (got {:?})",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        stdout, "session-ok\n",
        "the session with a refused -L must still work; stderr: {stderr}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr: {stderr}");
    assert!(
        stderr.contains("psm: port forwarding to ")
            && stderr.contains("is not permitted by policy"),
        "the user is told why the forward failed; stderr: {stderr}"
    );

    // agent and X11 forwarding: the session works, nothing is forwarded
    let agent_dir = w.psm.work_dir();
    let agent_sock = agent_dir.join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&agent_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh-agent");
    assert!(
        wait_for(Duration::from_secs(5), || agent_sock.exists()),
        "ssh-agent socket"
    );
    // control: the target itself would forward the agent
    let direct = run_ssh(
        w.sshd
            .direct_ssh()
            .env("SSH_AUTH_SOCK", &agent_sock)
            .arg("-A")
            .arg("echo \"A:${SSH_AUTH_SOCK:-none}\""),
    );
    assert!(
        direct.stdout_str().starts_with("A:/"),
        "control: direct ssh -A should forward the agent\n{}",
        direct.describe()
    );
    let out = run_ssh(
        w.ssh()
            .env("SSH_AUTH_SOCK", &agent_sock)
            .args(["-A", "-o", "ForwardX11=yes", "-o", "ForwardX11Trusted=yes"])
            .env("DISPLAY", "127.0.0.1:99")
            .arg("echo \"A:${SSH_AUTH_SOCK:-none} X:${DISPLAY:-none}\""),
    );
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.stdout_str(),
        "A:none X:none\n",
        "agent/X11 must not be forwarded\n{}",
        out.describe()
    );
    for what in ["agent forwarding", "X11 forwarding"] {
        assert!(
            out.stderr_str()
                .contains(&format!("psm: {what} is not permitted")),
            "the user is told that {what} is refused\n{}",
            out.describe()
        );
    }
}
