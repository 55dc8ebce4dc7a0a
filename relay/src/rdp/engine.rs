//! The RDP relay engine: every frame of an established RDP connection (after TLS and CredSSP on
//! both legs) goes through [`Engine`], which decides what reaches the other side, what the
//! recording keeps, what the user typed and which events the session audits.
//!
//! Sans-IO: frames in (as cut by [`super::frame::next_frame`]), [`Out`] steps out; the io side
//! carries them out in order.

use psm_control_api::{RdpChannels, Secret};
use psm_recorder_format::Direction;

use super::frame::FrameKind;

/// What the engine needs to know about the session.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The grant's channel rules.
    pub rules: RdpChannels,
    /// The protocol the *target* selected (`ironrdp_pdu::nego::SecurityProtocol` bits), written
    /// into the client's Connect Initial `server_selected_protocol`.
    pub target_protocol: ironrdp_pdu::nego::SecurityProtocol,
    /// The vaulted login written into the Client Info PDU (always rewritten: xfreerdp sends the
    /// user's psm password there even after NLA).
    pub login: TargetLogin,
}

/// The vaulted login the target sees in the Client Info PDU.
#[derive(Clone, Debug)]
pub struct TargetLogin {
    /// Account name on the target.
    pub username: String,
    /// Account domain, if any.
    pub domain: Option<String>,
    /// Vaulted password; empty for NLA targets (the back leg's CredSSP already logged in).
    pub password: Secret,
    /// Whether the target should log in without prompting (TLS-only targets).
    pub autologon: bool,
}

/// One step for the io side to carry out, in order.
#[derive(Debug)]
pub enum Out {
    /// Bytes for the target.
    ToTarget(Vec<u8>),
    /// Bytes for the client.
    ToClient(Vec<u8>),
    /// What the recording keeps for this step (one PDU per call): never a credential — the
    /// rewritten Client Info is recorded with the password emptied.
    Record {
        /// Input: client to target; Output: target to client.
        direction: Direction,
        /// The PDU as relayed.
        pdu: Vec<u8>,
    },
    /// Text typed by the user (for the recording's keys channel).
    Typed(String),
    /// Something to audit or to write as an event line.
    Event(RdpEvent),
}

/// Events of an RDP session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RdpEvent {
    /// Channels the client offered and what became of each.
    Channels {
        /// Every static channel the client offered, in order.
        offered: Vec<String>,
        /// Those the grant refuses (kept in the list, their data dropped both ways).
        refused: Vec<String>,
    },
    /// Something refused (the io side audits it as `AuditKind::RdpChannel` and writes an event
    /// line).
    Refused {
        /// The channel (escaped before logging by the io side; names come from the client).
        channel: String,
        /// What was refused: "channel", "to-target", "from-target", "drive", "printer", ….
        what: &'static str,
        /// Why, in words.
        reason: String,
    },
    /// The desktop size (Server Demand Active).
    Desktop {
        /// Width in pixels.
        width: u16,
        /// Height in pixels.
        height: u16,
    },
    /// The client's keyboard layout (Client Core Data).
    Keyboard {
        /// Windows keyboard layout id (e.g. 0x409 US).
        layout: u32,
    },
    /// The client or the target asked to disconnect (MCS Disconnect Provider Ultimatum etc.).
    Disconnect {
        /// True when the client asked.
        by_client: bool,
    },
}

/// Why the connection ends; names the side at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The client sent something malformed or forbidden.
    #[error("client: {0}")]
    Client(String),
    /// The target sent something malformed or forbidden.
    #[error("target: {0}")]
    Target(String),
}

/// The per-connection RDP state machine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    input_seen: bool,
}

impl Engine {
    /// A fresh engine for one connection.
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine {
            cfg,
            input_seen: false,
        }
    }

    /// One whole frame from the client (as cut by [`super::frame::next_frame`]).
    pub fn client_frame(
        &mut self,
        kind: FrameKind,
        frame: &[u8],
        out: &mut Vec<Out>,
    ) -> Result<(), EngineError> {
        let _ = (kind, &self.cfg);
        out.push(Out::ToTarget(frame.to_vec()));
        out.push(Out::Record {
            direction: Direction::Input,
            pdu: frame.to_vec(),
        });
        Ok(())
    }

    /// One whole frame from the target.
    pub fn target_frame(
        &mut self,
        kind: FrameKind,
        frame: &[u8],
        out: &mut Vec<Out>,
    ) -> Result<(), EngineError> {
        let _ = kind;
        out.push(Out::ToClient(frame.to_vec()));
        out.push(Out::Record {
            direction: Direction::Output,
            pdu: frame.to_vec(),
        });
        Ok(())
    }

    /// Whether the user gave input (keyboard or mouse) since the last call.
    pub fn take_input_seen(&mut self) -> bool {
        std::mem::take(&mut self.input_seen)
    }
}
