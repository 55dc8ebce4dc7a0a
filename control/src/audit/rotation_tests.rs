//! Rotation, segments, and verification across them and across retention.

use super::*;
use psm_control_api::AuditSegment;
use psm_evidence::PublicKey;

fn notice(msg: &str) -> AuditEvent {
    AuditEvent {
        seq: 0,
        ts_ms: 5,
        origin: "relay-1".into(),
        kind: AuditKind::Notice {
            message: msg.into(),
            session_id: None,
            kind: None,
            count: None,
        },
    }
}

/// A log in a fresh directory that rotates every `bytes`, signing with a new key.
fn rotating(bytes: u64) -> (tempfile::TempDir, PathBuf, AuditLog, PublicKey) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("audit.jsonl");
    let (key, _) = EvidenceKey::generate().expect("key");
    let public = *key.public();
    let mut log = AuditLog::open(&path).expect("open");
    log.sign_checkpoints(key, 1000);
    log.rotate_when(Rotation {
        max_bytes: Some(bytes),
        max_age_ms: None,
    });
    (tmp, path, log, public)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn rotation_is_due_by_size_or_age_never_when_empty() {
    let r = Rotation {
        max_bytes: Some(100),
        max_age_ms: Some(1000),
    };
    assert!(!r.due(500, None, 10_000));
    assert!(r.due(100, Some(9_500), 10_000));
    assert!(!r.due(99, Some(9_500), 10_000));
    assert!(r.due(1, Some(9_000), 10_000));
    assert!(!Rotation::NEVER.due(u64::MAX, Some(0), u64::MAX));
    assert_eq!(Rotation::default().max_bytes, Some(64 << 20));
}

#[test]
fn segments_end_with_a_rotation_checkpoint_and_chain_on() {
    let (_tmp, path, mut log, public) = rotating(1000);
    for i in 0..30 {
        log.append(notice(&format!("event {i}"))).expect("append");
    }
    drop(log);
    let closed = closed_segments(&path).expect("segments");
    assert!(closed.len() >= 3, "{closed:?}");
    let mut next_first = 1;
    for seg in &closed {
        assert_eq!(seg.first_seq, next_first, "{seg:?}");
        assert_eq!(seg.file, format!("audit-{:020}.jsonl", seg.first_seq));
        let text = lines(&seg.path);
        let last: AuditEvent = serde_json::from_str(text.last().expect("line")).expect("event");
        assert!(
            matches!(&last.kind, AuditKind::Notice { kind: Some(k), message, .. }
                if k == "audit checkpoint" && message.contains("(rotation)")),
            "{last:?}"
        );
        next_first = last.seq + 1;
    }
    // the live segment starts right after the last closed one
    let first_live: AuditEvent = serde_json::from_str(&lines(&path)[0]).expect("live event");
    assert_eq!(first_live.seq, next_first);
    // tail reads across segments, in order
    let all = read_tail(&path, 1000).expect("tail");
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(seqs.len(), 30 + closed.len());
    let last3 = read_tail(&path, 3).expect("tail");
    assert_eq!(last3.len(), 3);
    assert_eq!(last3[2].seq, seqs.len() as u64);
    // one chain, OK, naming its segments
    let rep = verify(&path, Some(&public)).expect("verify");
    assert!(rep.ok(), "{rep}");
    let text = rep.to_string();
    assert!(
        text.contains(&format!("in {} segments", closed.len() + 1)),
        "{text}"
    );
    assert!(
        text.contains(&format!("segment audit/{}: seq 1..", closed[0].file)),
        "{text}"
    );
    assert_eq!(rep.good_checkpoints, closed.len() as u64);
    // reopened, seq and the chain go on
    let mut log = AuditLog::open(&path).expect("reopen");
    assert_eq!(log.next_seq(), seqs.len() as u64 + 1);
    log.append(notice("after")).expect("append");
    assert!(verify(&path, Some(&public)).expect("verify").ok());
}

