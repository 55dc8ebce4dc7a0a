//! Interactive pty sessions through psm under a real pseudo-terminal: the client's TERM and
//! window size reach the target, a resize is passed on, the live session is listed, and `exit`
//! ends the client with status 0.

use psm_tests::*;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[test]
fn pty_shell_term_size_resize_and_exit() {
    let w = World::new();
    let mark = w.psm.audit_mark();
    let mut cmd = w.ssh();
    cmd.arg("-tt");
    let mut pty = PtySession::spawn(&cmd, &[("TERM", "vt220")], 24, 80);

    // the quotes keep the typed (echoed) command from matching the output
    pty.send_line("echo \"RE\"\"ADY\"");
    pty.expect("READY", T);
    pty.send_line("echo \"T\"\"ERM=$TERM\"");
    assert_eq!(
        pty.expect_line_after("TERM=", T),
        "vt220",
        "client TERM must reach the target"
    );
    pty.send_line("echo \"S\"\"Z1=$(stty size)\"");
    assert_eq!(
        pty.expect_line_after("SZ1=", T),
        "24 80",
        "initial window size"
    );
    pty.send_line("tty >/dev/null && echo \"TT\"\"Y=yes\"");
    assert_eq!(
        pty.expect_line_after("TTY=", T),
        "yes",
        "the target side must have a pty"
    );

    // the live session is listed by psmctl
    let listed = wait_for(Duration::from_secs(5), || {
        let out = w.psm.psmctl(&["sessions", "list", "--json"], None);
        out.success()
            && json_objects(&out.stdout_str())
                .iter()
                .any(|s| s.to_string().contains("alice") && s.to_string().contains("web01"))
    });
    assert!(
        listed,
        "psmctl sessions list --json does not show alice's live session:\n{}",
        w.psm
            .psmctl(&["sessions", "list", "--json"], None)
            .describe()
    );

    pty.resize(40, 132);
    wait_size(&mut pty, "40 132");
    pty.send_line("echo \"S\"\"Z2=$(stty size)\"");
    assert_eq!(
        pty.expect_line_after("SZ2=", T),
        "40 132",
        "window size after resize"
    );

    pty.resize(30, 100);
    wait_size(&mut pty, "30 100");
    pty.send_line("echo \"S\"\"Z3=$(stty size)\"");
    assert_eq!(
        pty.expect_line_after("SZ3=", T),
        "30 100",
        "window size after a second resize"
    );

    pty.send_line("exit");
    let code = pty.wait(T);
    assert_eq!(
        code,
        Some(0),
        "ssh must exit 0 after `exit`; terminal output:\n{}",
        pty.output()
    );

    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the pty session",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_end",
    );
    assert_eq!(
        end.get("exit_status").and_then(Value::as_u64),
        Some(0),
        "{end}"
    );

    // no longer listed once over
    let gone = wait_for(Duration::from_secs(5), || {
        let out = w.psm.psmctl(&["sessions", "list", "--json"], None);
        out.success() && json_objects(&out.stdout_str()).is_empty()
    });
    assert!(
        gone,
        "session still listed after it ended:\n{}",
        w.psm
            .psmctl(&["sessions", "list", "--json"], None)
            .describe()
    );
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
