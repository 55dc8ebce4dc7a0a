//! Static virtual channels: the grant's rule for each channel the client offers, and the chunk
//! framing (`CHANNEL_PDU_HEADER`) that carries their messages over MCS.

use std::borrow::Cow;

use ironrdp_core::encode_vec;
use ironrdp_pdu::mcs::{McsMessage, SendDataIndication, SendDataRequest};
use ironrdp_pdu::x224::X224;
use psm_control_api::{ClipboardRule, RdpChannels};

/// Chunk size psm uses when it writes channel messages of its own (the protocol's default).
pub(super) const CHUNK: usize = 1600;
/// `CHANNEL_FLAG_FIRST`.
pub(super) const FLAG_FIRST: u32 = 0x1;
/// `CHANNEL_FLAG_LAST`.
pub(super) const FLAG_LAST: u32 = 0x2;
/// `CHANNEL_FLAG_SHOW_PROTOCOL` (clipboard messages must carry it).
pub(super) const FLAG_SHOW_PROTOCOL: u32 = 0x10;
/// `CHANNEL_PACKET_COMPRESSED`.
pub(super) const FLAG_COMPRESSED: u32 = 0x0020_0000;

/// What the grant says about one static channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rule {
    /// Relayed unchanged.
    Pass,
    /// Kept in the channel list (ids stay aligned) but every message on it is dropped both ways.
    Refused,
    /// `cliprdr` with one direction allowed: format lists and data requests are filtered.
    Clip {
        /// Data may flow from the user's machine to the target.
        to_target: bool,
    },
    /// `drdynvc`, the dynamic channels' transport: their Create Requests are filtered by name.
    Dvc,
    /// `rdpdr` with some device kinds allowed: the client's device announcements are filtered.
    Rdpdr {
        /// Drives may be redirected.
        drive: bool,
        /// Printers may be redirected.
        printer: bool,
        /// Smart cards may be redirected.
        smartcard: bool,
    },
}

/// The rule for the channel `name` (compared without case) under `rules`.
pub(super) fn rule_for(name: &str, rules: &RdpChannels) -> Rule {
    match name.to_ascii_lowercase().as_str() {
        "cliprdr" => match rules.clipboard {
            ClipboardRule::None => Rule::Refused,
            ClipboardRule::Both => Rule::Pass,
            ClipboardRule::ToTarget => Rule::Clip { to_target: true },
            ClipboardRule::FromTarget => Rule::Clip { to_target: false },
        },
        "rdpdr" if rules.drive || rules.printer || rules.smartcard => Rule::Rdpdr {
            drive: rules.drive,
            printer: rules.printer,
            smartcard: rules.smartcard,
        },
        "rdpdr" => Rule::Refused,
        "rdpsnd" if rules.audio => Rule::Pass,
        "rdpsnd" => Rule::Refused,
        "drdynvc" => Rule::Dvc,
        other if rules.other_allowed(other) => Rule::Pass,
        _ => Rule::Refused,
    }
}

/// Why a channel is refused, in words for the audit log.
pub(super) fn refusal_reason(name: &str) -> String {
    match name.to_ascii_lowercase().as_str() {
        "cliprdr" => "the grant allows no clipboard".into(),
        "rdpdr" => "the grant allows no device redirection".into(),
        "rdpsnd" => "the grant allows no audio".into(),
        _ => "channel not allowed by the grant".into(),
    }
}

/// One chunk of a static channel message: its header and data.
#[derive(Debug)]
pub(super) struct Chunk<'a> {
    /// `CHANNEL_FLAG_*` bits.
    pub flags: u32,
    /// This chunk's part of the message.
    pub data: &'a [u8],
}

impl Chunk<'_> {
    /// First chunk of its message.
    pub fn first(&self) -> bool {
        self.flags & FLAG_FIRST != 0
    }
    /// Last chunk of its message.
    pub fn last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }
}

/// Splits a channel PDU into its `CHANNEL_PDU_HEADER` and data.
pub(super) fn chunk(user_data: &[u8]) -> Result<Chunk<'_>, String> {
    let (Some(h), Some(data)) = (user_data.get(..8), user_data.get(8..)) else {
        return Err("virtual channel PDU shorter than its header".into());
    };
    let flags = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if flags & FLAG_COMPRESSED != 0 {
        return Err("compressed virtual channel data (psm turns compression off)".into());
    }
    Ok(Chunk { flags, data })
}

/// Which MCS PDU carries channel data: requests go to the target, indications to the client.
#[derive(Clone, Copy, Debug)]
pub(super) enum Carrier {
    /// Client to target (`SendDataRequest`), with the user's channel as initiator.
    Request {
        /// The user channel id.
        initiator: u16,
    },
    /// Target to client (`SendDataIndication`).
    Indication {
        /// The initiator the target uses.
        initiator: u16,
    },
}

/// One MCS frame carrying `user_data` on `channel_id`.
pub(super) fn mcs_frame(
    carrier: Carrier,
    channel_id: u16,
    user_data: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let msg = match carrier {
        Carrier::Request { initiator } => McsMessage::SendDataRequest(SendDataRequest {
            initiator_id: initiator,
            channel_id,
            user_data: Cow::Owned(user_data),
        }),
        Carrier::Indication { initiator } => McsMessage::SendDataIndication(SendDataIndication {
            initiator_id: initiator,
            channel_id,
            user_data: Cow::Owned(user_data),
        }),
    };
    encode_vec(&X224(msg)).map_err(|e| format!("MCS encoding: {e}"))
}

/// A whole channel message cut into chunks of [`CHUNK`] bytes, each in its own MCS frame with
/// `flags` (e.g. [`FLAG_SHOW_PROTOCOL`]) besides first/last.
pub(super) fn message_frames(
    carrier: Carrier,
    channel_id: u16,
    message: &[u8],
    flags: u32,
) -> Result<Vec<Vec<u8>>, String> {
    let total = u32::try_from(message.len()).map_err(|_| "channel message too long".to_string())?;
    let n = message.len().div_ceil(CHUNK).max(1);
    let mut frames = Vec::with_capacity(n);
    for i in 0..n {
        let part = message
            .get(i * CHUNK..((i + 1) * CHUNK).min(message.len()))
            .unwrap_or_default();
        let mut flags = flags & !(FLAG_FIRST | FLAG_LAST);
        if i == 0 {
            flags |= FLAG_FIRST;
        }
        if i + 1 == n {
            flags |= FLAG_LAST;
        }
        let mut user_data = Vec::with_capacity(8 + part.len());
        user_data.extend_from_slice(&total.to_le_bytes());
        user_data.extend_from_slice(&flags.to_le_bytes());
        user_data.extend_from_slice(part);
        frames.push(mcs_frame(carrier, channel_id, user_data)?);
    }
    Ok(frames)
}