#[test]
fn a_crash_between_the_steps_of_a_rotation_loses_and_repeats_nothing() {
    // after the rename, before the new live segment exists
    let (_tmp, path, mut log, public) = rotating(800);
    for i in 0..8 {
        log.append(notice(&format!("event {i}"))).expect("append");
    }
    drop(log);
    fs::remove_file(&path).ok(); // the live segment was just created empty, or not at all
    let closed = closed_segments(&path).expect("segments");
    let (last_seq, _) = segments::segment_tail(&closed.last().expect("one").path)
        .expect("tail")
        .expect("lines");
    let mut log = AuditLog::open(&path).expect("reopen");
    assert_eq!(log.next_seq(), last_seq + 1);
    log.append(notice("after the crash")).expect("append");
    let rep = verify(&path, Some(&public)).expect("verify");
    assert!(rep.ok(), "{rep}");

    // after the checkpoint, before the rename: the next append rotates
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("audit.jsonl");
    let (key, pkcs8) = EvidenceKey::generate().expect("key");
    let again = || EvidenceKey::from_pkcs8(&pkcs8, Path::new("-")).expect("key");
    let public = *key.public();
    let mut log = AuditLog::open(&path).expect("open");
    log.sign_checkpoints(key, 1000);
    for i in 0..5 {
        log.append(notice(&format!("event {i}"))).expect("append");
    }
    log.checkpoint("rotation").expect("checkpoint");
    drop(log);
    let mut log = AuditLog::open(&path).expect("reopen");
    log.sign_checkpoints(again(), 1000);
    log.rotate_when(Rotation {
        max_bytes: Some(100),
        max_age_ms: None,
    });
    log.append(notice("after the crash")).expect("append");
    drop(log);
    let closed = closed_segments(&path).expect("segments");
    assert_eq!(closed.len(), 1);
    let all = read_tail(&path, 100).expect("tail");
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=8).collect::<Vec<_>>(),
        "no event lost or repeated"
    );
    let rep = verify(&path, Some(&public)).expect("verify");
    assert!(rep.ok(), "{rep}");
}

#[test]
fn verify_locates_an_edit_in_a_closed_segment_and_a_missing_segment() {
    let (_tmp, path, mut log, public) = rotating(1000);
    for i in 0..30 {
        log.append(notice(&format!("event {i}"))).expect("append");
    }
    drop(log);
    let closed = closed_segments(&path).expect("segments");
    let second = &closed[1];
    let original = fs::read_to_string(&second.path).expect("read");
    // an edited event: located by segment, line and seq
    let first: AuditEvent =
        serde_json::from_str(original.lines().next().expect("line")).expect("event");
    let edited = original.replacen("event ", "EVENT ", 1);
    fs::write(&second.path, &edited).expect("write");
    let rep = verify(&path, Some(&public)).expect("verify");
    assert!(!rep.ok());
    let text = rep.to_string();
    assert!(
        text.contains(&format!(
            "audit/{} line 2: event seq {} (line 1) was modified",
            second.file, first.seq
        )),
        "{text}"
    );
    // a deleted line
    let mut without: Vec<&str> = original.lines().collect();
    without.remove(1);
    fs::write(&second.path, without.join("\n") + "\n").expect("write");
    let text = verify(&path, Some(&public)).expect("verify").to_string();
    assert!(
        text.contains(&format!("event seq {} is missing", first.seq + 1)),
        "{text}"
    );
    // the whole segment removed by hand: missing, not deleted by retention
    fs::remove_file(&second.path).expect("rm");
    let rep = verify(&path, Some(&public)).expect("verify");
    let text = rep.to_string();
    assert!(!rep.ok());
    assert!(
        text.contains("are missing before this segment: a segment was removed, and no retention event deleted it"),
        "{text}"
    );
    assert!(!text.contains("deleted by retention at"), "{text}");
}

#[test]
fn verify_says_deleted_by_retention_for_what_a_retention_event_names() {
    let (_tmp, path, mut log, public) = rotating(1000);
    for i in 0..30 {
        log.append(notice(&format!("event {i}"))).expect("append");
    }
    let closed = closed_segments(&path).expect("segments");
    for seg in &closed[..2] {
        let (last_seq, last_hash) = segments::segment_tail(&seg.path)
            .expect("tail")
            .expect("lines");
        log.append_control(AuditKind::Retention {
            recording_id: String::new(),
            bytes: seg.bytes,
            reason: "max_age".into(),
            modified_ms: seg.modified_ms,
            audit_segment: Some(AuditSegment {
                file: seg.file.clone(),
                first_seq: seg.first_seq,
                last_seq,
                last_hash: psm_evidence::hex(&last_hash),
            }),
        })
        .expect("retention event");
        fs::remove_file(&seg.path).expect("rm");
    }
    drop(log);
    let rep = verify(&path, Some(&public)).expect("verify");
    assert!(rep.ok(), "{rep}");
    let text = rep.to_string();
    for seg in &closed[..2] {
        assert!(
            text.contains(&format!("segment {} (seq {}..", seg.file, seg.first_seq))
                && text.contains("deleted by retention at"),
            "{text}"
        );
    }
    assert!(!text.contains("missing"), "{text}");
}
