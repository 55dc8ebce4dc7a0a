//! Tamper evidence, end to end: a real session's recording and the audit log verify as OK with
//! `psmctl` and with the standalone `psm-verify` (given only the files and the public key); a
//! flipped byte, a dropped, swapped or cut chunk, a removed trailer, an edited audit event and a
//! deleted audit line are each reported, with where, by both; a recorder or relay killed with
//! SIGKILL mid-session leaves a recording that replays up to its last chunk and verifies as
//! truncated.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use psm_recorder_format::file::frame_spans;
use psm_tests::*;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// A child process killed when dropped.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pubkey(w: &World) -> PathBuf {
    w.psm.data_dir().join("evidence.pub")
}

fn recording_path(w: &World, id: &str) -> PathBuf {
    w.psm
        .data_dir()
        .join("recordings")
        .join(format!("{id}.psmrec"))
}

/// `psmctl recordings verify ID` and `psm-verify --pubkey … FILE`: both outputs, after
/// checking both exit statuses say `ok`.
fn verify_recording(w: &World, id: &str, ok: bool) -> (String, String) {
    let ctl = w.psm.psmctl(&["recordings", "verify", id], None);
    assert_eq!(
        ctl.success(),
        ok,
        "psmctl recordings verify: {}",
        ctl.describe()
    );
    let standalone = run_cmd(
        Command::new(bin("psm-verify"))
            .arg("--pubkey")
            .arg(pubkey(w))
            .arg(recording_path(w, id)),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        standalone.code(),
        Some(if ok { 0 } else { 1 }),
        "psm-verify: {}",
        standalone.describe()
    );
    (ctl.stdout_str(), standalone.stdout_str())
}

/// `psmctl audit verify` and `psm-verify --pubkey … --audit audit.jsonl`.
fn verify_audit(w: &World, ok: bool) -> (String, String) {
    let ctl = w.psm.psmctl(&["audit", "verify"], None);
    assert_eq!(ctl.success(), ok, "psmctl audit verify: {}", ctl.describe());
    let standalone = run_cmd(
        Command::new(bin("psm-verify"))
            .arg("--pubkey")
            .arg(pubkey(w))
            .arg("--audit")
            .arg(w.psm.data_dir().join("audit.jsonl")),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        standalone.code(),
        Some(if ok { 0 } else { 1 }),
        "psm-verify: {}",
        standalone.describe()
    );
    (ctl.stdout_str(), standalone.stdout_str())
}

/// Asserts that both outputs contain every one of `needles` (one of each group of
/// alternatives separated by `|`).
fn both_say(outs: &(String, String), needles: &[&str]) {
    for (who, out) in [("psmctl", &outs.0), ("psm-verify", &outs.1)] {
        for n in needles {
            assert!(
                n.split('|').any(|alt| out.contains(alt)),
                "{who} does not say {n:?}:\n{out}"
            );
        }
    }
}

