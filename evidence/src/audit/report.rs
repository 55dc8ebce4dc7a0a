//! What verifying an audit log found: [`AuditReport`], its problems located by segment and
//! line, the segments and recordings retention deleted.

use std::fmt;

use crate::{Hash, KeyId};

/// Problems listed at most by a report (the count goes on).
const MAX_PROBLEMS: usize = 100;

/// One thing wrong with an audit log, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditProblem {
    /// The segment file, when the log was read as named segments.
    pub segment: Option<String>,
    /// Line number in the file (1-based).
    pub line: u64,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.segment {
            Some(s) => write!(f, "{s} line {}: {}", self.line, self.what),
            None => write!(f, "line {}: {}", self.line, self.what),
        }
    }
}

/// One segment as it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Its name (a file name or path, as given).
    pub name: String,
    /// Non-blank lines.
    pub lines: u64,
    /// First and last `seq` in it.
    pub seq_range: Option<(u64, u64)>,
}

/// An audit segment a `retention` event says was deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetiredSegment {
    /// The segment's file name.
    pub file: String,
    /// Its first and last `seq`.
    pub first_seq: u64,
    /// Its last `seq` (its rotation checkpoint).
    pub last_seq: u64,
    /// The hash of its last line: what the next segment's first line carries.
    pub last_hash: Hash,
    /// When it was deleted (the retention event's time, ms since the epoch).
    pub deleted_ms: u64,
    /// `max_age` or `max_bytes`.
    pub reason: String,
}

/// A recording a `retention` event says was deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletedRecording {
    /// The recording id.
    pub recording_id: String,
    /// When it was deleted (ms since the epoch).
    pub deleted_ms: u64,
    /// `max_age` or `max_bytes`.
    pub reason: String,
}

/// What [`super::verify_log`] or [`super::ChainVerifier`] found.
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
    /// The named segments read, in order (empty for a single unnamed log).
    pub segments: Vec<SegmentSummary>,
    /// Segments missing from the chain that retention deleted (each named by a `retention`
    /// event), in `seq` order.
    pub deleted_by_retention: Vec<RetiredSegment>,
    /// Recordings deleted by retention, from the `retention` events read.
    pub deleted_recordings: Vec<DeletedRecording>,
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

    pub(super) fn problem(&mut self, segment: Option<String>, line: u64, what: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(AuditProblem {
                segment,
                line,
                what,
            });
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
        let segments = match self.segments.len() {
            0 | 1 => String::new(),
            n => format!(" in {n} segments"),
        };
        if self.ok() {
            write!(
                f,
                "OK: {} events{range}{segments}, hash chain intact",
                self.events
            )?;
        } else {
            write!(
                f,
                "FAILED: {} problem(s) in {} events{range}{segments}",
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
        for d in &self.deleted_by_retention {
            write!(
                f,
                "\n  segment {} (seq {}..{}) deleted by retention at {} ({})",
                d.file,
                d.first_seq,
                d.last_seq,
                crate::utc(d.deleted_ms),
                d.reason
            )?;
        }
        if self.segments.len() > 1 {
            for s in &self.segments {
                match s.seq_range {
                    Some((a, b)) => write!(f, "\n  segment {}: seq {a}..{b}", s.name)?,
                    None => write!(f, "\n  segment {}: no events", s.name)?,
                }
            }
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
