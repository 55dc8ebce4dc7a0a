//! Dynamic virtual channels (inside `drdynvc`): the target opens them by name with a Create
//! Request. psm lets through the ones that carry nothing off either machine (display control,
//! input, geometry, …), audio output and input when the grant allows audio, and the names the
//! grant lists; it answers any other Create Request itself with a failure, so the client never
//! learns of the channel (USB, camera or file redirection over DVCs stay closed, and so does
//! the graphics pipeline, which psm turns off so that recordings replay).

use psm_control_api::RdpChannels;

use super::channels::Chunk;
use super::svc::{Decision, Messages, Step};

const CMD_CREATE: u8 = 0x01;
/// `STATUS_UNSUCCESSFUL`, the creation status psm answers refused channels with.
const CREATION_FAILED: u32 = 0xC000_0001;

/// Dynamic channels of the display and input, always allowed. A name does not bound what a
/// channel carries (any process in the session may open a channel under any name, and a
/// patched client may listen on it), so only the names the session's display needs are here;
/// `ECHO` and `Telemetry`, which it does not need, were a way to move files past the channel
/// rules and go only where the grant lists them.
const HARMLESS: &[&str] = &[
    "Microsoft::Windows::RDS::DisplayControl",
    "Microsoft::Windows::RDS::Geometry::v08.01",
    "Microsoft::Windows::RDS::Input",
    "Microsoft::Windows::RDS::MouseCursor",
    "Microsoft::Windows::RDS::Video::Control::v08.01",
    "Microsoft::Windows::RDS::Video::Data::v08.01",
];
/// Audio channels, allowed with the grant's audio rule.
const AUDIO: &[&str] = &[
    "AUDIO_PLAYBACK_DVC",
    "AUDIO_PLAYBACK_LOSSY_DVC",
    "AUDIO_INPUT",
];

/// The dynamic-channel filter of one session (target to client Create Requests).
#[derive(Debug)]
pub(super) struct Dvc {
    rules: RdpChannels,
    down: Messages,
}

/// What became of one `drdynvc` chunk from the target.
#[derive(Debug, Default)]
pub(super) struct DvcOut {
    /// Frames to relay unchanged.
    pub steps: Vec<Step>,
    /// An allowed Create Request to relay (unchunked).
    pub create: Option<Vec<u8>>,
    /// A refused channel: its name and psm's Create Response for the target (unchunked).
    pub refused: Option<(String, Vec<u8>)>,
}

impl Dvc {
    /// A filter under `rules`.
    pub fn new(rules: RdpChannels) -> Dvc {
        Dvc {
            rules,
            down: Messages::default(),
        }
    }

    fn allowed(&self, name: &str) -> bool {
        let is = |list: &[&str]| list.iter().any(|n| n.eq_ignore_ascii_case(name));
        is(HARMLESS) || (self.rules.audio && is(AUDIO)) || self.rules.other_allowed(name)
    }

    /// One chunk from the target.
    pub fn feed(&mut self, frame: &[u8], chunk: &Chunk<'_>) -> Result<DvcOut, String> {
        let mut decide = |head: &[u8]| -> Result<Decision, String> {
            Ok(match head.first() {
                Some(h) if h >> 4 == CMD_CREATE => Decision::Collect,
                Some(_) => Decision::Pass,
                None => return Err("empty dynamic channel PDU".into()),
            })
        };
        let mut steps = Vec::new();
        self.down.feed(frame, chunk, 1, &mut decide, &mut steps)?;
        let mut out = DvcOut::default();
        for s in steps {
            match s {
                Step::Message(m) => {
                    let (id_bytes, name) = create_request(&m)?;
                    if self.allowed(&name) {
                        out.create = Some(m);
                    } else {
                        let mut reply = Vec::with_capacity(1 + id_bytes.len() + 4);
                        reply.push(m[0] & 0xf3); // Create, same channel id size, no Sp bits
                        reply.extend_from_slice(id_bytes);
                        reply.extend_from_slice(&CREATION_FAILED.to_le_bytes());
                        out.refused = Some((name, reply));
                    }
                }
                forward => out.steps.push(forward),
            }
        }
        Ok(out)
    }
}

/// A Create Request's channel id bytes and channel name.
fn create_request(m: &[u8]) -> Result<(&[u8], String), String> {
    let short = || "dynamic channel Create Request truncated".to_string();
    let header = *m.first().ok_or_else(short)?;
    let id_len = match header & 0x03 {
        0 => 1,
        1 => 2,
        _ => 4,
    };
    let id = m.get(1..1 + id_len).ok_or_else(short)?;
    let rest = m.get(1 + id_len..).ok_or_else(short)?;
    let end = rest.iter().position(|&b| b == 0).ok_or_else(short)?;
    let name = rest[..end]
        .iter()
        .map(|&b| {
            if b.is_ascii() {
                char::from(b)
            } else {
                '\u{fffd}'
            }
        })
        .collect();
    Ok((id, name))
}
