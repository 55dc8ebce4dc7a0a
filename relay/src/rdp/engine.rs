//! The RDP relay engine: every frame of an established RDP connection (after TLS and CredSSP on
//! both legs) goes through [`Engine`], which decides what reaches the other side, what the
//! recording keeps, what the user typed and which events the session audits.
//!
//! Sans-IO: frames in (as cut by [`super::frame::next_frame`]), [`Out`] steps out; the io side
//! carries them out in order.

mod channels;
mod clip;
mod dvc;
mod errinfo;
mod info;
mod input;
mod mcs;
mod rdpdr;
pub mod samples;
mod svc;
#[cfg(test)]
mod tests;

use ironrdp_core::decode;
use ironrdp_pdu::mcs::McsMessage;
use ironrdp_pdu::rdp::capability_sets::CapabilitySet;
use ironrdp_pdu::rdp::headers::{ShareControlHeader, ShareControlPdu, ShareDataPdu};
use ironrdp_pdu::x224::X224;
use psm_control_api::{RdpChannels, Secret};
use psm_recorder_format::Direction;

use self::channels::{Carrier, Rule};
use self::clip::Clip;
use self::dvc::Dvc;
pub use self::errinfo::EndNotice;
use self::input::Input;
use self::rdpdr::Rdpdr;
use self::svc::Step;
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

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's MCS Connect Initial.
    ConnectInitial,
    /// Waiting for the target's MCS Connect Response.
    ConnectResponse,
    /// Channels known: relaying.
    Relay,
}

/// One static channel the client offered.
#[derive(Debug)]
struct Channel {
    name: String,
    rule: Rule,
    id: Option<u16>,
    filter: Filter,
}

#[derive(Debug)]
enum Filter {
    None,
    Clip(Clip),
    Rdpdr(Rdpdr),
    Dvc(Dvc),
}

/// Share Control PDU types psm looks at (`pduType`, low 4 bits).
const PDUTYPE_DEMAND_ACTIVE: u16 = 0x1;
const PDUTYPE_DATA: u16 = 0x7;
const PDUTYPE_SERVER_REDIRECT: u16 = 0xa;
/// The channel clients take as the I/O channel (MCS_GLOBAL_CHANNEL_ID), whatever the target
/// declared.
const MCS_GLOBAL_CHANNEL: u16 = 1003;
/// Share Data PDU types psm looks at (`pduType2`).
const PDUTYPE2_INPUT: u8 = 0x1c;
const PDUTYPE2_SHUTDOWN_REQUEST: u8 = 0x24;
/// X.224 TPDU codes.
const TPDU_DATA: u8 = 0xf0;
const TPDU_DISCONNECT_REQUEST: u8 = 0x80;
const TPDU_ERROR: u8 = 0x70;
/// A Data TPDU's second byte: end of transmission (class 0 never segments).
const TPDU_EOT: u8 = 0x80;

/// The per-connection RDP state machine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    phase: Phase,
    channels: Vec<Channel>,
    io_channel: Option<u16>,
    user_channel: Option<u16>,
    client_initiator: Option<u16>,
    server_initiator: Option<u16>,
    share_id: Option<u32>,
    info_done: bool,
    input: Option<Input>,
    input_seen: bool,
}

impl Engine {
    /// A fresh engine for one connection.
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine {
            cfg,
            phase: Phase::ConnectInitial,
            channels: Vec::new(),
            io_channel: None,
            user_channel: None,
            client_initiator: None,
            server_initiator: None,
            share_id: None,
            info_done: false,
            input: None,
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
        match (kind, self.phase) {
            (FrameKind::FastPath, Phase::ConnectInitial) => Err(EngineError::Client(
                "fast-path input before the MCS Connect Initial".into(),
            )),
            (FrameKind::FastPath, _) => {
                let input = self
                    .input
                    .get_or_insert_with(|| Input::new(0x409))
                    .fast_path(frame)
                    .map_err(EngineError::Client)?;
                to_target(out, frame.to_vec());
                self.input_seen |= input.activity;
                if !input.typed.is_empty() {
                    out.push(Out::Typed(input.typed));
                }
                Ok(())
            }
            (FrameKind::X224, Phase::ConnectInitial) => self
                .connect_initial(frame, out)
                .map_err(EngineError::Client),
            (FrameKind::X224, _) => self.client_x224(frame, out).map_err(EngineError::Client),
        }
    }

