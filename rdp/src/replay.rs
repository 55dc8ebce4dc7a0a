//! Offline rendering of a recorded RDP session: the recorded PDUs in, the screen out.
//!
//! A recording keeps every PDU each way exactly as relayed. [`Renderer`] learns what a live
//! client learns during the connection sequence from the recorded PDUs themselves: the I/O
//! channel id (MCS Connect Response), the user channel id (Attach User Confirm), the share id
//! and desktop size (Server Demand Active) and the bulk compression the client asked for (Client
//! Info). From the first Demand Active on, it feeds the server's PDUs on the I/O channel to
//! ironrdp-session's `ActiveStage`, which paints them into an RGBA image; a later Demand Active
//! (after a Deactivate All, e.g. a resize) starts a fresh image of the new size.
//!
//! Static virtual channels (clipboard, drives, sound) carry no graphics and are skipped, and
//! so is every client PDU except the Client Info. The server's finalization PDUs (Synchronize,
//! Control, Font Map) make `ActiveStage` return errors: they change nothing on screen and
//! callers may ignore [`ReplayError`]s. No errors stop the replay.
//!
//! [`Sampler`] turns the stream of timed PDUs into frames at a fixed interval of recorded time,
//! for PNG and video exports. Both are sans-IO.

use ironrdp_core::decode;
use ironrdp_graphics::image_processing::PixelFormat;
use ironrdp_pdu::mcs::{ConnectResponse, McsMessage};
use ironrdp_pdu::rdp::capability_sets::CapabilitySet;
use ironrdp_pdu::rdp::client_info::{ClientInfoFlags, CompressionType};
use ironrdp_pdu::rdp::headers::{ShareControlHeader, ShareControlPdu};
use ironrdp_pdu::rdp::ClientInfoPdu;
use ironrdp_pdu::x224::{X224Data, X224};
use ironrdp_pdu::Action;
use ironrdp_session::image::DecodedImage;
use ironrdp_session::{ActiveStage, ActiveStageBuilder, ActiveStageOutput};
use ironrdp_svc::StaticChannelSet;

/// Largest desktop rendered (a Demand Active asking for more is refused): 8K UHD.
pub const MAX_DESKTOP: (u16, u16) = (7680, 4320);

/// Most frames a [`Sampler`] emits (a damaged recording's timestamps cannot make it loop on).
pub const MAX_FRAMES: u64 = 10_000_000;

/// Which way a recorded PDU travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the target (recorded as `Input`).
    ClientToTarget,
    /// From the target to the client (recorded as `Output`).
    TargetToClient,
}

/// A PDU the renderer could not use. The replay goes on; the screen may miss an update.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The bytes are not one RDP PDU (neither TPKT nor fast-path).
    #[error("not an RDP PDU: {0}")]
    Framing(String),
    /// ironrdp could not decode or apply the PDU.
    #[error("cannot render PDU: {0}")]
    Render(String),
    /// The server asked for a desktop larger than [`MAX_DESKTOP`].
    #[error("desktop {width}x{height} is larger than psm renders")]
    TooLarge {
        /// Width asked for.
        width: u16,
        /// Height asked for.
        height: u16,
    },
}