/// The chunk count in "truncated after chunk N", if the output says so.
fn truncated_after(out: &str) -> Option<u64> {
    let at = out.find("truncated after chunk ")? + "truncated after chunk ".len();
    out[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Starts a session that prints `tick-N` four times a second for 10 s, waits until its
/// recording has at least three sealed chunks, and returns it with the recording id.
fn long_session(w: &World) -> (Bg, String) {
    let mark = w.psm.audit_mark();
    let child = w
        .ssh()
        .arg("for i in $(seq 1 40); do echo tick-$i; sleep 0.25; done")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ssh");
    let bg = Bg(child);
    let start = w.psm.wait_audit_after(mark, "session_start", T, |e| {
        jstr(e, "event") == "session_start"
    });
    let id = jstr(&start, "recording_id").to_string();
    assert!(
        !id.is_empty(),
        "session_start without recording_id: {start}"
    );
    // a recording being written reads as truncated after its last sealed chunk
    let mut last = String::new();
    let grown = wait_for(T, || {
        last = w
            .psm
            .psmctl(&["recordings", "verify", &id], None)
            .stdout_str();
        truncated_after(&last).is_some_and(|n| n >= 3)
    });
    assert!(grown, "the live recording did not reach 3 chunks:\n{last}");
    (bg, id)
}

/// Text export of a recording (works on truncated ones too).
fn export_text(w: &World, id: &str) -> String {
    w.psm
        .psmctl_ok(&["recordings", "export", id, "--format", "text"], None)
}

#[test]
fn recording_tampering_is_detected_and_located() {
    let w = World::new();
    let pk = w.psm.psmctl_ok(&["recordings", "pubkey"], None);
    assert!(
        pk.starts_with("ed25519:") && pk.trim().len() == 8 + 64,
        "{pk}"
    );
    assert_eq!(
        fs::read_to_string(pubkey(&w)).expect("evidence.pub").trim(),
        pk.trim()
    );
    let mark = w.psm.audit_mark();
    let out = run_ssh(
        w.ssh()
            .arg("for i in $(seq 1 8); do echo tick-$i; sleep 0.7; done"),
    );
    assert!(out.success(), "{}", out.describe());
    let end = w.psm.wait_audit_after(mark, "session_end", T, |e| {
        jstr(e, "event") == "session_end"
    });
    let id = jstr(&end, "recording_id").to_string();
    let path = recording_path(&w, &id);
    // the recorder finishes the file after the relay's CLOSE: wait until it verifies
    let mut last = String::new();
    let done = wait_for(T, || {
        let o = w.psm.psmctl(&["recordings", "verify", &id], None);
        last = o.stdout_str();
        o.success()
    });
    assert!(done, "the recording never verified:\n{last}");
    let outs = verify_recording(&w, &id, true);
    both_say(&outs, &[&format!("{id}: OK: "), "signed by key"]);
    let all = w.psm.psmctl(&["recordings", "verify", "--all"], None);
    assert!(all.success(), "{}", all.describe());
    assert!(
        all.stdout_str().contains(" OK, 0 not OK") && all.stdout_str().contains(&id),
        "{}",
        all.describe()
    );

    let original = fs::read(&path).expect("recording");
    let spans = frame_spans(&original);
    // format version 5: the header, then chunk n at spans[n] (at least 5), the trailer
    assert!(original.starts_with(psm_recorder_format::file::MAGIC_CHUNKED));
    assert!(spans.len() >= 7, "only {} spans", spans.len());
    let splice = |order: &[usize]| {
        let mut b = original[..spans[0].start].to_vec();
        for &i in order {
            b.extend_from_slice(&original[spans[i].clone()]);
        }
        b
    };
    let every: Vec<usize> = (0..spans.len()).collect();
    let tamper = |bytes: &[u8], needles: &[&str]| {
        fs::write(&path, bytes).expect("write");
        let outs = verify_recording(&w, &id, false);
        both_say(&outs, needles);
        fs::write(&path, &original).expect("restore");
        outs
    };

    // one byte flipped inside chunk 3's compressed records (after the CHUNK record's head)
    let mut flipped = original.clone();
    flipped[spans[3].start + 8] ^= 0x01;
    tamper(&flipped, &["FAILED|TRUNCATED", "chunk 3|after chunk 2"]);

    // chunk 3 dropped
    let dropped: Vec<usize> = every.iter().copied().filter(|&i| i != 3).collect();
    tamper(
        &splice(&dropped),
        &[
            "FAILED",
            "chunk 3 is missing",
            "chunk 4 found where chunk 3 was expected",
        ],
    );

    // chunks 2 and 3 swapped
    let mut swapped = every.clone();
    swapped.swap(2, 3);
    tamper(&splice(&swapped), &["FAILED", "chunk 2 is out of order"]);

    // cut inside chunk 4: truncated, and it still replays up to there
    let cut = &original[..(spans[4].start + spans[4].end) / 2];
    fs::write(&path, cut).expect("write");
    let outs = verify_recording(&w, &id, false);
    both_say(
        &outs,
        &[
            "TRUNCATED",
            "truncated after chunk 3 (",
            "signature missing",
        ],
    );
    assert!(export_text(&w, &id).contains("tick-1"));
    fs::write(&path, &original).expect("restore");

    // the trailer removed
    tamper(
        &original[..spans[spans.len() - 2].end],
        &["FAILED", "trailer missing"],
    );

    // untouched again
    verify_recording(&w, &id, true);
}

#[test]
fn audit_tampering_is_detected_and_located() {
    let mut w = World::with_mode(PsmMode::Separate);
    for i in 0..3 {
        let out = run_ssh(w.ssh().arg(format!("echo audited-{i}")));
        assert!(out.success(), "{}", out.describe());
    }
    w.psm.wait_audit("three session_end", T, |_| {
        w.psm.audit_of("session_end").len() >= 3
    });
    // live log: chained, no checkpoint yet (every 1000 events by default)
    let outs = verify_audit(&w, true);
    both_say(
        &outs,
        &["OK: ", "hash chain intact", "no signed checkpoint"],
    );

    // psm-control stops: it writes a signed checkpoint
    let needle = w.psm.data_dir().display().to_string();
    let pids = pids_matching(&needle, Some("psm-control"));
    assert_eq!(pids.len(), 1, "{pids:?}");
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGTERM).expect("SIGTERM psm-control");
    assert!(
        wait_for(T, || pids_matching(&needle, Some("psm-control")).is_empty()),
        "psm-control did not stop"
    );
    let log = w.psm.data_dir().join("audit.jsonl");
    let text = fs::read_to_string(&log).expect("audit.jsonl");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a line")).expect("json");
    assert_eq!(jstr(&last, "event"), "notice", "{last}");
    assert_eq!(jstr(&last, "kind"), "audit checkpoint", "{last}");
    assert!(last.get("checkpoint").is_some(), "{last}");
    let outs = verify_audit(&w, true);
    both_say(&outs, &["OK: ", "1 signed checkpoint(s)"]);

    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 6, "{text}");
    // one event edited: the first line naming alice that is not among the last two
    let k = lines
        .iter()
        .position(|l| l.contains("\"alice\""))
        .filter(|&k| k + 2 < lines.len())
        .expect("a line about alice");
    let mut edited = lines.clone();
    let changed = lines[k].replacen("\"alice\"", "\"mallory\"", 1);
    edited[k] = &changed;
    fs::write(&log, edited.join("\n") + "\n").expect("write");
    let outs = verify_audit(&w, false);
    both_say(
        &outs,
        &[
            "FAILED",
            &format!("line {}: ", k + 2),
            &format!("(line {}) was modified", k + 1),
        ],
    );

    // one line deleted
    let mut without = lines.clone();
    let gone: serde_json::Value = serde_json::from_str(lines[3]).expect("json");
    without.remove(3);
    fs::write(&log, without.join("\n") + "\n").expect("write");
    let outs = verify_audit(&w, false);
    both_say(
        &outs,
        &[
            "FAILED",
            "line 4: ",
            &format!("event seq {} is missing", gone["seq"]),
        ],
    );

    // restored, and psm-control goes on with the chain after a restart
    fs::write(&log, text.clone()).expect("restore");
    let ends_before = w.psm.audit_of("session_end").len();
    w.psm.start_control();
    let out = run_ssh(w.ssh().arg("echo after-restart"));
    assert!(out.success(), "{}", out.describe());
    // (the harness's own readiness session ended before the restart too: count from here)
    w.psm.wait_audit("a session_end after the restart", T, |_| {
        w.psm.audit_of("session_end").len() > ends_before
    });
    let outs = verify_audit(&w, true);
    both_say(&outs, &["OK: ", "not signed yet"]);
}