    /// One whole frame from the target.
    pub fn target_frame(
        &mut self,
        kind: FrameKind,
        frame: &[u8],
        out: &mut Vec<Out>,
    ) -> Result<(), EngineError> {
        match (kind, self.phase) {
            // Graphics and other fast-path output: relayed untouched.
            (FrameKind::FastPath, _) => {
                to_client(out, frame.to_vec());
                Ok(())
            }
            (FrameKind::X224, Phase::ConnectInitial) => Err(EngineError::Target(
                "the target spoke before the client's MCS Connect Initial".into(),
            )),
            (FrameKind::X224, Phase::ConnectResponse) => self
                .connect_response(frame, out)
                .map_err(EngineError::Target),
            (FrameKind::X224, Phase::Relay) => {
                self.target_x224(frame, out).map_err(EngineError::Target)
            }
        }
    }

    /// The frame that tells the client why psm ends the session (a Set Error Info PDU), once
    /// the target has set up the share; `None` before (the client then sees only the
    /// disconnect).
    pub fn end_notice(&self, notice: EndNotice) -> Option<Vec<u8>> {
        let io = self.io_channel?;
        let share_id = self.share_id?;
        let server = self.server_initiator.unwrap_or(1002);
        errinfo::frame(notice, io, server, share_id)
    }

    /// Whether the user gave input (keyboard or mouse) since the last call.
    pub fn take_input_seen(&mut self) -> bool {
        std::mem::take(&mut self.input_seen)
    }

    fn connect_initial(&mut self, frame: &[u8], out: &mut Vec<Out>) -> Result<(), String> {
        if tpdu(frame)? != Tpdu::Data {
            return Err("X.224 TPDU other than Data before the MCS Connect Initial".into());
        }
        let initial = mcs::rewrite_connect_initial(frame, self.cfg.target_protocol)?;
        self.input = Some(Input::new(initial.keyboard_layout));
        out.push(Out::Event(RdpEvent::Keyboard {
            layout: initial.keyboard_layout,
        }));
        let mut refused = Vec::new();
        for name in &initial.channels {
            let rule = channels::rule_for(name, &self.cfg.rules);
            let filter = match rule {
                Rule::Clip { to_target } => Filter::Clip(Clip::new(to_target)),
                Rule::Rdpdr {
                    drive,
                    printer,
                    smartcard,
                } => Filter::Rdpdr(Rdpdr::new(drive, printer, smartcard)),
                Rule::Dvc => Filter::Dvc(Dvc::new(self.cfg.rules.clone())),
                Rule::Pass | Rule::Refused => Filter::None,
            };
            if rule == Rule::Refused {
                refused.push(name.clone());
                out.push(Out::Event(RdpEvent::Refused {
                    channel: name.clone(),
                    what: "channel",
                    reason: channels::refusal_reason(name),
                }));
            }
            self.channels.push(Channel {
                name: name.clone(),
                rule,
                id: None,
                filter,
            });
        }
        out.push(Out::Event(RdpEvent::Channels {
            offered: initial.channels,
            refused,
        }));
        to_target(out, initial.frame);
        self.phase = Phase::ConnectResponse;
        Ok(())
    }

    fn connect_response(&mut self, frame: &[u8], out: &mut Vec<Out>) -> Result<(), String> {
        if tpdu(frame)? != Tpdu::Data {
            return Err("X.224 TPDU other than Data before the MCS Connect Response".into());
        }
        let resp = mcs::connect_response(frame)?;
        if resp.channel_ids.len() != self.channels.len() {
            return Err(format!(
                "MCS Connect Response has {} channel ids for {} channels",
                resp.channel_ids.len(),
                self.channels.len()
            ));
        }
        for (c, id) in self.channels.iter_mut().zip(resp.channel_ids) {
            c.id = Some(id);
        }
        self.io_channel = Some(resp.io_channel);
        self.phase = Phase::Relay;
        to_client(out, frame.to_vec());
        Ok(())
    }

    fn client_x224(&mut self, frame: &[u8], out: &mut Vec<Out>) -> Result<(), String> {
        match tpdu(frame)? {
            Tpdu::Data => {}
            other => {
                if other == Tpdu::Disconnect {
                    out.push(Out::Event(RdpEvent::Disconnect { by_client: true }));
                }
                to_target(out, frame.to_vec());
                return Ok(());
            }
        }
        let X224(msg) = decode::<X224<McsMessage<'_>>>(frame).map_err(|e| format!("MCS: {e}"))?;
        match msg {
            McsMessage::SendDataRequest(sdr) => {
                self.client_initiator = Some(sdr.initiator_id);
                let Some(io) = self.io_channel else {
                    return Err("MCS data before the Connect Response".into());
                };
                if sdr.channel_id == io {
                    return self.client_io(sdr.initiator_id, io, &sdr.user_data, frame, out);
                }
                self.client_channel(sdr.channel_id, &sdr.user_data, frame, out)
            }
            McsMessage::DisconnectProviderUltimatum(_) => {
                out.push(Out::Event(RdpEvent::Disconnect { by_client: true }));
                to_target(out, frame.to_vec());
                Ok(())
            }
            _ => {
                to_target(out, frame.to_vec());
                Ok(())
            }
        }
    }

