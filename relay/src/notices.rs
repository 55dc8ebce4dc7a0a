//! Per-session notices (refused forwarding, refused environment variables, channels a target
//! opened unasked), aggregated: the first of each kind is audited at once, the repeats are
//! counted and audited once more, with their number, when the connection ends. 5,000 refused
//! forwards make two audit events, not 5,000.

use std::collections::BTreeMap;
use std::sync::Mutex;

use psm_control_api::AuditKind;

use crate::control_link::AuditSink;

/// Distinct values kept per kind for the summary (e.g. the names of refused variables).
const MAX_DETAILS: usize = 32;

#[derive(Default)]
struct Entry {
    count: u64,
    details: Vec<String>,
    more_details: u64,
}

/// The notices of one connection.
pub struct Notices {
    audit: AuditSink,
    session_id: String,
    kinds: Mutex<BTreeMap<&'static str, Entry>>,
}

impl Notices {
    /// Notices of connection `session_id`, audited through `audit`.
    pub fn new(audit: AuditSink, session_id: String) -> Notices {
        Notices {
            audit,
            session_id,
            kinds: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one notice of `kind`; `detail` is what distinguishes it (an address, a variable
    /// name), already escaped and cut. The first of a kind is audited with `message`.
    pub fn note(&self, kind: &'static str, detail: &str, message: impl FnOnce() -> String) {
        let first = {
            let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
            let e = kinds.entry(kind).or_default();
            e.count += 1;
            if !e.details.iter().any(|d| d == detail) {
                if e.details.len() < MAX_DETAILS {
                    e.details.push(detail.to_string());
                } else {
                    e.more_details += 1;
                }
            }
            e.count == 1
        };
        if first {
            self.audit.emit(AuditKind::Notice {
                message: message(),
                session_id: Some(self.session_id.clone()),
                kind: Some(kind.to_string()),
                count: Some(1),
            });
        }
    }

    /// How many notices of `kind` were recorded.
    pub fn count(&self, kind: &str) -> u64 {
        self.kinds
            .lock()
            .map(|k| k.get(kind).map_or(0, |e| e.count))
            .unwrap_or(0)
    }

    /// Audits, once per kind that repeated, how many there were in all and which details.
    pub fn flush(&self) {
        let kinds = std::mem::take(&mut *self.kinds.lock().unwrap_or_else(|p| p.into_inner()));
        for (kind, e) in kinds {
            if e.count <= 1 {
                continue;
            }
            let mut details = e.details.join(", ");
            if e.more_details > 0 {
                details.push_str(&format!(" and {} more", e.more_details));
            }
            self.audit.emit(AuditKind::Notice {
                message: format!("{kind}: {} in all ({details})", e.count),
                session_id: Some(self.session_id.clone()),
                kind: Some(kind.to_string()),
                count: Some(e.count),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_audited_and_the_rest_counted_once() {
        let (sink, mut rx) = AuditSink::new("relay-test");
        let n = Notices::new(sink, "s1".into());
        for i in 0..5000 {
            n.note(
                "port forwarding refused",
                &format!("10.0.0.1:{}", i % 40),
                || "port forwarding to 10.0.0.1:0 refused".into(),
            );
        }
        n.note("agent forwarding refused", "", || {
            "agent forwarding refused".into()
        });
        assert_eq!(n.count("port forwarding refused"), 5000);
        n.flush();
        let mut events = Vec::new();
        while let Some(e) = rx.try_recv() {
            if let psm_control_api::RelayToControl::Audit(e) = e {
                events.push(e.kind);
            }
        }
        assert_eq!(events.len(), 3, "{events:?}");
        let AuditKind::Notice { message, count, .. } = &events[2] else {
            panic!("{events:?}")
        };
        assert_eq!(*count, Some(5000));
        assert!(message.contains("5000 in all"), "{message}");
        assert!(
            message.contains("and 1000 more"),
            "notices with other details: {message}"
        );
        n.flush();
        assert!(rx.try_recv().is_none(), "flushed once");
    }
}
