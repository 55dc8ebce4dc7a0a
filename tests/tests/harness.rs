//! Checks of the harness itself against a plain OpenSSH sshd (no psm involved): if these fail,
//! the other tests' failures say nothing about psm.

use psm_tests::*;
use std::time::Duration;

#[test]
fn sshd_accepts_the_target_key() {
    let sshd = Sshd::start();
    let out = run_ssh(
        sshd.direct_ssh()
            .arg("id -un; echo out; echo err >&2; exit 7"),
    );
    assert_eq!(out.code(), Some(7), "{}", out.describe());
    assert_eq!(
        out.stdout_str(),
        format!("{TARGET_USER}\nout\n"),
        "{}",
        out.describe()
    );
    assert_eq!(out.stderr_str(), "err\n", "{}", out.describe());
}

#[test]
fn sshd_accepts_the_target_password_via_askpass() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let askpass = dir.path().join("askpass");
    let out = run_ssh(
        password_ssh(sshd.port(), TARGET_USER, TARGET_PASSWORD, &askpass).arg("echo pw-ok"),
    );
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout_str(), "pw-ok\n");
    let out = run_ssh(
        password_ssh(sshd.port(), TARGET_USER, "wrong-password", &askpass).arg("echo pw-ok"),
    );
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(
        out.stderr_str().contains("Permission denied"),
        "{}",
        out.describe()
    );
}

#[test]
fn pty_driver_types_reads_and_resizes() {
    let sshd = Sshd::start();
    let mut cmd = sshd.direct_ssh();
    cmd.arg("-tt");
    let mut pty = PtySession::spawn(&cmd, &[("TERM", "vt220")], 24, 80);
    let t = Duration::from_secs(20);
    pty.send_line("echo \"RE\"\"ADY\"");
    pty.expect("READY", t);
    pty.send_line("echo \"T\"\"ERM=$TERM\"");
    assert_eq!(pty.expect_line_after("TERM=", t), "vt220");
    pty.send_line("echo \"S\"\"Z1=$(stty size)\"");
    assert_eq!(pty.expect_line_after("SZ1=", t), "24 80");
    pty.resize(40, 132);
    wait_size(&mut pty, "40 132");
    pty.send_line("echo \"S\"\"Z2=$(stty size)\"");
    assert_eq!(pty.expect_line_after("SZ2=", t), "40 132");
    pty.send_line("exit 0");
    assert_eq!(pty.wait(t), Some(0), "output:\n{}", pty.output());
}

/// Waits until the shell under `pty` sees the terminal size `want` ("rows cols"): the resize
/// reaches the target asynchronously.
fn wait_size(pty: &mut PtySession, want: &str) {
    let mut seen = String::new();
    let ok = wait_for(Duration::from_secs(10), || {
        pty.send_line("echo \"W\"\"SZ=$(stty size)\"");
        seen = pty.expect_line_after("WSZ=", Duration::from_secs(10));
        seen == want
    });
    assert!(ok, "the terminal size never became {want} (last {seen})");
}