    /// Client data on the I/O channel: the Client Info first, then share control PDUs.
    fn client_io(
        &mut self,
        initiator: u16,
        io: u16,
        user_data: &[u8],
        frame: &[u8],
        out: &mut Vec<Out>,
    ) -> Result<(), String> {
        if !self.info_done {
            if !info::is_info_pkt(user_data) {
                return Err("I/O channel data before the Client Info PDU".into());
            }
            let rewritten = info::rewrite(initiator, io, user_data, &self.cfg.login)?;
            self.info_done = true;
            out.push(Out::Record {
                direction: Direction::Input,
                pdu: rewritten.record,
            });
            out.push(Out::ToTarget(rewritten.frame));
            return Ok(());
        }
        match share_types(user_data) {
            Some((PDUTYPE_DATA, Some(PDUTYPE2_INPUT))) => {
                let header: ShareControlHeader =
                    decode(user_data).map_err(|e| format!("slow-path input: {e}"))?;
                if let ShareControlPdu::Data(d) = header.share_control_pdu {
                    if let ShareDataPdu::Input(events) = d.share_data_pdu {
                        let input = self.input.get_or_insert_with(|| Input::new(0x409));
                        let fed = input.slow_path(&events.0);
                        to_target(out, frame.to_vec());
                        self.input_seen |= fed.activity;
                        if !fed.typed.is_empty() {
                            out.push(Out::Typed(fed.typed));
                        }
                        return Ok(());
                    }
                }
            }
            Some((PDUTYPE_DATA, Some(PDUTYPE2_SHUTDOWN_REQUEST))) => {
                out.push(Out::Event(RdpEvent::Disconnect { by_client: true }));
            }
            _ => {}
        }
        to_target(out, frame.to_vec());
        Ok(())
    }

    fn client_channel(
        &mut self,
        id: u16,
        user_data: &[u8],
        frame: &[u8],
        out: &mut Vec<Out>,
    ) -> Result<(), String> {
        let server_initiator = self.server_initiator.or(self.user_channel).unwrap_or(1001);
        let user_initiator = self.client_initiator.or(self.user_channel).unwrap_or(1001);
        let Some(ch) = self.channels.iter_mut().find(|c| c.id == Some(id)) else {
            to_target(out, frame.to_vec());
            return Ok(());
        };
        match (&mut ch.filter, ch.rule) {
            (_, Rule::Refused) => {}
            (Filter::Clip(clip), Rule::Clip { to_target: rule }) => {
                let chunk = channels::chunk(user_data)?;
                let r = clip.feed(true, frame, &chunk)?;
                for s in r.steps {
                    if let Step::Forward(f) = s {
                        to_target(out, f);
                    }
                }
                if let Some(reply) = r.reply {
                    let carrier = Carrier::Indication {
                        initiator: server_initiator,
                    };
                    for f in
                        channels::message_frames(carrier, id, &reply, channels::FLAG_SHOW_PROTOCOL)?
                    {
                        to_client(out, f);
                    }
                }
                if let Some((what, did)) = r.refused {
                    out.push(Out::Event(clip_refused(what, did, rule)));
                }
            }
            (Filter::Rdpdr(rdpdr), _) => {
                let chunk = channels::chunk(user_data)?;
                let r = rdpdr.feed(frame, &chunk)?;
                for s in r.steps {
                    if let Step::Forward(f) = s {
                        to_target(out, f);
                    }
                }
                if let Some((msg, removed)) = r.rewritten {
                    let carrier = Carrier::Request {
                        initiator: user_initiator,
                    };
                    for f in channels::message_frames(carrier, id, &msg, chunk.flags)? {
                        to_target(out, f);
                    }
                    for d in removed {
                        out.push(Out::Event(RdpEvent::Refused {
                            channel: ch.name.clone(),
                            what: d.kind,
                            reason: format!(
                                "{} '{}' not allowed by the grant",
                                d.kind,
                                psm_control_api::escape(&d.name)
                            ),
                        }));
                    }
                }
            }
            _ => to_target(out, frame.to_vec()),
        }
        Ok(())
    }

