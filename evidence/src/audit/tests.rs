use super::*;
use crate::EvidenceKey;

/// A log of `n` events with a checkpoint after every `every`, as psm-control writes it.
fn log(n: u64, every: u64, key: &EvidenceKey) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut prev = GENESIS;
    let mut seq = 0;
    let mut since = 0;
    let push = |obj: String, prev: &mut Hash, lines: &mut Vec<Vec<u8>>| {
        let l = chain_line(obj.as_bytes(), prev).expect("object");
        *prev = line_hash(&l);
        lines.push(l);
    };
    for _ in 0..n {
        seq += 1;
        push(
            format!(
                r#"{{"seq":{seq},"ts_ms":5,"origin":"control","event":"notice","message":"m{seq}"}}"#
            ),
            &mut prev,
            &mut lines,
        );
        since += 1;
        if since == every {
            since = 0;
            seq += 1;
            let obj = format!(
                r#"{{"seq":{seq},"ts_ms":7,"origin":"control","event":"notice","message":"checkpoint","kind":"audit checkpoint"}}"#
            );
            let cp = checkpoint_field(seq, 7, &prev, key);
            let obj = add_field(obj.as_bytes(), CHECKPOINT_FIELD, &cp).expect("object");
            push(String::from_utf8(obj).expect("utf8"), &mut prev, &mut lines);
        }
    }
    lines
}

fn join(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

fn check(lines: &[Vec<u8>], key: &EvidenceKey) -> AuditReport {
    verify_log(&join(lines)[..], Some(key.public())).expect("read")
}

#[test]
fn chain_line_appends_the_field() {
    assert_eq!(
        chain_line(b"{\"a\":1}", &GENESIS).expect("obj"),
        format!("{{\"a\":1,\"prev_hash\":\"{}\"}}", "0".repeat(64)).into_bytes()
    );
    assert!(chain_line(b"[1]", &GENESIS).is_none());
}

#[test]
fn untouched_log_is_ok() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let rep = check(&log(10, 4, &key), &key);
    assert!(rep.ok(), "{rep}");
    assert_eq!(rep.events, 12);
    assert_eq!(rep.good_checkpoints, 2);
    assert_eq!(rep.after_checkpoint, 2);
    assert!(
        rep.to_string().starts_with("OK: 12 events (seq 1..12)"),
        "{rep}"
    );
}

#[test]
fn an_edited_event_is_located() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let mut lines = log(10, 4, &key);
    let edited = String::from_utf8(lines[2].clone())
        .expect("utf8")
        .replace("m3", "m9");
    lines[2] = edited.into_bytes();
    let rep = check(&lines, &key);
    assert!(!rep.ok());
    assert_eq!(rep.problems.len(), 1, "{rep}");
    assert_eq!(rep.problems[0].line, 4);
    assert!(
        rep.problems[0]
            .what
            .contains("event seq 3 (line 3) was modified"),
        "{rep}"
    );
}

#[test]
fn a_deleted_line_is_located() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let mut lines = log(10, 4, &key);
    lines.remove(6); // seq 7
    let rep = check(&lines, &key);
    assert!(!rep.ok());
    let text = rep.to_string();
    assert!(text.contains("event seq 7 is missing"), "{text}");
    assert!(text.contains("removed or reordered"), "{text}");
}

#[test]
fn swapped_lines_are_reordered_not_missing() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let mut lines = log(10, 4, &key);
    lines.swap(1, 2);
    let rep = check(&lines, &key);
    let text = rep.to_string();
    assert!(text.contains("event seq 2 is out of order"), "{text}");
    assert!(!text.contains("missing"), "{text}");
}

#[test]
fn a_forged_checkpoint_and_a_wrong_key_are_refused() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let (other, _) = EvidenceKey::generate().expect("key");
    let lines = log(4, 4, &key);
    let rep = check(&lines, &other);
    assert!(rep.to_string().contains("not by the given key"), "{rep}");
    let mut lines = log(4, 4, &key);
    let cp = String::from_utf8(lines[4].clone()).expect("utf8");
    let forged = cp.replace("\"ts_ms\":7", "\"ts_ms\":8");
    lines[4] = forged.into_bytes();
    let rep = check(&lines, &key);
    assert!(rep.to_string().contains("signature invalid"), "{rep}");
}

