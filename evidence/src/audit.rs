//! The audit log's hash chain and signed checkpoints, and their verification.
//!
//! `audit.jsonl` holds one JSON object per line. psm-control adds to every line it writes a
//! field `"prev_hash"`: the SHA-256, in hex, of the bytes of the line before it (without its
//! newline; 64 zeros for the first line of a log). Lines made only of white space are not part
//! of the chain. Every so often psm-control writes a checkpoint line: a `notice` event of kind
//! `audit checkpoint` (so that every reader of audit events understands it) with one more field,
//! `"checkpoint":{"covers_seq":…,"chain_hash":…,"key_id":…,"signature":…}`: `chain_hash` is the
//! hash of the line before it (the head of the chain) and `signature` the evidence key's
//! Ed25519 signature of [`checkpoint_message`]. A checkpoint therefore vouches for every line
//! before it.
//!
//! What the chain shows: a line that was changed, removed, inserted or moved (the next line's
//! `prev_hash` no longer matches, and `seq` no longer runs on), up to the last line. What it
//! cannot show on its own: lines cut off the end after the last checkpoint, or a log cut back
//! to an earlier checkpoint; that needs a copy of a later checkpoint kept elsewhere (the SIEM).

use std::fmt;
use std::io::{self, BufRead};

use crate::{hex, sha256, unhex, Hash, KeyId, PublicKey};

/// Name of the field that carries the previous line's hash.
pub const PREV_FIELD: &str = "prev_hash";
/// The field that makes a line a checkpoint.
pub const CHECKPOINT_FIELD: &str = "checkpoint";
/// The notice `kind` of checkpoint lines.
pub const CHECKPOINT_KIND: &str = "audit checkpoint";
/// The `prev_hash` of the first line of a log.
pub const GENESIS: Hash = [0u8; 32];
/// Problems listed at most by a report (the count goes on).
const MAX_PROBLEMS: usize = 100;

/// The hash of one line (without its newline), as the next line carries it.
pub fn line_hash(line: &[u8]) -> Hash {
    sha256(&[line])
}

/// Whether a line is left out of the chain (empty or only white space).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Adds `"<name>":<json value>` as the last field of a JSON object serialized on one line.
/// `None` when `object` is not `{…}`.
pub fn add_field(object: &[u8], name: &str, value: &[u8]) -> Option<Vec<u8>> {
    let body = object.strip_suffix(b"}")?;
    if !object.starts_with(b"{") {
        return None;
    }
    let mut line = Vec::with_capacity(object.len() + name.len() + value.len() + 4);
    line.extend_from_slice(body);
    if body != b"{" {
        line.push(b',');
    }
    line.push(b'"');
    line.extend_from_slice(name.as_bytes());
    line.extend_from_slice(b"\":");
    line.extend_from_slice(value);
    line.push(b'}');
    Some(line)
}

/// Adds `"prev_hash":"<hex>"` as the last field of a JSON object serialized on one line.
/// `None` when `object` is not `{…}`.
pub fn chain_line(object: &[u8], prev: &Hash) -> Option<Vec<u8>> {
    add_field(object, PREV_FIELD, format!("\"{}\"", hex(prev)).as_bytes())
}

/// The value of a checkpoint's `checkpoint` field (a JSON object), signed with `key`, for the
/// line with `seq` and `ts_ms` that follows the line whose hash is `chain_hash`.
pub fn checkpoint_field(
    seq: u64,
    ts_ms: u64,
    chain_hash: &Hash,
    key: &crate::EvidenceKey,
) -> Vec<u8> {
    let kid = key.public().key_id();
    let covers = seq.saturating_sub(1);
    let sig = key.sign(&checkpoint_message(seq, ts_ms, covers, chain_hash, kid));
    format!(
        r#"{{"covers_seq":{covers},"chain_hash":"{}","key_id":"{kid}","signature":"{}"}}"#,
        hex(chain_hash),
        hex(&sig)
    )
    .into_bytes()
}

/// The bytes a checkpoint's signature covers.
pub fn checkpoint_message(
    seq: u64,
    ts_ms: u64,
    covers_seq: u64,
    chain_hash: &Hash,
    key_id: KeyId,
) -> Vec<u8> {
    format!(
        "psm audit checkpoint v1\nseq {seq}\nts_ms {ts_ms}\ncovers_seq {covers_seq}\nchain_hash {}\nkey_id {key_id}\n",
        hex(chain_hash)
    )
    .into_bytes()
}

/// One thing wrong with an audit log, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditProblem {
    /// Line number in the file (1-based).
    pub line: u64,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.what)
    }
}

