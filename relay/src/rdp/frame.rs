//! Framing of an RDP byte stream: where the next frame ends.
//!
//! Sans-IO: the adapters keep their own receive buffers and ask [`next_frame`] (after TLS, and
//! for the X.224 negotiation before it) or [`next_ts_request`] (during CredSSP) how many bytes
//! make the next whole frame. Anything longer than [`MAX_FRAME`] is refused.

use std::fmt;

/// Refuse frames larger than this (a TPKT length is at most 65535, a fast-path one 32767).
pub const MAX_FRAME: usize = 65535;

/// Largest fast-path frame (15-bit length).
pub const MAX_FAST_PATH: usize = 0x7fff;

/// Which framing the next frame uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// TPKT + X.224 (slow path: negotiation, MCS, share control, virtual channels).
    X224,
    /// Fast-path input (client to server) or output (server to client).
    FastPath,
}

/// A malformed frame header; the connection ends, the side that sent it at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError(pub String);

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed RDP frame: {}", self.0)
    }
}

impl std::error::Error for FrameError {}

/// Length of the next RDP frame at the start of `buf` (TPKT or fast-path).
///
/// `Ok(None)`: need more bytes. `Err`: malformed (the connection ends, the sender at fault).
/// The length returned covers the whole frame, headers included, and is at least the header.
pub fn next_frame(buf: &[u8]) -> Result<Option<(FrameKind, usize)>, FrameError> {
    let info = match ironrdp_pdu::find_size(buf) {
        Ok(Some(info)) => info,
        Ok(None) => return Ok(None),
        Err(e) => return Err(FrameError(e.to_string())),
    };
    let (kind, min) = match info.action {
        ironrdp_pdu::Action::X224 => (FrameKind::X224, 7), // TPKT 4 + X.224 data header 3
        ironrdp_pdu::Action::FastPath => (FrameKind::FastPath, 2),
    };
    if info.length < min {
        return Err(FrameError(format!(
            "frame length {} too short",
            info.length
        )));
    }
    let max = match kind {
        FrameKind::X224 => MAX_FRAME,
        FrameKind::FastPath => MAX_FAST_PATH,
    };
    if info.length > max {
        return Err(FrameError(format!("frame length {} too long", info.length)));
    }
    Ok(Some((kind, info.length)))
}

/// Length of the CredSSP `TsRequest` (a DER SEQUENCE) at the start of `buf`.
///
/// `Ok(None)`: need more bytes. `Err`: not a TsRequest, or longer than [`MAX_FRAME`].
pub fn next_ts_request(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    if tag != 0x30 {
        return Err(FrameError(format!("TsRequest tag {tag:#04x}, want 0x30")));
    }
    // Header bytes needed before the length is known: tag, then short or long-form length.
    let header = match buf.get(1) {
        None => return Ok(None),
        Some(&l) if l < 0x80 => 2,
        Some(0x81) => 3,
        Some(0x82) => 4,
        Some(&l) => return Err(FrameError(format!("TsRequest length form {l:#04x}"))),
    };
    if buf.len() < header {
        return Ok(None);
    }
    let len = sspi::credssp::TsRequest::read_length(&buf[..header])
        .map_err(|e| FrameError(format!("TsRequest length: {e}")))?;
    if len > MAX_FRAME {
        return Err(FrameError(format!("TsRequest length {len} too long")));
    }
    if len < header {
        return Err(FrameError(format!("TsRequest length {len} too short")));
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpkt_and_fast_path_lengths() {
        let tpkt = [3u8, 0, 0, 11, 2, 0xf0, 0x80, 1, 2, 3, 4];
        assert_eq!(next_frame(&tpkt[..3]), Ok(None));
        assert_eq!(next_frame(&tpkt), Ok(Some((FrameKind::X224, 11))));
        // Fast-path with a one-byte and a two-byte length.
        assert_eq!(
            next_frame(&[0x04, 5, 0, 0, 0]),
            Ok(Some((FrameKind::FastPath, 5)))
        );
        assert_eq!(next_frame(&[0x04, 0x81]), Ok(None));
        assert_eq!(
            next_frame(&[0x04, 0x81, 0x00]),
            Ok(Some((FrameKind::FastPath, 256)))
        );
        assert_eq!(next_frame(&[]), Ok(None));
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert!(next_frame(&[0x01, 0, 0, 0]).is_err(), "unknown action bits");
        assert!(
            next_frame(&[3, 0, 0, 2]).is_err(),
            "TPKT shorter than its header"
        );
        assert!(
            next_frame(&[0x04, 1]).is_err(),
            "fast-path shorter than its header"
        );
    }

    #[test]
    fn ts_request_lengths() {
        assert_eq!(next_ts_request(&[]), Ok(None));
        assert_eq!(next_ts_request(&[0x30]), Ok(None));
        assert_eq!(next_ts_request(&[0x30, 0x05]), Ok(Some(7)));
        assert_eq!(next_ts_request(&[0x30, 0x81]), Ok(None));
        assert_eq!(next_ts_request(&[0x30, 0x81, 0x90]), Ok(Some(0x93)));
        assert_eq!(next_ts_request(&[0x30, 0x82, 0x01, 0x00]), Ok(Some(0x104)));
        assert!(next_ts_request(&[0x31, 0x05]).is_err());
        assert!(next_ts_request(&[0x30, 0x84, 0, 0, 0, 1]).is_err());
        assert!(
            next_ts_request(&[0x30, 0x82, 0xff, 0xff]).is_err(),
            "too long"
        );
    }
}