    fn target_x224(&mut self, frame: &[u8], out: &mut Vec<Out>) -> Result<(), String> {
        match tpdu(frame)? {
            Tpdu::Data => {}
            other => {
                if other == Tpdu::Disconnect {
                    out.push(Out::Event(RdpEvent::Disconnect { by_client: false }));
                }
                to_client(out, frame.to_vec());
                return Ok(());
            }
        }
        let X224(msg) = decode::<X224<McsMessage<'_>>>(frame).map_err(|e| format!("MCS: {e}"))?;
        match msg {
            McsMessage::AttachUserConfirm(c) => self.user_channel = Some(c.initiator_id),
            McsMessage::SendDataIndication(sdi) => {
                self.server_initiator = Some(sdi.initiator_id);
                // The client would reconnect elsewhere, around psm. Every Share Control PDU of
                // the frame counts (clients read them all), on the I/O channel the target
                // declared and on the one clients take as it whatever was declared.
                let io = Some(sdi.channel_id) == self.io_channel;
                if (io || sdi.channel_id == MCS_GLOBAL_CHANNEL) && redirects(&sdi.user_data) {
                    return Err("server redirection (psm does not follow it)".into());
                }
                if io {
                    if let Some((PDUTYPE_DEMAND_ACTIVE, _)) = share_types(&sdi.user_data) {
                        self.share_id = sdi
                            .user_data
                            .get(6..10)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                        if let Some(ev) = desktop(&sdi.user_data) {
                            out.push(Out::Event(ev));
                        }
                    }
                } else {
                    return self.target_channel(sdi.channel_id, &sdi.user_data, frame, out);
                }
            }
            McsMessage::DisconnectProviderUltimatum(_) => {
                out.push(Out::Event(RdpEvent::Disconnect { by_client: false }));
            }
            _ => {}
        }
        to_client(out, frame.to_vec());
        Ok(())
    }

    fn target_channel(
        &mut self,
        id: u16,
        user_data: &[u8],
        frame: &[u8],
        out: &mut Vec<Out>,
    ) -> Result<(), String> {
        let user_initiator = self.client_initiator.or(self.user_channel).unwrap_or(1001);
        let server_initiator = self.server_initiator.or(self.user_channel).unwrap_or(1001);
        let Some(ch) = self.channels.iter_mut().find(|c| c.id == Some(id)) else {
            to_client(out, frame.to_vec());
            return Ok(());
        };
        match (&mut ch.filter, ch.rule) {
            (_, Rule::Refused) => {}
            (Filter::Clip(clip), Rule::Clip { to_target: rule }) => {
                let chunk = channels::chunk(user_data)?;
                let r = clip.feed(false, frame, &chunk)?;
                for s in r.steps {
                    if let Step::Forward(f) = s {
                        to_client(out, f);
                    }
                }
                if let Some(reply) = r.reply {
                    let carrier = Carrier::Request {
                        initiator: user_initiator,
                    };
                    for f in
                        channels::message_frames(carrier, id, &reply, channels::FLAG_SHOW_PROTOCOL)?
                    {
                        to_target(out, f);
                    }
                }
                if let Some((what, did)) = r.refused {
                    out.push(Out::Event(clip_refused(what, did, rule)));
                }
            }
            (Filter::Rdpdr(rdpdr), _) => {
                let chunk = channels::chunk(user_data)?;
                let r = rdpdr.feed_down(frame, &chunk)?;
                for s in r.steps {
                    if let Step::Forward(f) = s {
                        to_client(out, f);
                    }
                }
                if let Some(device) = r.dropped {
                    let reason = if device == 0 {
                        "the target's printer message, where psm passed no printer on".to_string()
                    } else {
                        format!(
                            "the target's I/O request for device {device}, which psm did not pass on"
                        )
                    };
                    out.push(Out::Event(RdpEvent::Refused {
                        channel: ch.name.clone(),
                        what: "device",
                        reason,
                    }));
                }
            }
            (Filter::Dvc(dvc), _) => {
                let chunk = channels::chunk(user_data)?;
                let r = dvc.feed(frame, &chunk)?;
                for s in r.steps {
                    if let Step::Forward(f) = s {
                        to_client(out, f);
                    }
                }
                if let Some(create) = r.create {
                    let carrier = Carrier::Indication {
                        initiator: server_initiator,
                    };
                    for f in channels::message_frames(carrier, id, &create, chunk.flags)? {
                        to_client(out, f);
                    }
                }
                if let Some((name, reply)) = r.refused {
                    let carrier = Carrier::Request {
                        initiator: user_initiator,
                    };
                    for f in channels::message_frames(carrier, id, &reply, chunk.flags)? {
                        to_target(out, f);
                    }
                    out.push(Out::Event(RdpEvent::Refused {
                        channel: name,
                        what: "channel",
                        reason: "dynamic channel not allowed by the grant".into(),
                    }));
                }
            }
            _ => to_client(out, frame.to_vec()),
        }
        Ok(())
    }
}

