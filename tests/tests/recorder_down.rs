//! Recording is mandatory: with psm-recorder gone, new sessions are refused with a clear message
//! while the relay keeps serving, and they work again once the recorder is back. Under `psm up`
//! the launcher brings a killed recorder back by itself.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use psm_tests::*;
use std::time::Duration;

const UNAVAILABLE: &str = "psm: session recording is unavailable; try again later";

#[test]
fn sessions_fail_closed_while_the_recorder_is_down() {
    let mut w = World::with_mode(PsmMode::Separate);
    w.psm.kill_recorder();
    w.psm.wait_recorder_link(false);

    for attempt in 0..2 {
        let mark = w.psm.audit_mark();
        let out = run_ssh(w.ssh().arg("echo must-not-run"));
        let line = assert_refused(&out, UNAVAILABLE);
        assert_eq!(line, UNAVAILABLE, "attempt {attempt}: {}", out.describe());
        assert!(
            out.stdout.is_empty(),
            "attempt {attempt}: an unrecorded session ran\n{}",
            out.describe()
        );
        let started: Vec<_> = w
            .psm
            .audit()
            .into_iter()
            .skip(mark)
            .filter(|e| jstr(e, "event") == "session_start")
            .collect();
        assert!(
            started.is_empty(),
            "a session started without the recorder: {started:?}"
        );
    }
    w.psm.wait_audit(
        "session_denied while the recorder is down",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_denied" && !jstr(e, "reason").is_empty(),
    );
    // the relay is still up and still authenticates
    assert!(port_open(w.psm.port()), "relay stopped listening");
    let out = run_ssh(
        w.ssh_as(&alice_login(), &w.psm.work_dir().join("nokey"))
            .arg("true"),
    );
    assert_eq!(out.code(), Some(255), "{}", out.describe());

    w.psm.start_recorder();
    w.wait_session_works(&alice_login(), Duration::from_secs(10));
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo recorded-again"));
    assert_eq!(out.stdout_str(), "recorded-again\n", "{}", out.describe());
    let end = w.psm.wait_audit_after(
        mark,
        "session_end after the recorder came back",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_end",
    );
    let rec = jstr(&end, "recording_id").to_string();
    let out = w.psm.psmctl_ok(&["recordings", "list", "--json"], None);
    assert!(
        json_objects(&out)
            .iter()
            .any(|r| r.get("id").and_then(|v| v.as_str()) == Some(rec.as_str())),
        "recording {rec} not listed after the recorder restart:\n{out}"
    );
}

#[test]
fn psm_up_restarts_a_killed_recorder() {
    let w = World::new();
    let needle = w.psm.data_dir().display().to_string();
    let before = pids_matching(&needle, Some("psm-recorder"));
    assert_eq!(
        before.len(),
        1,
        "expected one psm-recorder under psm up, found {before:?}"
    );
    let _ = kill(Pid::from_raw(before[0] as i32), Signal::SIGKILL);
    let back = wait_for(Duration::from_secs(20), || {
        let now = pids_matching(&needle, Some("psm-recorder"));
        !now.is_empty() && now != before
    });
    assert!(
        back,
        "psm up did not restart psm-recorder within 20 s\n{}",
        w.psm.logs()
    );
    w.wait_session_works(&alice_login(), Duration::from_secs(20));
}