/// What [`verify_log`] found.
#[derive(Clone, Debug, Default)]
pub struct AuditReport {
    /// Non-blank lines read.
    pub lines: u64,
    /// Lines that parsed as events (checkpoints included).
    pub events: u64,
    /// First and last `seq` seen.
    pub seq_range: Option<(u64, u64)>,
    /// Lines at the start written before the log was chained (no `prev_hash`).
    pub unchained: u64,
    /// Checkpoints whose chain hash and signature hold.
    pub good_checkpoints: u64,
    /// The last good checkpoint: its `seq`, the `seq` it covers, its time, and its key.
    pub last_checkpoint: Option<(u64, u64, u64, KeyId)>,
    /// Non-blank lines after the last good checkpoint (chained, not signed yet).
    pub after_checkpoint: u64,
    /// What is wrong (at most 100 listed; see `more_problems`).
    pub problems: Vec<AuditProblem>,
    /// Problems beyond those listed.
    pub more_problems: u64,
    /// Remarks that are not failures (a torn line left by a crash, signatures not checked).
    pub notes: Vec<String>,
}

impl AuditReport {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, line: u64, what: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(AuditProblem { line, what });
        } else {
            self.more_problems += 1;
        }
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = match self.seq_range {
            Some((a, b)) => format!(" (seq {a}..{b})"),
            None => String::new(),
        };
        if self.ok() {
            write!(f, "OK: {} events{range}, hash chain intact", self.events)?;
        } else {
            write!(
                f,
                "FAILED: {} problem(s) in {} events{range}",
                self.problems.len() as u64 + self.more_problems,
                self.events
            )?;
        }
        match self.last_checkpoint {
            Some((seq, covers, ts, key)) => write!(
                f,
                "; {} signed checkpoint(s), the last at seq {seq} ({}) covers seq 1..{covers}, key {key}",
                self.good_checkpoints,
                crate::utc(ts)
            )?,
            None => write!(f, "; no signed checkpoint")?,
        }
        if self.after_checkpoint > 0 && self.last_checkpoint.is_some() {
            write!(
                f,
                "; {} line(s) after it are chained but not signed yet",
                self.after_checkpoint
            )?;
        }
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        if self.more_problems > 0 {
            write!(f, "\n  … and {} more", self.more_problems)?;
        }
        for n in &self.notes {
            write!(f, "\n  note: {n}")?;
        }
        Ok(())
    }
}

/// What is known of the last chained line.
struct Prev {
    line: u64,
    hash: Hash,
    seq: Option<u64>,
}

