//! Audit log rotation and retention, end to end: with a tiny `--audit-rotate-bytes` psm-control
//! closes several segments (each ending with a signed rotation checkpoint); `psmctl audit
//! verify` and `psm-verify` (given the data directory) say OK and name the segments; an edit
//! in a closed segment is located by segment and line; then, with audit retention, the oldest
//! segment is deleted after its `retention` event and both verifiers say "deleted by
//! retention", not "missing"; psm-verify also says so of a recording retention deleted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use psm_tests::*;

const T: Duration = Duration::from_secs(20);

/// `psmctl audit verify` and `psm-verify --pubkey … --audit DATA [RECORDINGS…]`, after
/// checking that both exit statuses say `ok`.
fn verify_both(w: &World, ok: bool, recordings: &[PathBuf]) -> (String, String) {
    let ctl = w.psm.psmctl(&["audit", "verify"], None);
    assert_eq!(ctl.success(), ok, "psmctl audit verify: {}", ctl.describe());
    let data = w.psm.data_dir();
    let standalone = run_cmd(
        Command::new(bin("psm-verify"))
            .arg("--pubkey")
            .arg(data.join("evidence.pub"))
            .arg("--audit")
            .arg(data)
            .args(recordings),
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

fn both_say(outs: &(String, String), needle: &str) {
    for (who, out) in [("psmctl", &outs.0), ("psm-verify", &outs.1)] {
        assert!(
            out.contains(needle),
            "{who} does not say {needle:?}:\n{out}"
        );
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_string()
}

#[test]
fn rotated_segments_verify_tampering_is_located_and_retention_is_told_from_missing() {
    let opts = PsmOpts {
        control_args: vec!["--audit-rotate-bytes".into(), "1024".into()],
        ..Default::default()
    };
    let mut w = World::build_opts(PsmMode::Separate, Sshd::start(), opts);
    let data = w.psm.data_dir().to_path_buf();

    // sessions until psm-control has closed at least three segments
    let mut recording = String::new();
    for i in 0..30 {
        if audit_segments(&data).len() >= 3 {
            break;
        }
        let mark = w.psm.audit_mark();
        let out = run_ssh(w.ssh().arg(format!("echo session-{i}")));
        assert!(out.success(), "{}", out.describe());
        let end = w.psm.wait_audit_after(mark, "session_end", T, |e| {
            jstr(e, "event") == "session_end"
        });
        recording = jstr(&end, "recording_id").to_string();
    }
    let segments = audit_segments(&data);
    assert!(segments.len() >= 3, "{segments:?}");
    assert_eq!(
        file_name(&segments[0]),
        "audit-00000000000000000001.jsonl",
        "closed segments are named by their first seq"
    );
    // each closed segment ends with its signed rotation checkpoint
    for seg in &segments {
        let text = fs::read_to_string(seg).expect("segment");
        let last: serde_json::Value =
            serde_json::from_str(text.lines().last().expect("a line")).expect("json");
        assert!(
            last.get("checkpoint").is_some() && jstr(&last, "message").contains("(rotation)"),
            "{}: {last}",
            seg.display()
        );
    }
    // tail reads across segments: the first event is still there
    let tail = w
        .psm
        .psmctl(&["audit", "tail", "-n", "100000", "--json"], None);
    assert!(tail.success(), "{}", tail.describe());
    let events: Vec<serde_json::Value> = serde_json::from_str(&tail.stdout_str()).expect("json");
    assert_eq!(events.first().and_then(|e| e["seq"].as_u64()), Some(1));

    // untouched: OK from both, naming the segments
    let outs = verify_both(&w, true, &[]);
    both_say(&outs, "OK: ");
    both_say(&outs, &format!("in {} segments", segments.len() + 1));
    for seg in &segments {
        both_say(&outs, &file_name(seg));
    }

    // an edited event in the second closed segment: located by segment and line
    let victim = &segments[1];
    let original = fs::read_to_string(victim).expect("segment");
    let second: serde_json::Value =
        serde_json::from_str(original.lines().nth(1).expect("line 2")).expect("json");
    let seq = second["seq"].as_u64().expect("seq");
    let ts = second["ts_ms"].as_u64().expect("ts");
    let edited = original.replacen(
        &format!("\"seq\":{seq},\"ts_ms\":{ts}"),
        &format!("\"seq\":{seq},\"ts_ms\":{}", ts + 1),
        1,
    );
    assert_ne!(edited, original);
    fs::write(victim, &edited).expect("tamper");
    let outs = verify_both(&w, false, &[]);
    both_say(
        &outs,
        &format!(
            "{} line 3: event seq {} (line 2) was modified",
            file_name(victim),
            seq
        ),
    );
    fs::write(victim, &original).expect("restore");
    verify_both(&w, true, &[]);

    // audit retention: psm-control restarted with a budget smaller than the closed segments,
    // and recordings kept for a second
    let total: u64 = audit_segments(&data)
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    let budget = (total - 1).to_string();
    w.psm.kill_control();
    w.psm.set_control_args(&[
        "--audit-rotate-bytes",
        "1024",
        "--audit-retention-max-bytes",
        &budget,
        "--retention-max-age",
        "1s",
        "--retention-interval",
        "1s",
    ]);
    w.psm.start_control();
    let first = file_name(&segments[0]);
    let e = w.psm.wait_audit(
        "retention of the first audit segment",
        Duration::from_secs(45),
        |e| jstr(e, "event") == "retention" && e["audit_segment"]["file"] == first.as_str(),
    );
    assert_eq!(jstr(&e, "reason"), "max_bytes", "{e}");
    assert_eq!(e["audit_segment"]["first_seq"], 1, "{e}");
    assert!(
        wait_for(Duration::from_secs(5), || !segments[0].exists()),
        "the segment is gone"
    );
    assert!(data.join("audit.jsonl").exists(), "the live segment stays");
    let last_seq = e["audit_segment"]["last_seq"].as_u64().expect("last_seq");
    // the recording of a finished session goes too
    w.psm
        .wait_audit("retention of a recording", Duration::from_secs(45), |e| {
            jstr(e, "event") == "retention" && jstr(e, "recording_id") == recording
        });
    let rec = data.join("recordings").join(format!("{recording}.psmrec"));
    assert!(
        wait_for(Duration::from_secs(5), || !rec.exists()),
        "the recording is gone"
    );

    let outs = verify_both(&w, true, &[rec]);
    both_say(
        &outs,
        &format!("segment {first} (seq 1..{last_seq}) deleted by retention"),
    );
    for (who, out) in [("psmctl", &outs.0), ("psm-verify", &outs.1)] {
        assert!(!out.contains("missing"), "{who}:\n{out}");
    }
    assert!(
        outs.1
            .contains(&format!("{recording}: DELETED: deleted by retention")),
        "psm-verify:\n{}",
        outs.1
    );
}