/// Renders a recorded RDP session's screen (see the module docs).
pub struct Renderer {
    io_channel: Option<u16>,
    user_channel: u16,
    compression: Option<CompressionType>,
    stage: Option<ActiveStage>,
    image: Option<DecodedImage>,
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Renderer {
    /// A renderer that has seen nothing yet (no image until the first Demand Active).
    pub fn new() -> Self {
        Renderer {
            io_channel: None,
            user_channel: 0,
            compression: None,
            stage: None,
            image: None,
        }
    }

    /// Feeds one recorded PDU. Returns whether the screen changed (a graphics update, or a new
    /// desktop after a Demand Active).
    pub fn feed(&mut self, direction: Direction, pdu: &[u8]) -> Result<bool, ReplayError> {
        let info = ironrdp_pdu::find_size(pdu)
            .map_err(|e| ReplayError::Framing(e.to_string()))?
            .ok_or_else(|| ReplayError::Framing("incomplete PDU".into()))?;
        if info.length != pdu.len() {
            return Err(ReplayError::Framing(format!(
                "record holds {} bytes, the PDU {}",
                pdu.len(),
                info.length
            )));
        }
        match (direction, info.action) {
            (Direction::ClientToTarget, Action::X224) => {
                self.client_x224(pdu);
                Ok(false)
            }
            (Direction::ClientToTarget, Action::FastPath) => Ok(false),
            (Direction::TargetToClient, Action::X224) => self.server_x224(pdu),
            (Direction::TargetToClient, Action::FastPath) => self.render(Action::FastPath, pdu),
        }
    }

    /// The current screen: width, height and RGBA pixels (row-major, 4 bytes a pixel, alpha as
    /// the decoder left it). `None` before the first Demand Active.
    pub fn image(&self) -> Option<(u16, u16, &[u8])> {
        self.image
            .as_ref()
            .map(|i| (i.width(), i.height(), i.data()))
    }

    /// The learned I/O channel id, once the Connect Response was seen.
    pub fn io_channel(&self) -> Option<u16> {
        self.io_channel
    }

    /// The client's Client Info: remember the bulk compression it asked for.
    fn client_x224(&mut self, pdu: &[u8]) {
        let Ok(X224(McsMessage::SendDataRequest(sdr))) = decode::<X224<McsMessage<'_>>>(pdu) else {
            return;
        };
        if Some(sdr.channel_id) != self.io_channel {
            return;
        }
        if let Ok(info) = decode::<ClientInfoPdu>(&sdr.user_data) {
            let ci = &info.client_info;
            self.compression = ci
                .flags
                .contains(ClientInfoFlags::COMPRESSION)
                .then_some(ci.compression_type);
        }
    }

    fn server_x224(&mut self, pdu: &[u8]) -> Result<bool, ReplayError> {
        match decode::<X224<McsMessage<'_>>>(pdu) {
            Ok(X224(McsMessage::AttachUserConfirm(c))) => {
                self.user_channel = c.initiator_id;
                return Ok(false);
            }
            Ok(X224(McsMessage::SendDataIndication(sdi))) => {
                if Some(sdi.channel_id) != self.io_channel {
                    return Ok(false); // static virtual channels: no graphics
                }
                if let Ok(sch) = decode::<ShareControlHeader>(&sdi.user_data) {
                    if let ShareControlPdu::ServerDemandActive(da) = sch.share_control_pdu {
                        let size = da.pdu.capability_sets.iter().find_map(|c| match c {
                            CapabilitySet::Bitmap(b) => Some((b.desktop_width, b.desktop_height)),
                            _ => None,
                        });
                        return self.activate(sch.share_id, size);
                    }
                }
            }
            Ok(_) => return Ok(false),
            Err(_) => {
                // Not an MCS domain PDU: the Connect Response (or X.224 negotiation) is.
                if let Ok(x) = decode::<X224<X224Data<'_>>>(pdu) {
                    if let Ok(cr) = decode::<ConnectResponse>(&x.0.data) {
                        self.io_channel = Some(
                            cr.conference_create_response
                                .gcc_blocks()
                                .network
                                .io_channel,
                        );
                    }
                }
                return Ok(false);
            }
        }
        self.render(Action::X224, pdu)
    }

    /// A Demand Active: a fresh stage and image for the (new) desktop.
    fn activate(&mut self, share_id: u32, size: Option<(u16, u16)>) -> Result<bool, ReplayError> {
        let Some(io) = self.io_channel else {
            return Err(ReplayError::Render(
                "Demand Active before the Connect Response".into(),
            ));
        };
        let (width, height) = size.unwrap_or((1024, 768));
        if width == 0 || height == 0 || width > MAX_DESKTOP.0 || height > MAX_DESKTOP.1 {
            return Err(ReplayError::TooLarge { width, height });
        }
        self.stage = Some(
            ActiveStageBuilder {
                static_channels: StaticChannelSet::new(),
                user_channel_id: self.user_channel,
                io_channel_id: io,
                message_channel_id: None,
                share_id,
                compression_type: self.compression,
                enable_server_pointer: false,
                pointer_software_rendering: true,
            }
            .build(),
        );
        self.image = Some(DecodedImage::new(PixelFormat::RgbA32, width, height));
        Ok(true)
    }

    fn render(&mut self, action: Action, pdu: &[u8]) -> Result<bool, ReplayError> {
        let (Some(stage), Some(image)) = (self.stage.as_mut(), self.image.as_mut()) else {
            return Ok(false); // before the first Demand Active: nothing to paint on
        };
        let outputs = stage
            .process(image, action, pdu, None)
            .map_err(|e| ReplayError::Render(e.to_string()))?;
        let mut changed = false;
        for out in outputs {
            match out {
                ActiveStageOutput::GraphicsUpdate(_) => changed = true,
                ActiveStageOutput::DeactivateAll | ActiveStageOutput::Terminate(_) => {
                    // The next Demand Active builds a new stage; until then nothing renders.
                    self.stage = None;
                    break;
                }
                _ => {}
            }
        }
        Ok(changed)
    }
}

