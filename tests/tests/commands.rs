//! Command control (issue #6) against real OpenSSH: rules on exec commands, on an interactive
//! shell driven through a real pty (typed plainly, with backspaces, recalled from history,
//! pasted), on a shell without a terminal; deny, terminate, alert and an allow-list grant; and
//! one `command` audit event per submitted line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use psm_tests::*;

const T: Duration = Duration::from_secs(15);

fn account() -> String {
    format!("{TARGET_USER}@web01")
}

fn rule(w: &World, pattern: &str, action: &str) {
    w.psm.psmctl_ok(
        &[
            "command-rule",
            "add",
            "--grant",
            "alice",
            &account(),
            "--pattern",
            pattern,
            "--action",
            action,
        ],
        None,
    );
}

/// A file on the target (the same machine) that denied commands would remove.
fn canary(w: &World, name: &str) -> String {
    let path = format!("/tmp/psm-cc-{}-{name}", w.psm.port());
    let out = run_ssh(w.ssh().arg(format!("touch {path}")));
    assert!(out.success(), "{}", out.describe());
    assert!(Path::new(&path).exists());
    path
}

fn command_events(w: &World) -> Vec<serde_json::Value> {
    w.psm.audit_of("command")
}

fn wait_command(w: &World, line: &str, decision: &str) -> serde_json::Value {
    w.psm.wait_audit(
        &format!("command {line:?} {decision}"),
        Duration::from_secs(5),
        |e| {
            jstr(e, "event") == "command"
                && jstr(e, "line") == line
                && jstr(e, "decision") == decision
        },
    )
}

