//! Retention: recordings older than the configured age are deleted by psm-control, each
//! deletion audited before the file goes; a live session's recording is kept; `recordings
//! verify` says "deleted by retention" rather than failing on a missing file; search no longer
//! finds what the deleted recording held.

use std::process::Stdio;
use std::time::Duration;

use psm_tests::*;

#[test]
fn old_recordings_are_deleted_audited_and_verify_says_so() {
    let opts = PsmOpts {
        config: Some(
            "[control]\nretention_max_age = \"1s\"\nretention_interval = \"1s\"\n".to_string(),
        ),
        ..Default::default()
    };
    let w = World::build_opts(PsmMode::Up, Sshd::start(), opts);
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo recorded-then-expired"));
    assert!(out.success(), "{}", out.describe());
    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the short session",
        Duration::from_secs(10),
        |e| jstr(e, "event") == "session_end" && e["bytes_down"].as_u64() >= Some(22),
    );
    let id = jstr(&end, "recording_id").to_string();
    let file = w
        .psm
        .data_dir()
        .join("recordings")
        .join(format!("{id}.psmrec"));
    assert!(file.exists(), "recorded first");
    // indexed as it was written: found by search (retention leaves a recording alone for its
    // first 5 s, so it cannot be gone before this looks)
    let hits = |w: &World| {
        let out = w
            .psm
            .psmctl_ok(&["recordings", "search", "recorded-then-expired"], None);
        out.lines().filter(|l| l.contains(&id)).count()
    };
    assert!(
        wait_for(Duration::from_secs(3), || hits(&w) > 0),
        "the session's output is in the search index"
    );
    // a live session's recording is kept however old it gets
    let mut live = w
        .ssh()
        .arg("echo live; sleep 60")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let start = w.psm.wait_audit_after(
        mark,
        "session_start of the live session",
        Duration::from_secs(10),
        |e| jstr(e, "event") == "session_start" && jstr(e, "recording_id") != id,
    );
    let live_file = w
        .psm
        .data_dir()
        .join("recordings")
        .join(format!("{}.psmrec", jstr(&start, "recording_id")));

    // retention waits for the relays to announce their sessions after a start, then looks
    // every second: the expired recording goes, its deletion audited with the reason
    let e = w.psm.wait_audit(
        "retention of the expired recording",
        Duration::from_secs(45),
        |e| jstr(e, "event") == "retention" && jstr(e, "recording_id") == id,
    );
    assert_eq!(jstr(&e, "reason"), "max_age", "{e}");
    assert!(e["bytes"].as_u64().unwrap_or(0) > 0, "{e}");
    assert!(
        wait_for(Duration::from_secs(5), || !file.exists()),
        "the file is gone"
    );
    assert!(live_file.exists(), "a live session's recording is kept");
    assert_eq!(
        hits(&w),
        0,
        "search finds nothing of a recording retention deleted"
    );
    let v = w.psm.psmctl(&["recordings", "verify", &id], None);
    assert!(v.success(), "{}", v.describe());
    assert!(
        v.stdout_str()
            .contains(&format!("{id}: DELETED: deleted by retention")),
        "{}",
        v.describe()
    );
    // a recording nobody ever had is still an error
    let v = w.psm.psmctl(&["recordings", "verify", "1a2b3c"], None);
    assert!(!v.success(), "{}", v.describe());
    let _ = live.kill();
    let _ = live.wait();
}
