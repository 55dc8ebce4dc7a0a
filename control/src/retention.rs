//! Retention of recordings: those older than a configured age, or beyond a size budget (the
//! oldest first), are deleted, and each deletion is an audit event (`retention`) written by the
//! audit log's one writer in the same step, so `recordings verify` can say "deleted by
//! retention" rather than "missing".
//!
//! psm-control runs it, not psm-recorder: the deletion and its audit event must come from the
//! process that writes the audit log. [`select`] decides without I/O (the listing, the live
//! sessions and `now` in, the deletions out); [`scan`] lists the files.
//!
//! Closed audit segments are retained the same way ([`select_segments`]: the oldest, by age or
//! beyond a budget, never the live segment); each deletion is a `retention` event naming the
//! segment, its `seq` range and its last line's hash, so verification says "deleted by
//! retention" rather than "missing".

use std::collections::HashSet;
use std::path::Path;

use psm_recorder_format::file::EXTENSION;

/// What retention keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Recordings last written longer ago than this are deleted (ms; none: kept by age).
    pub max_age_ms: Option<u64>,
    /// When the recordings take more than this, the oldest are deleted until they fit.
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Whether anything is ever deleted.
    pub fn enabled(&self) -> bool {
        self.max_age_ms.is_some() || self.max_bytes.is_some()
    }
}

/// A recording that must never be deleted yet, whatever the policy: one written in the last
/// few seconds may belong to a session a relay has not reported yet.
pub const MIN_QUIET_MS: u64 = 5_000;

/// One recording file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Recording id (the file name without `.psmrec`).
    pub id: String,
    /// Its size.
    pub bytes: u64,
    /// When it was last written (ms since the epoch).
    pub modified_ms: u64,
}

/// Why a recording was deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Older than the maximum age.
    Age,
    /// Beyond the size budget (the oldest go first).
    Size,
}

impl Why {
    /// As the audit event says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Age => "max_age",
            Why::Size => "max_bytes",
        }
    }
}

/// The recordings to delete now, oldest first. Recordings of live sessions and recordings
/// written in the last [`MIN_QUIET_MS`] are never chosen (they still count toward the budget).
pub fn select(
    mut all: Vec<Candidate>,
    live: &HashSet<String>,
    now_ms: u64,
    r: &Retention,
) -> Vec<(Candidate, Why)> {
    all.sort_by(|a, b| (a.modified_ms, &a.id).cmp(&(b.modified_ms, &b.id)));
    let mut total: u64 = all.iter().map(|c| c.bytes).sum();
    let mut out = Vec::new();
    for c in all {
        let age = now_ms.saturating_sub(c.modified_ms);
        if live.contains(&c.id) || age < MIN_QUIET_MS {
            continue;
        }
        let why = if r.max_age_ms.is_some_and(|max| age > max) {
            Some(Why::Age)
        } else if r.max_bytes.is_some_and(|max| total > max) {
            Some(Why::Size)
        } else {
            None
        };
        if let Some(why) = why {
            total -= c.bytes;
            out.push((c, why));
        }
    }
    out
}

/// The recording files in `dir`.
pub fn scan(dir: &Path) -> std::io::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(&format!(".{EXTENSION}")))
        else {
            continue;
        };
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        out.push(Candidate {
            id: id.to_string(),
            bytes: meta.len(),
            modified_ms,
        });
    }
    Ok(out)
}