#[test]
fn torn_and_legacy_lines_are_notes() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let legacy = br#"{"seq":1,"ts_ms":1,"origin":"control","event":"notice","message":"old"}"#;
    let torn = br#"{"seq":2,"ts_ms""#;
    let mut prev = line_hash(torn);
    let mut lines = vec![legacy.to_vec(), torn.to_vec()];
    for seq in 2..4 {
        let l = chain_line(
            format!(
                r#"{{"seq":{seq},"ts_ms":5,"origin":"control","event":"notice","message":"x"}}"#
            )
            .as_bytes(),
            &prev,
        )
        .expect("obj");
        prev = line_hash(&l);
        lines.push(l);
    }
    let mut bytes = join(&lines);
    bytes.extend_from_slice(b"{\"seq\":4");
    let rep = verify_log(&bytes[..], Some(key.public())).expect("read");
    assert!(rep.ok(), "{rep}");
    assert_eq!(rep.unchained, 1);
    assert_eq!(rep.notes.len(), 3, "{rep}");
}

#[test]
#[ignore = "writes the fuzz corpus seeds: cargo test -p psm-evidence -- --ignored write_corpus_seeds"]
fn write_corpus_seeds() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/audit_verify");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let lines = log(6, 3, &key);
    std::fs::write(dir.join("chained"), join(&lines)).expect("write");
    let mut edited = lines.clone();
    edited[1] = String::from_utf8(edited[1].clone())
        .expect("utf8")
        .replace("m2", "mX")
        .into_bytes();
    std::fs::write(dir.join("edited"), join(&edited)).expect("write");
    let mut torn = join(&lines[..4]);
    torn.extend_from_slice(b"{\"seq\":9,\"ts");
    std::fs::write(dir.join("torn"), torn).expect("write");
    std::fs::write(
        dir.join("legacy"),
        b"{\"seq\":1,\"ts_ms\":1,\"origin\":\"control\",\"event\":\"notice\",\"message\":\"old\"}\n",
    )
    .expect("write");
    std::fs::write(dir.join("pubkey"), format!("{}\n", key.public())).expect("write");
}

/// Writes a chained log as psm-control does, segment by segment.
struct Writer<'a> {
    key: &'a EvidenceKey,
    prev: Hash,
    seq: u64,
    segments: Vec<Vec<Vec<u8>>>,
}

impl<'a> Writer<'a> {
    fn new(key: &'a EvidenceKey) -> Self {
        Writer {
            key,
            prev: GENESIS,
            seq: 0,
            segments: vec![Vec::new()],
        }
    }

    fn push(&mut self, obj: &[u8]) {
        let l = chain_line(obj, &self.prev).expect("object");
        self.prev = line_hash(&l);
        self.segments.last_mut().expect("segment").push(l);
    }

    fn events(&mut self, n: u64) {
        for _ in 0..n {
            self.seq += 1;
            let seq = self.seq;
            self.push(
                format!(r#"{{"seq":{seq},"ts_ms":5,"origin":"control","event":"notice","message":"m{seq}"}}"#)
                    .as_bytes(),
            );
        }
    }

    /// The rotation checkpoint, then a new segment.
    fn rotate(&mut self) {
        self.seq += 1;
        let seq = self.seq;
        let obj = format!(
            r#"{{"seq":{seq},"ts_ms":7,"origin":"control","event":"notice","message":"checkpoint","kind":"audit checkpoint"}}"#
        );
        let cp = checkpoint_field(seq, 7, &self.prev, self.key);
        let obj = add_field(obj.as_bytes(), CHECKPOINT_FIELD, &cp).expect("object");
        self.push(&obj);
        self.segments.push(Vec::new());
    }

    /// A retention event for segment `i` (as it is now).
    fn retire(&mut self, i: usize) {
        let seg = &self.segments[i];
        let seq_of = |l: &Vec<u8>| {
            serde_json::from_slice::<serde_json::Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        };
        let (first, last) = (seq_of(&seg[0]), seq_of(seg.last().expect("line")));
        let hash = hex(&line_hash(seg.last().expect("line")));
        self.seq += 1;
        let seq = self.seq;
        self.push(
            format!(
                r#"{{"seq":{seq},"ts_ms":9,"origin":"control","event":"retention","bytes":10,"reason":"max_age","modified_ms":1,"audit_segment":{{"file":"{}","first_seq":{first},"last_seq":{last},"last_hash":"{hash}"}}}}"#,
                name(i)
            )
            .as_bytes(),
        );
    }
}

fn name(i: usize) -> String {
    format!("seg-{i}.jsonl")
}

/// Verifies the segments whose index `keep` says, in order.
fn check_segments(w: &Writer, keep: &[usize]) -> AuditReport {
    let mut v = ChainVerifier::new(Some(w.key.public()));
    for &i in keep {
        v.read(Some(&name(i)), &join(&w.segments[i])[..])
            .expect("read");
    }
    v.finish()
}

#[test]
fn segments_verify_as_one_chain() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let mut w = Writer::new(&key);
    w.events(4);
    w.rotate();
    w.events(4);
    w.rotate();
    w.events(2);
    let rep = check_segments(&w, &[0, 1, 2]);
    assert!(rep.ok(), "{rep}");
    let text = rep.to_string();
    assert!(
        text.starts_with("OK: 12 events (seq 1..12) in 3 segments"),
        "{text}"
    );
    assert!(text.contains("segment seg-0.jsonl: seq 1..5"), "{text}");
    assert!(text.contains("segment seg-2.jsonl: seq 11..12"), "{text}");
    assert_eq!(rep.good_checkpoints, 2);
    // out of order, the chain says so
    let rep = check_segments(&w, &[1, 0, 2]);
    assert!(!rep.ok(), "{rep}");
}