/// One sampled frame of the screen.
pub struct Frame<'a> {
    /// 1-based frame number: the frame shows the screen at `index * interval` of recorded time
    /// (the last one at the end of the recording).
    pub index: u64,
    /// Recorded time of the frame, microseconds since the session started.
    pub ts_us: u64,
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
    /// RGBA pixels, row-major, alpha opaque.
    pub rgba: &'a [u8],
}

/// Samples a [`Renderer`]'s screen at a fixed interval of recorded time.
///
/// Feed every recorded PDU in order with [`Sampler::feed`], then call [`Sampler::finish`] with
/// the recording's end. Each call hands the frames due to `emit`. Frames before the first
/// image (the connection sequence) are not emitted; their numbers are skipped, so frame `n`
/// always shows the screen at `n * interval`.
pub struct Sampler {
    renderer: Renderer,
    interval_us: u64,
    next: u64,
    last_ts: u64,
    errors: u64,
    rgba: Vec<u8>,
}

impl Sampler {
    /// A sampler taking one frame every `interval_us` microseconds of recorded time (at least 1).
    pub fn new(interval_us: u64) -> Self {
        Sampler {
            renderer: Renderer::new(),
            interval_us: interval_us.max(1),
            next: 1,
            last_ts: 0,
            errors: 0,
            rgba: Vec::new(),
        }
    }

    /// PDUs the renderer could not use so far (see [`ReplayError`]).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// The renderer (for its current image).
    pub fn renderer(&self) -> &Renderer {
        &self.renderer
    }

    /// Feeds one PDU recorded at `ts_us`; first emits the frames due before it.
    pub fn feed<E>(
        &mut self,
        ts_us: u64,
        direction: Direction,
        pdu: &[u8],
        emit: &mut dyn FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.emit_until(ts_us, emit)?;
        if self.renderer.feed(direction, pdu).is_err() {
            self.errors += 1;
        }
        Ok(())
    }

    /// Emits the frames due up to `end_us` (the recording's end) and a last frame at the end
    /// when it falls inside an interval.
    pub fn finish<E>(
        &mut self,
        end_us: u64,
        emit: &mut dyn FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let end_us = end_us.max(self.last_ts);
        self.emit_until(end_us.saturating_add(1), emit)?;
        if self.next <= MAX_FRAMES
            && self.next.saturating_sub(1).saturating_mul(self.interval_us) < end_us
        {
            self.emit_one(end_us, emit)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Emits frames for every sample instant strictly before `ts_us`.
    fn emit_until<E>(
        &mut self,
        ts_us: u64,
        emit: &mut dyn FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.last_ts = self.last_ts.max(ts_us);
        while self.next <= MAX_FRAMES && self.next.saturating_mul(self.interval_us) < ts_us {
            let at = self.next.saturating_mul(self.interval_us);
            self.emit_one(at, emit)?;
            self.next += 1;
        }
        Ok(())
    }

    fn emit_one<E>(
        &mut self,
        ts_us: u64,
        emit: &mut dyn FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some((width, height, data)) = self.renderer.image() else {
            return Ok(());
        };
        self.rgba.clear();
        self.rgba.extend_from_slice(data);
        for px in self.rgba.chunks_exact_mut(4) {
            px[3] = 0xFF;
        }
        emit(Frame {
            index: self.next,
            ts_us,
            width,
            height,
            rgba: &self.rgba,
        })
    }
}

#[cfg(test)]
#[path = "replay_tests.rs"]
mod tests;
