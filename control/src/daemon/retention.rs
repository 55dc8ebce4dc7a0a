//! What retention deletes, done by the daemon: recordings and closed audit segments, each
//! after its `retention` audit event (the rules are in [`crate::retention`]).

use std::fs;

use psm_control_api::AuditKind;
use tracing::{error, info, warn};

use super::{lock, Shared};

impl Shared {
    /// Deletes the recordings retention no longer keeps, each after its `retention` audit
    /// event is written (an event that cannot be written keeps the file).
    pub(super) fn retention_sweep(&self) {
        let r = self.options.retention;
        let live: std::collections::HashSet<String> = lock(&self.sessions)
            .values()
            .map(|s| s.info.session.recording_id.clone())
            .collect();
        let all = match crate::retention::scan(&self.recordings_dir) {
            Ok(all) => all,
            Err(e) => {
                warn!(dir = %self.recordings_dir.display(), error = %e, "retention cannot list the recordings");
                return;
            }
        };
        let now = psm_control_api::now_ms();
        for (c, why) in crate::retention::select(all, &live, now, &r) {
            let path = self.recordings_dir.join(format!(
                "{}.{}",
                c.id,
                psm_recorder_format::file::EXTENSION
            ));
            let audited = lock(&self.audit).append_control(AuditKind::Retention {
                recording_id: c.id.clone(),
                bytes: c.bytes,
                reason: why.as_str().into(),
                modified_ms: c.modified_ms,
                audit_segment: None,
            });
            if let Err(e) = audited {
                error!(recording_id = %c.id, error = %e, "retention keeps the recording: its deletion cannot be audited");
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    info!(recording_id = %c.id, bytes = c.bytes, reason = why.as_str(), "recording deleted by retention");
                    self.forget_indexed(&c.id);
                }
                Err(e) => {
                    error!(recording_id = %c.id, error = %e, "retention cannot delete the recording");
                    let _ = lock(&self.audit).append_control(AuditKind::Notice {
                        message: format!("retention could not delete recording {}: {e}", c.id),
                        session_id: None,
                        kind: Some("retention failed".into()),
                        count: None,
                    });
                }
            }
        }
    }
}

impl Shared {
    /// Removes a deleted recording's lines from the search index, so that search finds
    /// nothing of it. The index is psm-recorder's (it may be absent, or busy for a moment);
    /// a failure is logged and `psmctl recordings reindex` rebuilds it.
    fn forget_indexed(&self, recording_id: &str) {
        let path = self.recordings_dir.join(psm_recorder_index::INDEX_FILE);
        if !path.exists() {
            return;
        }
        let forgotten =
            psm_recorder_index::IndexWriter::open(&path).and_then(|mut w| w.forget(recording_id));
        if let Err(e) = forgotten {
            warn!(recording_id = %recording_id, error = %e, "the search index still has a recording retention deleted (psmctl recordings reindex removes it)");
        }
    }
}

impl Shared {
    /// Deletes the closed audit segments retention no longer keeps, oldest first, each after
    /// its `retention` audit event (its file, `seq` range and last line's hash) is written.
    /// The audit log stays locked meanwhile, so no rotation runs between the listing and the
    /// deletions.
    pub(super) fn audit_retention_sweep(&self) {
        let r = self.options.audit_retention;
        if !r.enabled() {
            return;
        }
        let mut audit = lock(&self.audit);
        let closed = match crate::audit::closed_segments(audit.path()) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "retention cannot list the audit segments");
                return;
            }
        };
        let candidates = closed
            .iter()
            .map(|s| crate::retention::Candidate {
                id: s.file.clone(),
                bytes: s.bytes,
                modified_ms: s.modified_ms,
            })
            .collect();
        let now = psm_control_api::now_ms();
        for (c, why) in crate::retention::select_segments(candidates, now, &r) {
            let Some(seg) = closed.iter().find(|s| s.file == c.id) else {
                continue;
            };
            let tail = match crate::audit::segments::segment_tail(&seg.path) {
                Ok(Some(t)) => t,
                Ok(None) => (
                    seg.first_seq.saturating_sub(1),
                    psm_evidence::audit::GENESIS,
                ),
                Err(e) => {
                    error!(segment = %seg.file, error = %e, "retention keeps the audit segment: it cannot be read");
                    break;
                }
            };
            let audited = audit.append_control(AuditKind::Retention {
                recording_id: String::new(),
                bytes: seg.bytes,
                reason: why.as_str().into(),
                modified_ms: seg.modified_ms,
                audit_segment: Some(psm_control_api::AuditSegment {
                    file: seg.file.clone(),
                    first_seq: seg.first_seq,
                    last_seq: tail.0,
                    last_hash: psm_evidence::hex(&tail.1),
                }),
            });
            if let Err(e) = audited {
                error!(segment = %seg.file, error = %e, "retention keeps the audit segment: its deletion cannot be audited");
                break;
            }
            match fs::remove_file(&seg.path) {
                Ok(()) => {
                    info!(segment = %seg.file, first_seq = seg.first_seq, last_seq = tail.0, reason = why.as_str(), "audit segment deleted by retention")
                }
                Err(e) => {
                    error!(segment = %seg.file, error = %e, "retention cannot delete the audit segment");
                    let _ = audit.append_control(AuditKind::Notice {
                        message: format!(
                            "retention could not delete audit segment {}: {e}",
                            seg.file
                        ),
                        session_id: None,
                        kind: Some("retention failed".into()),
                        count: None,
                    });
                    break;
                }
            }
        }
    }
}