#[test]
fn an_edit_in_a_closed_segment_is_located_by_segment_and_line() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let mut w = Writer::new(&key);
    w.events(4);
    w.rotate();
    w.events(4);
    w.rotate();
    w.events(2);
    w.segments[1][1] = String::from_utf8(w.segments[1][1].clone())
        .expect("utf8")
        .replace("m7", "m0")
        .into_bytes();
    let rep = check_segments(&w, &[0, 1, 2]);
    assert_eq!(rep.problems.len(), 1, "{rep}");
    assert!(
        rep.to_string()
            .contains("seg-1.jsonl line 3: event seq 7 (line 2) was modified"),
        "{rep}"
    );
    // a deleted line in a closed segment
    let mut w2 = Writer::new(&key);
    w2.events(4);
    w2.rotate();
    w2.events(4);
    w2.rotate();
    w2.segments[0].remove(2);
    let rep = check_segments(&w2, &[0, 1, 2]);
    let text = rep.to_string();
    assert!(
        text.contains("seg-0.jsonl line 3: event seq 3 is missing"),
        "{text}"
    );
}

#[test]
fn a_missing_segment_is_missing_unless_retention_deleted_it() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let mut w = Writer::new(&key);
    w.events(4);
    w.rotate();
    w.events(4);
    w.rotate();
    w.events(2);
    // removed by hand: missing, wherever it was
    let rep = check_segments(&w, &[1, 2]);
    let text = rep.to_string();
    assert!(
        text.contains("seg-1.jsonl line 1: events seq 1..5 are missing before this segment: a segment was removed, and no retention event deleted it"),
        "{text}"
    );
    let rep = check_segments(&w, &[0, 2]);
    let text = rep.to_string();
    assert!(
        text.contains("seg-2.jsonl line 1: events seq 6..10 are missing"),
        "{text}"
    );
    assert!(!text.contains("deleted by retention"), "{text}");

    // retention deletes the first segment, then the second, each after its event
    w.retire(0);
    w.retire(1);
    w.events(1);
    let rep = check_segments(&w, &[2]);
    assert!(rep.ok(), "{rep}");
    let text = rep.to_string();
    assert!(
        text.contains("segment seg-0.jsonl (seq 1..5) deleted by retention"),
        "{text}"
    );
    assert!(
        text.contains("segment seg-1.jsonl (seq 6..10) deleted by retention"),
        "{text}"
    );
    assert!(!text.contains("missing"), "{text}");
    // a retention event does not excuse another segment
    let mut w = Writer::new(&key);
    w.events(2);
    w.rotate();
    w.events(2);
    w.rotate();
    w.retire(0);
    let rep = check_segments(&w, &[0, 2]);
    assert!(
        rep.to_string().contains("events seq 4..6 are missing"),
        "{rep}"
    );
}

#[test]
fn recording_retention_events_are_collected() {
    let (key, _) = EvidenceKey::generate().expect("key");
    let mut w = Writer::new(&key);
    w.events(1);
    w.seq += 1;
    w.push(br#"{"seq":2,"ts_ms":9,"origin":"control","event":"retention","recording_id":"r-1","bytes":10,"reason":"max_bytes","modified_ms":1}"#);
    let rep = check_segments(&w, &[0]);
    assert!(rep.ok(), "{rep}");
    assert_eq!(
        rep.deleted_recordings,
        [DeletedRecording {
            recording_id: "r-1".into(),
            deleted_ms: 9,
            reason: "max_bytes".into()
        }]
    );
}
