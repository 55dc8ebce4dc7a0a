//! What follows a cut: does a chunked recording that reads as cut short still end with its
//! trailer?
//!
//! A writer that dies leaves a prefix of what it would have written, and it writes the trailer
//! last. So a clear record whose length runs past the end of the file, or to the end with no
//! seal after it, is a crash only when the file does not end with a trailer. When it does, a
//! length was changed so that the chunks after it, the seals and the trailer read as one
//! record's body, and the recording would otherwise verify as merely truncated. The reader
//! keeps the last bytes of the clear record it read last ([`Tail`]) and, where the file reads
//! as cut, looks in them for a trailer ending exactly at the end of the file ([`trailer_at_end`]).
//! Whether that trailer is genuine is for the verifier, which has the key, to say.

use super::{Trailer, KIND_TRAILER, RECORD_HEAD};

/// Bytes kept from the end of the last clear record: a trailer is about 120 bytes and the ids
/// of the session and the recording.
pub(super) const TAIL_KEEP: usize = 4096;

/// The last [`TAIL_KEEP`] bytes of the clear record read last: its head and as much of its body
/// as the file held.
#[derive(Default)]
pub(super) struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    /// A new record begins: forget the last one.
    pub(super) fn clear(&mut self) {
        self.bytes.clear();
    }

    /// Keeps the end of a record: its `head` and what was read of its `body`.
    pub(super) fn keep(&mut self, head: &[u8], body: &[u8]) {
        self.bytes.clear();
        let skip = (head.len() + body.len()).saturating_sub(TAIL_KEEP);
        if skip < head.len() {
            self.bytes.extend_from_slice(&head[skip..]);
            self.bytes.extend_from_slice(body);
        } else {
            self.bytes.extend_from_slice(&body[skip - head.len()..]);
        }
    }

    /// The trailer the kept bytes end with, if they end with one.
    pub(super) fn trailer(&self) -> Option<Trailer> {
        trailer_at_end(&self.bytes)
    }
}

/// A TRAILER record that ends exactly where `bytes` end: its head, then a body that decodes as
/// a whole. Where the record starts at `bytes[0]` (the record read last is the trailer itself),
/// its head may say anything: its own length or kind is what was changed. Tried from the end,
/// so the shortest such record is found.
pub(super) fn trailer_at_end(bytes: &[u8]) -> Option<Trailer> {
    let last = bytes.len().checked_sub(RECORD_HEAD)?;
    (0..=last).rev().find_map(|at| {
        let body = &bytes[at + RECORD_HEAD..];
        let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]);
        if at != 0 && (bytes[at] != KIND_TRAILER || len as usize != body.len()) {
            return None;
        }
        Trailer::decode(body).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::put_head;
    use psm_evidence::KeyId;

    fn trailer_record(len_delta: i64) -> Vec<u8> {
        let mut body = Trailer::encode_signed(true, 7, &[3u8; 32], KeyId([9; 8]), "s1", "rec-1");
        body.extend_from_slice(&[0u8; psm_evidence::SIG_LEN]);
        let mut rec = Vec::new();
        put_head(
            &mut rec,
            KIND_TRAILER,
            (body.len() as i64 + len_delta) as usize,
        );
        rec.extend_from_slice(&body);
        rec
    }

    #[test]
    fn a_trailer_at_the_end_is_found_wherever_it_starts() {
        let trailer = trailer_record(0);
        for before in [0usize, 1, 100, TAIL_KEEP - trailer.len()] {
            let mut bytes = vec![0x55u8; before];
            bytes.extend_from_slice(&trailer);
            let t = trailer_at_end(&bytes).unwrap_or_else(|| panic!("{before} bytes before"));
            assert_eq!((t.chunks, t.recording_id.as_str()), (7, "rec-1"));
        }
    }

    #[test]
    fn a_trailer_whose_own_length_or_kind_was_changed_is_found_at_the_start() {
        let mut other_kind = trailer_record(0);
        other_kind[0] ^= 0x20;
        assert!(trailer_at_end(&other_kind).is_some());
        for delta in [1, 1000, -1] {
            let bytes = trailer_record(delta);
            assert!(trailer_at_end(&bytes).is_some(), "{delta}");
            // not inside other bytes: there its length must run to the end
            let mut inside = vec![0x55u8; 10];
            inside.extend_from_slice(&bytes);
            assert!(trailer_at_end(&inside).is_none(), "{delta}");
        }
    }

    #[test]
    fn a_cut_trailer_or_none_is_not_found() {
        let trailer = trailer_record(0);
        for cut in 0..trailer.len() {
            assert!(trailer_at_end(&trailer[..cut]).is_none(), "cut at {cut}");
        }
        // a trailer followed by anything does not end the bytes
        let mut after = trailer.clone();
        after.push(0);
        assert!(trailer_at_end(&after[1..]).is_none());
        assert!(trailer_at_end(&[KIND_TRAILER; 300]).is_none());
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_of_a_record() {
        let trailer = trailer_record(0);
        let mut tail = Tail::default();
        // a long body ending with the trailer: only the end is kept, the trailer with it
        let mut body = vec![0x55u8; 3 * TAIL_KEEP];
        body.extend_from_slice(&trailer);
        tail.keep(&[1, 2, 3, 4, 5], &body);
        assert_eq!(tail.bytes.len(), TAIL_KEEP);
        assert!(tail.trailer().is_some());
        // a short one keeps its head too
        tail.keep(&trailer[..RECORD_HEAD], &trailer[RECORD_HEAD..]);
        assert_eq!(tail.bytes, trailer);
        tail.clear();
        assert!(tail.trailer().is_none());
        // a body a few bytes short of the limit keeps the end of its head
        let body = vec![0x55u8; TAIL_KEEP - 2];
        tail.keep(&[1, 2, 3, 4, 5], &body);
        assert_eq!(&tail.bytes[..2], &[4, 5]);
        assert_eq!(tail.bytes.len(), TAIL_KEEP);
    }
}