#[test]
fn exec_commands_are_decided_before_they_are_sent() {
    let w = World::new();
    let path = canary(&w, "exec");
    rule(&w, r"^rm\s", "deny");
    rule(&w, r"passwd", "alert");
    rule(&w, r"^shutdown", "terminate");
    let cmd = format!("rm -f {path}");
    let out = run_ssh(w.ssh().arg(&cmd));
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(
        out.stderr_str()
            .contains(&format!("psm: command denied by policy: {cmd}")),
        "{}",
        out.describe()
    );
    assert!(Path::new(&path).exists(), "the denied command never ran");
    let e = wait_command(&w, &cmd, "deny");
    assert_eq!(jstr(&e, "source"), "exec");
    assert!(e["rule"].as_u64().is_some(), "{e}");
    // alert: runs, audited as an alert
    let out = run_ssh(w.ssh().arg("echo passwd-check"));
    assert!(
        out.success() && out.stdout_str().contains("passwd-check"),
        "{}",
        out.describe()
    );
    wait_command(&w, "echo passwd-check", "alert");
    // terminate: the session ends
    let out = run_ssh(w.ssh().arg("shutdown -h now"));
    assert!(!out.success(), "{}", out.describe());
    w.psm.wait_audit("terminated", Duration::from_secs(5), |e| {
        jstr(e, "event") == "session_end" && jstr(e, "reason_code") == "command_terminated"
    });
    // everything else: allowed and audited
    let out = run_ssh(w.ssh().arg("echo fine"));
    assert!(out.success(), "{}", out.describe());
    wait_command(&w, "echo fine", "allow");
    // a bad pattern is refused by psmctl
    let bad = w.psm.psmctl(
        &[
            "command-rule",
            "add",
            "--grant",
            "alice",
            &account(),
            "--pattern",
            "(",
            "--action",
            "deny",
        ],
        None,
    );
    assert!(
        !bad.success() && bad.stderr_str().contains("pattern"),
        "{}",
        bad.describe()
    );
    let list = w.psm.psmctl_ok(&["command-rule", "list"], None);
    // patterns are shown escaped (a backslash doubled)
    assert!(
        list.contains(r"^rm\\s") && list.contains("terminate"),
        "{list}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn an_allow_list_grant_denies_what_no_rule_allows() {
    let w = World::new();
    w.psm
        .psmctl_ok(&["grant", "remove", "alice", &account()], None);
    w.psm.psmctl_ok(
        &[
            "grant",
            "add",
            "alice",
            &account(),
            "--commands-default",
            "deny",
        ],
        None,
    );
    rule(&w, r"^(id|echo)\b", "allow");
    let out = run_ssh(w.ssh().arg("echo listed"));
    assert!(
        out.success() && out.stdout_str().contains("listed"),
        "{}",
        out.describe()
    );
    let out = run_ssh(w.ssh().arg("uname -a"));
    assert!(
        !out.success()
            && out
                .stderr_str()
                .contains("psm: command denied by policy: uname -a"),
        "{}",
        out.describe()
    );
}

fn shell(w: &World) -> PtySession {
    let mut cmd = w.ssh();
    cmd.arg("-tt");
    let mut pty = PtySession::spawn(&cmd, &[("TERM", "xterm")], 24, 100);
    pty.send_line("PS1='psm$ '");
    pty.expect("psm$ ", T);
    pty.send_line("echo \"RE\"\"ADY\"");
    pty.expect("READY", T);
    pty.expect("psm$ ", T);
    pty
}

#[test]
fn a_shell_line_is_decided_from_the_screen_however_it_was_typed() {
    let w = World::new();
    let path = canary(&w, "shell");
    rule(&w, r"^rm\s", "deny");
    let mut pty = shell(&w);
    let cmd = format!("rm -f {path}");
    // typed key by key
    for c in cmd.chars() {
        pty.send(&c.to_string());
    }
    pty.send("\r");
    pty.expect(&format!("psm: command denied by policy: {cmd}"), T);
    pty.expect("psm$ ", T);
    wait_command(&w, &cmd, "deny");
    assert!(Path::new(&path).exists());
    // typed with a mistake and backspaces
    pty.send(&format!("rmx\x7f -f {path}\r"));
    pty.expect("psm: command denied by policy: rm -f", T);
    pty.expect("psm$ ", T);
    assert!(Path::new(&path).exists());
    // pasted at once, with a harmless line before it
    pty.send(&format!("echo \"PA\"\"STE\"\r{cmd}\r"));
    pty.expect("PASTE", T);
    pty.expect("psm: command denied by policy: rm -f", T);
    pty.expect("psm$ ", T);
    assert!(Path::new(&path).exists());
    // recalled from history: a command that was allowed, denied once a rule says so
    pty.send_line("echo \"HIS\"\"TORY\"");
    pty.expect("HISTORY", T);
    pty.expect("psm$ ", T);
    rule(&w, r"^echo .HIS", "deny");
    // the relay applies the new rule with the next snapshot
    w.psm.wait_policy_applied();
    pty.send("\x1b[A");
    pty.send("\r");
    pty.expect("psm: command denied by policy: echo \"HIS\"\"TORY\"", T);
    pty.expect("psm$ ", T);
    // an allowed line still runs
    pty.send_line("echo \"STI\"\"LL-OK\"");
    pty.expect("STILL-OK", T);
    pty.send_line("exit");
    assert_eq!(pty.wait(T), Some(0));
    let events = command_events(&w);
    assert!(
        events
            .iter()
            .any(|e| jstr(e, "line") == "echo \"STI\"\"LL-OK\""
                && jstr(e, "decision") == "allow"
                && jstr(e, "source") == "shell"),
        "{events:?}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_shell_without_a_terminal_is_decided_line_by_line() {
    let w = World::new();
    let path = canary(&w, "stdin");
    rule(&w, r"^rm\s", "deny");
    let script = format!("echo first\nrm -f {path}\necho after\n");
    let mut c = w.ssh();
    c.arg("-T").stdin(Stdio::piped());
    let out = run_cmd(&mut c, Some(script.as_bytes()), CMD_TIMEOUT);
    let stdout = out.stdout_str();
    assert!(
        stdout.contains("first") && stdout.contains("after"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr_str()
            .contains("psm: command denied by policy: rm -f"),
        "{}",
        out.describe()
    );
    assert!(Path::new(&path).exists());
    let e = wait_command(&w, &format!("rm -f {path}"), "deny");
    assert_eq!(jstr(&e, "source"), "stdin");
    let _ = std::fs::remove_file(&path);
}