/// The closed audit segments to delete now, oldest first: those closed longer ago than the
/// age, then the oldest while the closed segments take more than the budget. Only a prefix
/// of the segments (in `seq` order, which their names sort by) is ever chosen, so what
/// survives is one unbroken run of the chain; the live segment is never in `closed`.
pub fn select_segments(
    mut closed: Vec<Candidate>,
    now_ms: u64,
    r: &Retention,
) -> Vec<(Candidate, Why)> {
    closed.sort_by(|a, b| a.id.cmp(&b.id));
    let mut total: u64 = closed.iter().map(|c| c.bytes).sum();
    let mut out = Vec::new();
    for c in closed {
        let why = if r
            .max_age_ms
            .is_some_and(|max| now_ms.saturating_sub(c.modified_ms) > max)
        {
            Why::Age
        } else if r.max_bytes.is_some_and(|max| total > max) {
            Why::Size
        } else {
            break;
        };
        total -= c.bytes;
        out.push((c, why));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn c(id: &str, bytes: u64, modified_ms: u64) -> Candidate {
        Candidate {
            id: id.into(),
            bytes,
            modified_ms,
        }
    }

    #[test]
    fn old_recordings_go_by_age_and_the_oldest_go_by_size() {
        let now = 100 * DAY;
        let all = vec![
            c("new", 10, now - DAY),
            c("old", 10, now - 40 * DAY),
            c("older", 10, now - 50 * DAY),
            c("mid", 10, now - 10 * DAY),
        ];
        let none = HashSet::new();
        let by_age = Retention {
            max_age_ms: Some(30 * DAY),
            max_bytes: None,
        };
        let got: Vec<_> = select(all.clone(), &none, now, &by_age)
            .into_iter()
            .map(|(c, w)| (c.id, w))
            .collect();
        assert_eq!(
            got,
            vec![
                ("older".to_string(), Why::Age),
                ("old".to_string(), Why::Age)
            ]
        );
        // a 25-byte budget: the two oldest go, oldest first
        let by_size = Retention {
            max_age_ms: None,
            max_bytes: Some(25),
        };
        let got: Vec<_> = select(all.clone(), &none, now, &by_size)
            .into_iter()
            .map(|(c, w)| (c.id, w))
            .collect();
        assert_eq!(
            got,
            vec![
                ("older".to_string(), Why::Size),
                ("old".to_string(), Why::Size)
            ]
        );
        assert!(select(all, &none, now, &Retention::default()).is_empty());
    }

    #[test]
    fn live_and_fresh_recordings_are_never_deleted() {
        let now = 100 * DAY;
        let all = vec![
            c("live", 10, now - 40 * DAY),
            c("fresh", 10, now - 1000),
            c("old", 10, now - 40 * DAY),
        ];
        let live: HashSet<String> = ["live".to_string()].into();
        let r = Retention {
            max_age_ms: Some(1),
            max_bytes: Some(0),
        };
        let got: Vec<_> = select(all, &live, now, &r)
            .into_iter()
            .map(|(c, _)| c.id)
            .collect();
        assert_eq!(got, vec!["old".to_string()]);
    }
}

#[cfg(test)]
mod segment_tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn seg(first_seq: u64, bytes: u64, modified_ms: u64) -> Candidate {
        Candidate {
            id: format!("audit-{first_seq:020}.jsonl"),
            bytes,
            modified_ms,
        }
    }

    fn names(got: Vec<(Candidate, Why)>) -> Vec<(String, Why)> {
        got.into_iter().map(|(c, w)| (c.id, w)).collect()
    }

    #[test]
    fn the_oldest_segments_go_by_age_then_by_size() {
        let now = 100 * DAY;
        let closed = vec![
            seg(201, 10, now - DAY),
            seg(1, 10, now - 40 * DAY),
            seg(101, 10, now - 35 * DAY),
            seg(151, 10, now - 10 * DAY),
        ];
        let by_age = Retention {
            max_age_ms: Some(30 * DAY),
            max_bytes: None,
        };
        assert_eq!(
            names(select_segments(closed.clone(), now, &by_age)),
            [(seg(1, 0, 0).id, Why::Age), (seg(101, 0, 0).id, Why::Age)]
        );
        let both = Retention {
            max_age_ms: Some(30 * DAY),
            max_bytes: Some(15),
        };
        assert_eq!(
            names(select_segments(closed.clone(), now, &both)),
            [
                (seg(1, 0, 0).id, Why::Age),
                (seg(101, 0, 0).id, Why::Age),
                (seg(151, 0, 0).id, Why::Size)
            ]
        );
        assert!(select_segments(closed, now, &Retention::default()).is_empty());
    }

    #[test]
    fn only_a_prefix_of_the_chain_is_deleted() {
        let now = 100 * DAY;
        // the second segment is young (its mtime was touched): the third, older, stays too
        let closed = vec![
            seg(1, 10, now - 40 * DAY),
            seg(101, 10, now - DAY),
            seg(201, 10, now - 40 * DAY),
        ];
        let r = Retention {
            max_age_ms: Some(30 * DAY),
            max_bytes: None,
        };
        assert_eq!(
            names(select_segments(closed, now, &r)),
            [(seg(1, 0, 0).id, Why::Age)]
        );
    }
}
