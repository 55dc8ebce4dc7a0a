//! Session recordings: a pty session and an exec session are recorded, listed by psmctl, exported
//! as plain text and as asciicast v2, played back, and tied to their audit events.

use psm_tests::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn listed_ids(w: &World) -> Vec<String> {
    let out = w.psm.psmctl(&["recordings", "list", "--json"], None);
    assert!(out.success(), "{}", out.describe());
    json_objects(&out.stdout_str())
        .iter()
        .map(|r| {
            r.get("id")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("recording without a string `id`: {r}"))
                .to_string()
        })
        .collect()
}

/// Checks asciicast v2; returns the concatenated "o" event data.
fn check_asciicast(text: &str) -> String {
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("asciicast header is not JSON ({e}):\n{text}"));
    assert_eq!(
        header.get("version").and_then(Value::as_u64),
        Some(2),
        "header: {header}"
    );
    assert!(
        header
            .get("width")
            .and_then(Value::as_u64)
            .is_some_and(|w| w > 0),
        "header width: {header}"
    );
    assert!(
        header
            .get("height")
            .and_then(Value::as_u64)
            .is_some_and(|h| h > 0),
        "header height: {header}"
    );
    let mut out = String::new();
    let mut last_t = 0.0f64;
    let mut n_o = 0;
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let ev: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("asciicast line is not JSON ({e}): {line}"));
        let arr = ev
            .as_array()
            .unwrap_or_else(|| panic!("asciicast event is not an array: {line}"));
        assert_eq!(
            arr.len(),
            3,
            "asciicast event needs [time, code, data]: {line}"
        );
        let t = arr[0]
            .as_f64()
            .unwrap_or_else(|| panic!("event time not a number: {line}"));
        assert!(
            t >= last_t - 1e-6,
            "event times must not go backwards: {line}"
        );
        last_t = t;
        let code = arr[1]
            .as_str()
            .unwrap_or_else(|| panic!("event code not a string: {line}"));
        let data = arr[2]
            .as_str()
            .unwrap_or_else(|| panic!("event data not a string: {line}"));
        if code == "o" {
            n_o += 1;
            out.push_str(data);
        }
    }
    assert!(n_o > 0, "no \"o\" events in the asciicast:\n{text}");
    out
}

#[test]
fn sessions_are_recorded_listed_exported_and_played() {
    let w = World::new();
    let marker = format!("PSMREC-{}-SHOWN", std::process::id());
    let (m1, m2) = marker.split_at(6);

    // an interactive session printing the marker (split in the typed command, so only the
    // command's output holds it whole)
    let mark = w.psm.audit_mark();
    let mut cmd = w.ssh();
    cmd.arg("-tt");
    let mut pty = PtySession::spawn(&cmd, &[("TERM", "xterm")], 24, 80);
    pty.send_line("echo \"RE\"\"ADY\"");
    pty.expect("READY", T);
    pty.send_line(&format!("echo \"{m1}\"\"{m2}\""));
    pty.expect(&marker, T);
    pty.send_line("exit");
    assert_eq!(pty.wait(T), Some(0), "{}", pty.output());
    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the pty session",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_end",
    );
    let pty_rec = jstr(&end, "recording_id").to_string();
    assert!(
        !pty_rec.is_empty(),
        "session_end without recording_id: {end}"
    );

    // an exec session
    let exec_marker = format!("EXECREC-{}-SHOWN", std::process::id());
    let (e1, e2) = exec_marker.split_at(4);
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg(format!("echo \"{e1}\"\"{e2}\"")));
    assert!(out.success(), "{}", out.describe());
    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the exec session",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_end",
    );
    let exec_rec = jstr(&end, "recording_id").to_string();
    assert!(
        !exec_rec.is_empty() && exec_rec != pty_rec,
        "exec recording id {exec_rec:?} vs pty {pty_rec:?}"
    );

    // listed, and on disk
    let listed = wait_for(Duration::from_secs(5), || {
        let ids = listed_ids(&w);
        ids.contains(&pty_rec) && ids.contains(&exec_rec)
    });
    assert!(
        listed,
        "recordings list --json lacks {pty_rec} / {exec_rec}: {:?}",
        listed_ids(&w)
    );
    for id in [&pty_rec, &exec_rec] {
        let f = w
            .psm
            .data_dir()
            .join("recordings")
            .join(format!("{id}.psmrec"));
        assert!(f.is_file(), "{} missing", f.display());
    }

    // plain text
    let text = w.psm.psmctl_ok(
        &["recordings", "export", &pty_rec, "--format", "text"],
        None,
    );
    assert!(
        text.contains(&marker),
        "text export lacks the marker {marker}:\n{text}"
    );
    let text = w.psm.psmctl_ok(
        &["recordings", "export", &exec_rec, "--format", "text"],
        None,
    );
    assert!(
        text.contains(&exec_marker),
        "text export of the exec session lacks {exec_marker}:\n{text}"
    );

    // asciicast v2, to a file
    let cast = w.psm.work_dir().join("pty.cast");
    w.psm.psmctl_ok(
        &[
            "recordings",
            "export",
            &pty_rec,
            "--format",
            "asciicast",
            "-o",
            &cast.display().to_string(),
        ],
        None,
    );
    let cast_text = std::fs::read_to_string(&cast).expect("read asciicast export");
    let shown = check_asciicast(&cast_text);
    assert!(
        shown.contains(&marker),
        "asciicast output events lack the marker:\n{cast_text}"
    );
    let header: Value =
        serde_json::from_str(cast_text.lines().next().unwrap_or_default()).expect("header");
    assert_eq!(
        header.get("width").and_then(Value::as_u64),
        Some(80),
        "pty width: {header}"
    );
    assert_eq!(
        header.get("height").and_then(Value::as_u64),
        Some(24),
        "pty height: {header}"
    );

    if run_cmd(
        Command::new("sh").args(["-c", "command -v asciinema"]),
        None,
        T,
    )
    .success()
    {
        // asciinema 2.x `cat` opens /dev/tty: give it a terminal
        let mut cat = Command::new("asciinema");
        cat.arg("cat").arg(&cast);
        let mut term = PtySession::spawn(&cat, &[("TERM", "xterm")], 24, 80);
        let code = term.wait(T);
        assert_eq!(
            code,
            Some(0),
            "asciinema cat rejects the export:\n{}",
            term.output()
        );
        assert!(
            term.output().contains(&marker),
            "asciinema cat lacks the marker:\n{}",
            term.output()
        );
    } else {
        panic!("asciinema is not installed: scripts/test.sh installs it");
    }

    // playback
    let out = w.psm.psmctl_timeout(
        &["recordings", "play", &pty_rec, "--speed", "100"],
        None,
        Duration::from_secs(60),
    );
    assert!(out.success(), "recordings play:\n{}", out.describe());
    assert!(
        out.stdout_str().contains(&marker),
        "playback lacks the marker:\n{}",
        out.describe()
    );

    // an unknown recording is an error
    let out = w.psm.psmctl(
        &[
            "recordings",
            "export",
            "no-such-recording",
            "--format",
            "text",
        ],
        None,
    );
    assert!(
        !out.success(),
        "export of an unknown id must fail\n{}",
        out.describe()
    );
}
