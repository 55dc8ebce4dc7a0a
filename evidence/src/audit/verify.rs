//! Verification of an audit log: one file, or the segments of a rotated log in `seq` order.
//!
//! [`ChainVerifier`] reads the segments one after the other as one chain: the first line of a
//! segment carries the hash of the previous segment's last line (its rotation checkpoint). A
//! problem is located by segment, line and `seq`. When the chain breaks at the start of a
//! segment and `seq` jumps there, the verifier looks for `retention` events (in any segment
//! it read) that name the segments in between: when they cover the gap and the last of them
//! recorded the hash the surviving segment carries, the gap is reported as deleted by
//! retention, not as missing events.

use std::io::{self, BufRead};

use super::report::{AuditReport, DeletedRecording, RetiredSegment, SegmentSummary};
use super::{is_blank, line_hash, CHECKPOINT_FIELD, GENESIS, PREV_FIELD};
use crate::{unhex, Hash, KeyId, PublicKey};

/// What is known of the last chained line.
#[derive(Clone)]
struct Prev {
    segment: Option<String>,
    line: u64,
    hash: Hash,
    seq: Option<u64>,
}

impl Prev {
    fn describe(&self, here: &Option<String>) -> String {
        let line = match (&self.segment, self.segment != *here) {
            (Some(s), true) => format!("{s} line {}", self.line),
            _ => format!("line {}", self.line),
        };
        match self.seq {
            Some(s) => format!("event seq {s} ({line})"),
            None => line,
        }
    }
}

/// A segment whose first line does not chain to what came before and whose `seq` jumps:
/// deleted by retention or missing, decided once every retention event is read.
struct Boundary {
    segment: Option<String>,
    line: u64,
    /// The hash its first line carries.
    carried: Hash,
    /// The `seq`s not seen before it.
    from: u64,
    to: u64,
    /// Whether it is the first segment read (the older ones are all gone).
    leading: bool,
}

/// Checks an audit log read as one or more segments in order; [`verify_log`] for one file.
pub struct ChainVerifier<'k> {
    key: Option<&'k PublicKey>,
    rep: AuditReport,
    prev: Option<Prev>,
    chained: bool,
    /// `seq`s skipped over so far (first, last, segment, line where noticed): a later line
    /// with one of them was moved, not lost.
    gaps: Vec<(u64, u64, Option<String>, u64)>,
    max_seq: Option<u64>,
    boundaries: Vec<Boundary>,
    retired: Vec<RetiredSegment>,
    /// Where the last non-blank line was, and whether it was cut short.
    torn_last: Option<(Option<String>, u64)>,
}

impl<'k> ChainVerifier<'k> {
    /// A verifier that checks checkpoint signatures against `key` (when given).
    pub fn new(key: Option<&'k PublicKey>) -> Self {
        let mut rep = AuditReport::default();
        if key.is_none() {
            rep.notes
                .push("checkpoint signatures not checked (no public key given)".into());
        }
        ChainVerifier {
            key,
            rep,
            prev: None,
            chained: false,
            gaps: Vec::new(),
            max_seq: None,
            boundaries: Vec::new(),
            retired: Vec::new(),
            torn_last: None,
        }
    }

