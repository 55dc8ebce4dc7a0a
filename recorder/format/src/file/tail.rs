//! What follows a cut: does a chunked recording that reads as cut short still end with its
//! trailer?
//!
//! A writer that dies leaves a prefix of what it would have written, and it writes the trailer
//! last. So a file that reads as cut (a clear record's length runs past its end, or a chunk
//! ends it with no seal after it) is a crash only when it does not end with a trailer. When it
//! does, a length (or the trailer's own head) was changed so that what follows reads as one
//! record's body, and the recording would otherwise verify as merely truncated. The reader
//! keeps the last bytes it read from the file ([`Tail`]) and, where the file reads as cut,
//! looks in them for a trailer ending exactly at the end of the file ([`trailer_at_end`]).
//! Whether that trailer is genuine, and this recording's, is for the verifier, which has the
//! key, to say.

use super::{Trailer, KIND_TRAILER, RECORD_HEAD};

/// Bytes of the file's end looked at: a trailer is about 120 bytes and the ids of the session
/// and the recording.
pub(super) const TAIL_KEEP: usize = 4096;

/// The last bytes read from a file (at least the last [`TAIL_KEEP`], at most twice that), and
/// where the head of the record read last starts among them.
#[derive(Default)]
pub(super) struct Tail {
    bytes: Vec<u8>,
    /// Bytes read from the file so far.
    read: u64,
    /// The offset in the file of the last record head read in full.
    head_at: Option<u64>,
}

impl Tail {
    /// Bytes just read from the file.
    pub(super) fn push(&mut self, buf: &[u8]) {
        self.read += buf.len() as u64;
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

    /// The bytes just read were a record's head.
    pub(super) fn head_read(&mut self) {
        self.head_at = self.read.checked_sub(RECORD_HEAD as u64);
    }

    /// The trailer the bytes read end with, if they end with one.
    pub(super) fn trailer(&self) -> Option<Trailer> {
        let start = self.read - self.bytes.len() as u64;
        let head = self
            .head_at
            .and_then(|at| at.checked_sub(start))
            .and_then(|i| usize::try_from(i).ok());
        trailer_at_end(&self.bytes, head)
    }
}

/// A TRAILER record that ends exactly where `bytes` end: a head of its kind and length, then a
/// body that decodes as a whole. At `head`, where the record read last begins, the head may say
/// anything: the trailer's own length or kind is then what was changed. Tried from the end, so
/// the shortest such record is found.
pub(super) fn trailer_at_end(bytes: &[u8], head: Option<usize>) -> Option<Trailer> {
    let last = bytes.len().checked_sub(RECORD_HEAD)?;
    (0..=last).rev().find_map(|at| {
        let body = &bytes[at + RECORD_HEAD..];
        let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]);
        let whole = bytes[at] == KIND_TRAILER && len as usize == body.len();
        if !whole && head != Some(at) {
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
        let len = (body.len() as i64 + len_delta) as usize;
        put_head(&mut rec, KIND_TRAILER, len);
        rec.extend_from_slice(&body);
        rec
    }

    #[test]
    fn a_trailer_at_the_end_is_found_wherever_it_starts() {
        let trailer = trailer_record(0);
        for before in [0usize, 1, 100, TAIL_KEEP - trailer.len()] {
            let mut bytes = vec![0x55u8; before];
            bytes.extend_from_slice(&trailer);
            let t = trailer_at_end(&bytes, None).unwrap_or_else(|| panic!("{before} before"));
            assert_eq!((t.chunks, t.recording_id.as_str()), (7, "rec-1"));
        }
    }

    #[test]
    fn a_trailer_whose_own_head_was_changed_is_found_only_where_a_head_was_read() {
        let mut other_kind = trailer_record(0);
        other_kind[0] ^= 0x20;
        for bytes in [
            other_kind,
            trailer_record(1),
            trailer_record(1000),
            trailer_record(-1),
        ] {
            let mut inside = vec![0x55u8; 10];
            inside.extend_from_slice(&bytes);
            assert!(trailer_at_end(&inside, Some(10)).is_some());
            assert!(trailer_at_end(&inside, None).is_none());
            assert!(trailer_at_end(&inside, Some(9)).is_none());
        }
    }

    #[test]
    fn a_cut_trailer_or_none_is_not_found() {
        let trailer = trailer_record(0);
        for cut in 0..trailer.len() {
            assert!(
                trailer_at_end(&trailer[..cut], Some(0)).is_none(),
                "cut at {cut}"
            );
        }
        // a trailer followed by anything does not end the bytes
        let mut after = trailer.clone();
        after.push(0);
        assert!(trailer_at_end(&after, Some(0)).is_none());
        assert!(trailer_at_end(&[KIND_TRAILER; 300], Some(0)).is_none());
    }

    #[test]
    fn the_tail_holds_the_file_end_and_the_last_head() {
        let trailer = trailer_record(0);
        let mut tail = Tail::default();
        // reads of every size, the trailer's bytes in the last ones
        tail.push(&vec![0x55u8; 3 * TAIL_KEEP]);
        for b in vec![0x55u8; 2 * TAIL_KEEP].chunks(7) {
            tail.push(b);
            assert!(tail.bytes.len() <= 2 * TAIL_KEEP);
        }
        tail.push(&trailer[..3]);
        tail.push(&trailer[3..]);
        assert!(tail.bytes.len() >= TAIL_KEEP);
        assert!(tail.trailer().is_some());
        // a read longer than the window keeps its end
        let mut long = vec![0x55u8; 2 * TAIL_KEEP];
        long.extend_from_slice(&trailer);
        tail.push(&long);
        assert_eq!(tail.bytes.len(), TAIL_KEEP);
        assert!(tail.trailer().is_some());
        // a head read where the trailer's begins: its length may be anything there
        let mut tail = Tail::default();
        let changed = trailer_record(50);
        tail.push(&[0x55u8; 40]);
        tail.push(&changed[..RECORD_HEAD]);
        tail.head_read();
        assert!(tail.trailer().is_none());
        tail.push(&changed[RECORD_HEAD..]);
        assert!(tail.trailer().is_some());
        // but not once the head has left the window
        tail.push(&vec![0x55u8; 2 * TAIL_KEEP]);
        tail.push(&changed[RECORD_HEAD..]);
        assert!(tail.trailer().is_none());
    }
}