/// Reads an audit log and checks its chain, its `seq` order and its checkpoints (their
/// signatures too when `key` is given).
pub fn verify_log(mut r: impl BufRead, key: Option<&PublicKey>) -> io::Result<AuditReport> {
    let mut rep = AuditReport::default();
    let mut prev: Option<Prev> = None;
    let mut chained = false;
    // seqs skipped over so far: a later line with one of them was moved, not lost
    let mut gaps: Vec<(u64, u64, u64)> = Vec::new(); // (first, last, line where noticed)
    let mut max_seq: Option<u64> = None;
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    let mut torn_last = false;
    if key.is_none() {
        rep.notes
            .push("checkpoint signatures not checked (no public key given)".into());
    }
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        let terminated = buf.last() == Some(&b'\n');
        if terminated {
            buf.pop();
        }
        if is_blank(&buf) {
            continue;
        }
        rep.lines += 1;
        rep.after_checkpoint += 1;
        torn_last = !terminated;
        let hash = line_hash(&buf);
        let value: Option<serde_json::Value> = serde_json::from_slice(&buf).ok();
        let Some(obj) = value.as_ref().and_then(|v| v.as_object()) else {
            if terminated {
                rep.notes.push(format!(
                    "line {line_no} is not a JSON event (a write cut short by a crash); the next line's hash covers it"
                ));
            }
            prev = Some(Prev {
                line: line_no,
                hash,
                seq: prev.and_then(|p| p.seq),
            });
            continue;
        };
        rep.events += 1;
        let seq = obj.get("seq").and_then(|v| v.as_u64());
        let what = match seq {
            Some(s) => format!("event seq {s}"),
            None => "event without seq".to_string(),
        };
        // 1. the chain
        let expected = prev.as_ref().map_or(GENESIS, |p| p.hash);
        match obj.get(PREV_FIELD) {
            None if !chained => rep.unchained += 1,
            None => rep.problem(
                line_no,
                format!("{what} carries no {PREV_FIELD}: it was inserted, or edited"),
            ),
            Some(v) => {
                chained = true;
                let carried = v.as_str().and_then(unhex);
                if carried.as_deref() != Some(&expected[..]) {
                    let before = match &prev {
                        Some(Prev {
                            line, seq: Some(s), ..
                        }) => format!("event seq {s} (line {line})"),
                        Some(Prev { line, .. }) => format!("line {line}"),
                        None => "the start of the log".to_string(),
                    };
                    let moved_or_lost = match (prev.as_ref().and_then(|p| p.seq), seq) {
                        (Some(p), Some(s)) => s != p + 1,
                        _ => false,
                    };
                    if moved_or_lost {
                        rep.problem(
                            line_no,
                            format!("hash chain broken between {before} and {what}: events were removed or reordered here"),
                        );
                    } else if prev.is_none() {
                        rep.problem(
                            line_no,
                            format!("hash chain broken: {what} is not the first event of this log (the lines before it were removed)"),
                        );
                    } else {
                        rep.problem(
                            line_no,
                            format!(
                                "{before} was modified: its hash is not the one {what} carries"
                            ),
                        );
                    }
                }
            }
        }
        // 2. seq order
        if let Some(s) = seq {
            rep.seq_range = Some(match rep.seq_range {
                None => (s, s),
                Some((a, b)) => (a.min(s), b.max(s)),
            });
            match max_seq {
                Some(m) if s <= m => {
                    if let Some(i) = gaps.iter().position(|&(a, b, _)| a <= s && s <= b) {
                        let (a, b, at) = gaps.remove(i);
                        if a < s {
                            gaps.push((a, s - 1, at));
                        }
                        if s < b {
                            gaps.push((s + 1, b, at));
                        }
                        rep.problem(
                            line_no,
                            format!("event seq {s} is out of order (it follows seq {m}): events were reordered"),
                        );
                    } else {
                        rep.problem(
                            line_no,
                            format!("event seq {s} appears again (after seq {m}): an event was duplicated or replayed"),
                        );
                    }
                }
                Some(m) if s > m + 1 => gaps.push((m + 1, s - 1, line_no)),
                _ => {}
            }
            max_seq = Some(max_seq.map_or(s, |m| m.max(s)));
        }
        // 3. checkpoints
        if let Some(cp) = obj.get(CHECKPOINT_FIELD) {
            match check_checkpoint(obj, cp, &expected, key) {
                Ok((covers, ts, kid)) => {
                    rep.good_checkpoints += 1;
                    rep.last_checkpoint = Some((seq.unwrap_or(0), covers, ts, kid));
                    rep.after_checkpoint = 0;
                }
                Err(why) => rep.problem(line_no, format!("checkpoint {what}: {why}")),
            }
        }
        prev = Some(Prev {
            line: line_no,
            hash,
            seq: seq.or(prev.and_then(|p| p.seq)),
        });
    }
    gaps.sort();
    for (a, b, at) in gaps {
        let which = if a == b {
            format!("event seq {a} is missing")
        } else {
            format!("events seq {a}..{b} are missing")
        };
        rep.problem(at, format!("{which} (removed before this line)"));
    }
    rep.problems.sort_by_key(|p| p.line);
    if torn_last {
        rep.notes.push(format!(
            "the last line ({line_no}) is incomplete: a write cut short by a crash"
        ));
    }
    if rep.unchained > 0 {
        rep.notes.push(format!(
            "the first {} line(s) predate the hash chain and are not protected by it",
            rep.unchained
        ));
    }
    Ok(rep)
}

/// Checks one checkpoint line; returns the seq it covers, its time and its key id.
fn check_checkpoint(
    obj: &serde_json::Map<String, serde_json::Value>,
    cp: &serde_json::Value,
    expected: &Hash,
    key: Option<&PublicKey>,
) -> Result<(u64, u64, KeyId), String> {
    let num =
        |o: &serde_json::Value, k: &str| o.get(k).and_then(|v| v.as_u64()).ok_or(format!("no {k}"));
    let bytes = |k: &str| {
        cp.get(k)
            .and_then(|v| v.as_str())
            .and_then(unhex)
            .ok_or(format!("no {k}"))
    };
    let top = serde_json::Value::Object(obj.clone());
    let seq = num(&top, "seq")?;
    let ts = num(&top, "ts_ms")?;
    let covers = num(cp, "covers_seq")?;
    let chain = bytes("chain_hash")?;
    let kid = bytes("key_id")?;
    let sig = bytes("signature")?;
    let chain: Hash = chain
        .try_into()
        .map_err(|_| "chain_hash is not a SHA-256".to_string())?;
    let kid = KeyId(
        kid.try_into()
            .map_err(|_| "key_id is not 8 bytes".to_string())?,
    );
    if &chain != expected {
        return Err("its chain_hash is not the hash of the line before it".into());
    }
    if let Some(key) = key {
        if key.key_id() != kid {
            return Err(format!(
                "signed by key {kid}, not by the given key {}",
                key.key_id()
            ));
        }
        if !key.verify(&checkpoint_message(seq, ts, covers, &chain, kid), &sig) {
            return Err("signature invalid".into());
        }
    }
    Ok((covers, ts, kid))
}

#[cfg(test)]
mod tests {
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
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/audit_verify");
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
}