/// Records and sends a frame to the target.
fn to_target(out: &mut Vec<Out>, frame: Vec<u8>) {
    out.push(Out::Record {
        direction: Direction::Input,
        pdu: frame.clone(),
    });
    out.push(Out::ToTarget(frame));
}

/// Records and sends a frame to the client.
fn to_client(out: &mut Vec<Out>, frame: Vec<u8>) {
    out.push(Out::Record {
        direction: Direction::Output,
        pdu: frame.clone(),
    });
    out.push(Out::ToClient(frame));
}

fn clip_refused(what: &'static str, did: &'static str, to_target: bool) -> RdpEvent {
    RdpEvent::Refused {
        channel: "cliprdr".into(),
        what,
        reason: format!(
            "{did}: the grant allows the clipboard {} only",
            if to_target {
                "to-target"
            } else {
                "from-target"
            }
        ),
    }
}

/// The X.224 (class 0) TPDUs of a connection once it is set up.
#[derive(Debug, PartialEq, Eq)]
enum Tpdu {
    /// Data (DT): the MCS carrier, decoded.
    Data,
    /// Disconnect Request (DR): passed on, an event.
    Disconnect,
    /// Error (ER): passed on.
    Error,
}

/// What X.224 TPDU `frame` (TPKT, then the TPDU) is. A Data TPDU must have the header every
/// client parses (length indicator 2, end of transmission set): one read differently by psm
/// and by the peer behind it could carry what psm never saw (a redirection) past its checks.
/// Any other TPDU has no place after the connection and is refused.
fn tpdu(frame: &[u8]) -> Result<Tpdu, String> {
    // TPKT (4) + X.224 length indicator (1) + TPDU code.
    let (Some(&li), Some(&code)) = (frame.get(4), frame.get(5)) else {
        return Err("X.224 TPDU cut short".into());
    };
    if 5 + usize::from(li) > frame.len() {
        return Err(format!(
            "X.224 length indicator {li} runs past its {}-byte frame",
            frame.len()
        ));
    }
    match code {
        TPDU_DATA if li == 2 && frame.get(6) == Some(&TPDU_EOT) => Ok(Tpdu::Data),
        TPDU_DATA => Err(format!(
            "X.224 Data TPDU with length indicator {li} or without end of transmission"
        )),
        TPDU_DISCONNECT_REQUEST => Ok(Tpdu::Disconnect),
        TPDU_ERROR => Ok(Tpdu::Error),
        other => Err(format!("X.224 TPDU {other:#04x} after the connection")),
    }
}

/// Whether any Share Control PDU of `user_data` is a Server Redirection PDU: the PDUs are
/// walked by their `totalLength` (a flow PDU, marked 0x8000, is 8 bytes), as clients read them.
fn redirects(user_data: &[u8]) -> bool {
    let mut at = 0usize;
    while let Some(head) = user_data.get(at..at + 4) {
        let total = u16::from_le_bytes([head[0], head[1]]);
        if total == 0x8000 {
            at += 8;
            continue;
        }
        if u16::from_le_bytes([head[2], head[3]]) & 0x0f == PDUTYPE_SERVER_REDIRECT {
            return true;
        }
        if total < 4 {
            return false;
        }
        at += usize::from(total);
    }
    false
}

/// The Share Control `pduType` and, for Data PDUs, the Share Data `pduType2`, read in place.
fn share_types(user_data: &[u8]) -> Option<(u16, Option<u8>)> {
    let ty = user_data
        .get(2..4)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) & 0x0f)?;
    let ty2 = (ty == PDUTYPE_DATA)
        .then(|| user_data.get(14).copied())
        .flatten();
    Some((ty, ty2))
}

/// The desktop size of a Server Demand Active PDU (none if it does not decode).
fn desktop(user_data: &[u8]) -> Option<RdpEvent> {
    let header: ShareControlHeader = decode(user_data).ok()?;
    let ShareControlPdu::ServerDemandActive(da) = header.share_control_pdu else {
        return None;
    };
    da.pdu.capability_sets.iter().find_map(|c| match c {
        CapabilitySet::Bitmap(b) => Some(RdpEvent::Desktop {
            width: b.desktop_width,
            height: b.desktop_height,
        }),
        _ => None,
    })
}