    /// Reads the next segment (`name`: how problems in it are located; `None` for a log read
    /// as a single file).
    pub fn read(&mut self, name: Option<&str>, mut r: impl BufRead) -> io::Result<()> {
        let segment = name.map(str::to_string);
        if let Some(n) = &segment {
            self.rep.segments.push(SegmentSummary {
                name: n.clone(),
                lines: 0,
                seq_range: None,
            });
        }
        let mut buf = Vec::new();
        let mut line_no = 0u64;
        let mut first = true;
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
            self.line(&segment, line_no, &buf, terminated, first);
            first = false;
        }
        Ok(())
    }

    fn line(
        &mut self,
        segment: &Option<String>,
        line_no: u64,
        buf: &[u8],
        terminated: bool,
        first: bool,
    ) {
        let rep = &mut self.rep;
        rep.lines += 1;
        rep.after_checkpoint += 1;
        if let Some(s) = rep.segments.last_mut().filter(|_| segment.is_some()) {
            s.lines += 1;
        }
        self.torn_last = (!terminated).then(|| (segment.clone(), line_no));
        let hash = line_hash(buf);
        let value: Option<serde_json::Value> = serde_json::from_slice(buf).ok();
        let Some(obj) = value.as_ref().and_then(|v| v.as_object()) else {
            if terminated {
                let at = match segment {
                    Some(s) => format!("{s} line {line_no}"),
                    None => format!("line {line_no}"),
                };
                rep.notes.push(format!(
                    "{at} is not a JSON event (a write cut short by a crash); the next line's hash covers it"
                ));
            }
            self.prev = Some(Prev {
                segment: segment.clone(),
                line: line_no,
                hash,
                seq: self.prev.as_ref().and_then(|p| p.seq),
            });
            return;
        };
        rep.events += 1;
        let seq = obj.get("seq").and_then(|v| v.as_u64());
        let what = match seq {
            Some(s) => format!("event seq {s}"),
            None => "event without seq".to_string(),
        };
        // 1. the chain
        let expected = self.prev.as_ref().map_or(GENESIS, |p| p.hash);
        let mut boundary = false;
        match obj.get(PREV_FIELD) {
            None if !self.chained => rep.unchained += 1,
            None => rep.problem(
                segment.clone(),
                line_no,
                format!("{what} carries no {PREV_FIELD}: it was inserted, or edited"),
            ),
            Some(v) => {
                self.chained = true;
                let carried = v.as_str().and_then(unhex);
                if carried.as_deref() != Some(&expected[..]) {
                    let prev_seq = self.prev.as_ref().and_then(|p| p.seq);
                    let from = prev_seq.map_or(1, |p| p + 1);
                    let carried: Option<Hash> = carried.and_then(|c| c.try_into().ok());
                    if let (true, Some(s), Some(carried)) = (first, seq, carried) {
                        if s > from {
                            boundary = true;
                            self.boundaries.push(Boundary {
                                segment: segment.clone(),
                                line: line_no,
                                carried,
                                from,
                                to: s - 1,
                                leading: self.prev.is_none(),
                            });
                        }
                    }
                    if !boundary {
                        let before = match &self.prev {
                            Some(p) => p.describe(segment),
                            None => "the start of the log".to_string(),
                        };
                        let moved_or_lost = match (prev_seq, seq) {
                            (Some(p), Some(s)) => s != p + 1,
                            _ => false,
                        };
                        let message = if moved_or_lost {
                            format!("hash chain broken between {before} and {what}: events were removed or reordered here")
                        } else if self.prev.is_none() {
                            format!("hash chain broken: {what} is not the first event of this log (the lines before it were removed)")
                        } else {
                            format!("{before} was modified: its hash is not the one {what} carries")
                        };
                        rep.problem(segment.clone(), line_no, message);
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
            if let Some(seg) = rep.segments.last_mut().filter(|_| segment.is_some()) {
                seg.seq_range = Some(match seg.seq_range {
                    None => (s, s),
                    Some((a, b)) => (a.min(s), b.max(s)),
                });
            }
            match self.max_seq {
                Some(m) if s <= m => {
                    if let Some(i) = self.gaps.iter().position(|g| g.0 <= s && s <= g.1) {
                        let (a, b, gs, at) = self.gaps.remove(i);
                        if a < s {
                            self.gaps.push((a, s - 1, gs.clone(), at));
                        }
                        if s < b {
                            self.gaps.push((s + 1, b, gs, at));
                        }
                        rep.problem(
                            segment.clone(),
                            line_no,
                            format!("event seq {s} is out of order (it follows seq {m}): events were reordered"),
                        );
                    } else {
                        rep.problem(
                            segment.clone(),
                            line_no,
                            format!("event seq {s} appears again (after seq {m}): an event was duplicated or replayed"),
                        );
                    }
                }
                Some(m) if s > m + 1 && !boundary => {
                    self.gaps.push((m + 1, s - 1, segment.clone(), line_no))
                }
                _ => {}
            }
            self.max_seq = Some(self.max_seq.map_or(s, |m| m.max(s)));
        }
        // 3. checkpoints
        if let Some(cp) = obj.get(CHECKPOINT_FIELD) {
            match check_checkpoint(obj, cp, &expected, self.key) {
                Ok((covers, ts, kid)) => {
                    rep.good_checkpoints += 1;
                    rep.last_checkpoint = Some((seq.unwrap_or(0), covers, ts, kid));
                    rep.after_checkpoint = 0;
                }
                Err(why) => rep.problem(
                    segment.clone(),
                    line_no,
                    format!("checkpoint {what}: {why}"),
                ),
            }
        }
        // 4. what retention deleted
        if obj.get("event").and_then(|v| v.as_str()) == Some("retention") {
            self.retention_event(obj);
        }
        self.prev = Some(Prev {
            segment: segment.clone(),
            line: line_no,
            hash,
            seq: seq.or(self.prev.as_ref().and_then(|p| p.seq)),
        });
    }

    fn retention_event(&mut self, obj: &serde_json::Map<String, serde_json::Value>) {
        let deleted_ms = obj.get("ts_ms").and_then(|v| v.as_u64()).unwrap_or(0);
        let reason = obj
            .get("reason")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if let Some(seg) = obj.get("audit_segment") {
            let num = |k: &str| seg.get(k).and_then(|v| v.as_u64());
            let hash = seg
                .get("last_hash")
                .and_then(|v| v.as_str())
                .and_then(unhex)
                .and_then(|h| Hash::try_from(h).ok());
            let file = seg.get("file").and_then(|v| v.as_str());
            if let (Some(file), Some(first_seq), Some(last_seq), Some(last_hash)) =
                (file, num("first_seq"), num("last_seq"), hash)
            {
                self.retired.push(RetiredSegment {
                    file: file.to_string(),
                    first_seq,
                    last_seq,
                    last_hash,
                    deleted_ms,
                    reason,
                });
            }
        } else if let Some(id) = obj.get("recording_id").and_then(|v| v.as_str()) {
            self.rep.deleted_recordings.push(DeletedRecording {
                recording_id: id.to_string(),
                deleted_ms,
                reason,
            });
        }
    }

    /// The report, once every segment was read.
    pub fn finish(mut self) -> AuditReport {
        self.retired.sort_by_key(|r| r.first_seq);
        for b in std::mem::take(&mut self.boundaries) {
            match self.covered(&b) {
                Some(found) => {
                    if b.leading && found[0].first_seq > b.from {
                        let upto = found[0].first_seq - 1;
                        self.rep.notes.push(format!(
                            "events seq {}..{upto} were in segments deleted by retention earlier (their retention events went with later deleted segments)",
                            b.from
                        ));
                    }
                    self.rep.deleted_by_retention.extend(found);
                }
                None if b.leading && b.segment.is_none() => self.rep.problem(
                    None,
                    b.line,
                    format!("hash chain broken: event seq {} is not the first event of this log (the lines before it were removed)", b.to + 1),
                ),
                None => {
                    let which = if b.from == b.to {
                        format!("event seq {} is missing", b.from)
                    } else {
                        format!("events seq {}..{} are missing", b.from, b.to)
                    };
                    self.rep.problem(
                        b.segment,
                        b.line,
                        format!("{which} before this segment: a segment was removed, and no retention event deleted it"),
                    );
                }
            }
        }
        self.gaps.sort();
        for (a, b, segment, at) in std::mem::take(&mut self.gaps) {
            let which = if a == b {
                format!("event seq {a} is missing")
            } else {
                format!("events seq {a}..{b} are missing")
            };
            self.rep
                .problem(segment, at, format!("{which} (removed before this line)"));
        }
        // in reading order: segments as they were read, then lines
        let order: Vec<String> = self.rep.segments.iter().map(|s| s.name.clone()).collect();
        self.rep.problems.sort_by_key(|p| {
            (
                p.segment
                    .as_ref()
                    .and_then(|s| order.iter().position(|o| o == s)),
                p.line,
            )
        });
        if let Some((segment, line)) = self.torn_last {
            let at = match segment {
                Some(s) => format!("{s} line {line}"),
                None => format!("line {line}"),
            };
            self.rep.notes.push(format!(
                "the last line ({at}) is incomplete: a write cut short by a crash"
            ));
        }
        if self.rep.unchained > 0 {
            self.rep.notes.push(format!(
                "the first {} line(s) predate the hash chain and are not protected by it",
                self.rep.unchained
            ));
        }
        self.rep
    }

    /// The retention events that account for a boundary's gap: the one that recorded the hash
    /// the segment carries must end just before it, and the others must cover the rest (for
    /// the first segment read, the older ones may have gone with later deleted segments).
    fn covered(&self, b: &Boundary) -> Option<Vec<RetiredSegment>> {
        let last = self
            .retired
            .iter()
            .find(|r| r.last_seq == b.to && r.last_hash == b.carried)?;
        let mut found = vec![last.clone()];
        let mut start = last.first_seq;
        while start > b.from {
            match self.retired.iter().find(|r| r.last_seq + 1 == start) {
                Some(r) => {
                    found.push(r.clone());
                    start = r.first_seq;
                }
                None if b.leading => break,
                None => return None,
            }
        }
        found.reverse();
        Some(found)
    }
}

/// Reads an audit log and checks its chain, its `seq` order and its checkpoints (their
/// signatures too when `key` is given).
pub fn verify_log(r: impl BufRead, key: Option<&PublicKey>) -> io::Result<AuditReport> {
    let mut v = ChainVerifier::new(key);
    v.read(None, r)?;
    Ok(v.finish())
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
        if !key.verify(
            &super::checkpoint_message(seq, ts, covers, &chain, kid),
            &sig,
        ) {
            return Err("signature invalid".into());
        }
    }
    Ok((covers, ts, kid))
}
