//! What follows a cut: does a chunked recording that reads as cut short still end with its
//! trailer?
//!
//! A writer that dies leaves a prefix of what it would have written, and it writes the trailer
//! last. So a file that reads as cut (a clear record's length runs past its end, or a chunk
//! ends it with no seal after it) is a crash only when it does not end with a trailer. When it
//! does, a length or a kind (the trailer's own, or any record's before it) was changed so that
//! what follows reads as one record's body, and the recording would otherwise verify as merely
//! truncated. The reader keeps the last bytes it read from the file ([`Tail`]) and, where the
//! file reads as cut, decodes the trailer the file would end with: its size follows from the
//! header's ids, so where it starts is known without trusting any head. Whether that trailer is
//! genuine, and this recording's, is for the verifier, which has the key, to say.

use psm_evidence::SIG_LEN;

use super::Trailer;
use crate::RecordingMeta;

/// Bytes of the file's end kept: a trailer is 118 bytes and the ids of the session and the
/// recording (at most 64 bytes each where psm-recorder names them).
pub(super) const TAIL_KEEP: usize = 4096;

/// The last bytes read from a file: at least the last [`TAIL_KEEP`] (all of them when fewer
/// were read), at most twice that.
#[derive(Default)]
pub(super) struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    /// Bytes just read from the file.
    pub(super) fn push(&mut self, buf: &[u8]) {
        if buf.len() >= TAIL_KEEP {
            self.bytes.clear();
            self.bytes.extend_from_slice(&buf[buf.len() - TAIL_KEEP..]);
            return;
        }
        self.bytes.extend_from_slice(buf);
        if self.bytes.len() > 2 * TAIL_KEEP {
            self.bytes.drain(..self.bytes.len() - TAIL_KEEP);
        }
    }

    /// The trailer of the recording `meta` heads that the bytes read end with, if they end
    /// with one: the last [`Trailer::body_len`] bytes, decoded whatever the head before them
    /// says.
    pub(super) fn trailer(&self, meta: &RecordingMeta) -> Option<Trailer> {
        let len = Trailer::body_len(&meta.session_id, &meta.recording_id);
        let start = self.bytes.len().checked_sub(len)?;
        Trailer::decode(&self.bytes[start..]).ok()
    }
}

impl Trailer {
    /// The size of the body of a trailer naming `session_id` and `recording_id`, signature
    /// included.
    pub(super) fn body_len(session_id: &str, recording_id: &str) -> usize {
        let id = |s: &str| 2 + s.len().min(u16::MAX as usize);
        1 + 1 + 8 + psm_evidence::HASH_LEN + 8 + id(session_id) + id(recording_id) + SIG_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_evidence::KeyId;

    fn meta() -> RecordingMeta {
        RecordingMeta {
            session_id: "s1".into(),
            recording_id: "rec-1".into(),
            ..RecordingMeta::default()
        }
    }

    fn body() -> Vec<u8> {
        let mut body = Trailer::encode_signed(true, 7, &[3u8; 32], KeyId([9; 8]), "s1", "rec-1");
        body.extend_from_slice(&[0u8; SIG_LEN]);
        body
    }

    #[test]
    fn the_size_of_a_trailer_follows_from_its_ids() {
        assert_eq!(Trailer::body_len("s1", "rec-1"), body().len());
        assert_eq!(Trailer::body_len("", ""), 118);
    }

    #[test]
    fn a_trailer_at_the_end_is_found_whatever_comes_before_it() {
        let body = body();
        for before in [0usize, 1, 5, 100, TAIL_KEEP - body.len()] {
            let mut tail = Tail::default();
            tail.push(&vec![0x55u8; before]);
            tail.push(&body);
            let t = tail
                .trailer(&meta())
                .unwrap_or_else(|| panic!("{before} before"));
            assert_eq!((t.chunks, t.recording_id.as_str()), (7, "rec-1"));
        }
    }

    #[test]
    fn a_cut_or_shifted_trailer_or_other_ids_are_not_found() {
        let body = body();
        for cut in 0..body.len() {
            let mut tail = Tail::default();
            tail.push(&[0x55u8; 300]);
            tail.push(&body[..cut]);
            assert!(tail.trailer(&meta()).is_none(), "cut at {cut}");
        }
        // a byte after it
        let mut tail = Tail::default();
        tail.push(&body);
        tail.push(&[0]);
        assert!(tail.trailer(&meta()).is_none());
        // a header naming ids of another length
        let mut tail = Tail::default();
        tail.push(&body);
        let other = RecordingMeta {
            recording_id: "rec-10".into(),
            ..meta()
        };
        assert!(tail.trailer(&other).is_none());
    }

    #[test]
    fn the_tail_holds_the_end_of_the_file_whatever_the_reads() {
        let body = body();
        let mut tail = Tail::default();
        tail.push(&vec![0x55u8; 3 * TAIL_KEEP]);
        for b in vec![0x55u8; 2 * TAIL_KEEP].chunks(7) {
            tail.push(b);
            assert!((TAIL_KEEP..=2 * TAIL_KEEP).contains(&tail.bytes.len()));
        }
        for b in body.chunks(3) {
            tail.push(b);
        }
        assert!(tail.trailer(&meta()).is_some());
        // a read longer than the window keeps its end
        let mut long = vec![0x55u8; 2 * TAIL_KEEP];
        long.extend_from_slice(&body);
        tail.push(&long);
        assert_eq!(tail.bytes.len(), TAIL_KEEP);
        assert!(tail.trailer(&meta()).is_some());
    }
}
