//! The clipboard (`cliprdr`) when the grant allows one direction only.
//!
//! Data leaves a side only after that side announced it (Format List) and the other asked for it
//! (Format Data / File Contents Request). psm drops the announcements of the side whose data may
//! not leave, answering them with an OK so its clipboard keeps working, and answers requests
//! for that side's data with a failure. Data responses from that side are dropped too.

use ironrdp_cliprdr::pdu::{
    ClipboardPdu, FileContentsResponse, FormatDataResponse, FormatListResponse,
};
use ironrdp_core::encode_vec;

use super::channels::Chunk;
use super::svc::{Decision, Messages, Step};

const MONITOR_READY: u16 = 0x0001;
const FORMAT_LIST: u16 = 0x0002;
const FORMAT_LIST_RESPONSE: u16 = 0x0003;
const FORMAT_DATA_REQUEST: u16 = 0x0004;
const FORMAT_DATA_RESPONSE: u16 = 0x0005;
const TEMP_DIRECTORY: u16 = 0x0006;
const CLIP_CAPS: u16 = 0x0007;
const FILE_CONTENTS_REQUEST: u16 = 0x0008;
const FILE_CONTENTS_RESPONSE: u16 = 0x0009;
const LOCK_CLIPDATA: u16 = 0x000a;
const UNLOCK_CLIPDATA: u16 = 0x000b;

/// Bytes of a message's start psm reads: the header (8) and a File Contents Request's stream id.
const NEED: usize = 12;

/// The filter state of one session's clipboard channel.
#[derive(Debug)]
pub(super) struct Clip {
    to_target: bool,
    up: Messages,
    down: Messages,
}

/// What became of one clipboard chunk.
#[derive(Debug, Default)]
pub(super) struct ClipOut {
    /// Frames to relay.
    pub steps: Vec<Step>,
    /// A clipboard message psm answers the sender with (unchunked).
    pub reply: Option<Vec<u8>>,
    /// The direction refused ("to-target" or "from-target") and what was refused.
    pub refused: Option<(&'static str, &'static str)>,
}

impl Clip {
    /// A filter letting data flow to the target only (`to_target`) or from it only.
    pub fn new(to_target: bool) -> Clip {
        Clip {
            to_target,
            up: Messages::default(),
            down: Messages::default(),
        }
    }

    /// One chunk from the client (`from_client`) or the target.
    pub fn feed(
        &mut self,
        from_client: bool,
        frame: &[u8],
        chunk: &Chunk<'_>,
    ) -> Result<ClipOut, String> {
        // May the sender's own data leave it?
        let sender_out = from_client == self.to_target;
        let (own, other) = if from_client {
            ("to-target", "from-target")
        } else {
            ("from-target", "to-target")
        };
        let mut result = ClipOut::default();
        let mut decide = |head: &[u8]| -> Result<Decision, String> {
            let Some(ty) = head.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]])) else {
                return Err("clipboard message shorter than its header".into());
            };
            let (allowed, reply, refused) = match ty {
                FORMAT_LIST => (
                    sender_out,
                    Some(ClipboardPdu::FormatListResponse(FormatListResponse::Ok)),
                    (own, "copy announced"),
                ),
                FORMAT_DATA_RESPONSE | FILE_CONTENTS_RESPONSE => {
                    (sender_out, None, (own, "clipboard data"))
                }
                FORMAT_DATA_REQUEST => (
                    !sender_out,
                    Some(ClipboardPdu::FormatDataResponse(
                        FormatDataResponse::new_error(),
                    )),
                    (other, "paste requested"),
                ),
                FILE_CONTENTS_REQUEST => {
                    let Some(id) = head.get(8..12) else {
                        return Err("clipboard File Contents Request too short".into());
                    };
                    let stream_id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
                    (
                        !sender_out,
                        Some(ClipboardPdu::FileContentsResponse(
                            FileContentsResponse::new_error(stream_id),
                        )),
                        (other, "file paste requested"),
                    )
                }
                // the protocol's own small messages, either way (the client's temporary
                // directory tells the target where files copied to the client go)
                MONITOR_READY | FORMAT_LIST_RESPONSE | TEMP_DIRECTORY | CLIP_CAPS
                | LOCK_CLIPDATA | UNLOCK_CLIPDATA => (true, None, (own, "")),
                // a type the protocol does not have carries what a patched peer likes: never
                // past a one-way rule
                _ => (false, None, (own, "unknown clipboard message")),
            };
            if allowed {
                return Ok(Decision::Pass);
            }
            if let Some(r) = reply {
                result.reply = Some(encode_vec(&r).map_err(|e| format!("clipboard reply: {e}"))?);
            }
            result.refused = Some(refused);
            Ok(Decision::Drop)
        };
        let mut steps = Vec::new();
        let messages = if from_client {
            &mut self.up
        } else {
            &mut self.down
        };
        messages.feed(frame, chunk, NEED, &mut decide, &mut steps)?;
        result.steps = steps;
        Ok(result)
    }
}
