//! Entry point of the `rdp_replay` fuzz target (`fuzz/`) and of its corpus replay test: the
//! renderer reads PDUs a peer chose (the recorded target's and client's), from a recording that
//! may also be damaged.

use crate::replay::{Direction, Renderer, MAX_DESKTOP};

/// Splits `data` into PDUs (`[u8 direction][u16 length, big-endian][bytes]` each; direction
/// bit 0: 0 client to target, 1 target to client), feeds them to a [`Renderer`] and checks the
/// image after each: within [`MAX_DESKTOP`], 4 bytes a pixel.
pub fn replay(data: &[u8]) {
    let mut r = Renderer::new();
    for (direction, pdu) in records(data) {
        let _ = r.feed(direction, pdu);
        if let Some((w, h, rgba)) = r.image() {
            assert!(w <= MAX_DESKTOP.0 && h <= MAX_DESKTOP.1, "desktop {w}x{h}");
            assert_eq!(rgba.len(), usize::from(w) * usize::from(h) * 4);
        }
    }
}

/// The records of a fuzz input (see [`replay`]); a cut last record is dropped.
pub fn records(mut data: &[u8]) -> Vec<(Direction, &[u8])> {
    let mut out = Vec::new();
    while let [d, hi, lo, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some((pdu, tail)) = rest.split_at_checked(len) else {
            break;
        };
        let direction = if d & 1 == 0 {
            Direction::ClientToTarget
        } else {
            Direction::TargetToClient
        };
        out.push((direction, pdu));
        data = tail;
    }
    out
}

/// Builds a fuzz input from PDUs (the inverse of [`records`]; PDUs over 65535 bytes are cut).
pub fn encode(pdus: &[(Direction, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (direction, pdu) in pdus {
        let pdu = &pdu[..pdu.len().min(usize::from(u16::MAX))];
        out.push(u8::from(*direction == Direction::TargetToClient));
        out.extend_from_slice(&(pdu.len() as u16).to_be_bytes());
        out.extend_from_slice(pdu);
    }
    out
}
