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

use crate::{hex, sha256, Hash, KeyId};

mod report;
#[cfg(test)]
mod tests;
mod verify;

pub use report::{AuditProblem, AuditReport, DeletedRecording, RetiredSegment, SegmentSummary};
pub use verify::{verify_log, ChainVerifier};

/// Name of the field that carries the previous line's hash.
pub const PREV_FIELD: &str = "prev_hash";
/// The field that makes a line a checkpoint.
pub const CHECKPOINT_FIELD: &str = "checkpoint";
/// The notice `kind` of checkpoint lines.
pub const CHECKPOINT_KIND: &str = "audit checkpoint";
/// The `prev_hash` of the first line of a log.
pub const GENESIS: Hash = [0u8; 32];

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