#[test]
fn killed_recorder_leaves_a_truncated_recording_that_replays() {
    let mut w = World::with_mode(PsmMode::Separate);
    let (mut bg, id) = long_session(&w);
    w.psm.kill_recorder();
    // the relay ends the session it can no longer record
    assert!(
        wait_child(&mut bg.0, T).is_some(),
        "the session went on without its recorder"
    );
    let outs = verify_recording(&w, &id, false);
    both_say(&outs, &["TRUNCATED", "signature missing"]);
    let n = truncated_after(&outs.0).expect("truncated after chunk N");
    assert!(n >= 3, "{}", outs.0);
    assert_eq!(truncated_after(&outs.1), Some(n), "{}", outs.1);
    let text = export_text(&w, &id);
    // everything up to the last sealed chunk (at least two ticks) replays
    assert!(text.contains("tick-1") && text.contains("tick-2"), "{text}");
}

#[test]
fn killed_relay_leaves_a_truncated_recording_that_replays() {
    let w = World::with_mode(PsmMode::Separate);
    let (_bg, id) = long_session(&w);
    for pid in w.psm.relay_pids() {
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL psm-relay");
    }
    // the recorder sees the link drop and closes the recording, signed as far as it got
    let mut last = String::new();
    let closed = wait_for(T, || {
        last = w
            .psm
            .psmctl(&["recordings", "verify", &id], None)
            .stdout_str();
        last.contains("the recorder closed it")
    });
    assert!(closed, "the recorder did not close the recording:\n{last}");
    let outs = verify_recording(&w, &id, false);
    both_say(
        &outs,
        &[
            "TRUNCATED",
            "truncated after chunk",
            "relay link lost",
            "signed by key",
        ],
    );
    let text = export_text(&w, &id);
    // everything up to the last sealed chunk (at least two ticks) replays
    assert!(text.contains("tick-1") && text.contains("tick-2"), "{text}");
}
