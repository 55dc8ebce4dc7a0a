//! Synthetic server PDUs of a minimal RDP session, for tests and fuzz seeds: what a server
//! sends that [`crate::Renderer`] needs (Connect Response, Attach User Confirm, Demand Active)
//! and fast-path bitmap updates of one colour.
//!
//! Not a server: nothing here answers a client.

use std::borrow::Cow;

use ironrdp_core::{encode_vec, Encode};
use ironrdp_pdu::bitmap::{BitmapData, BitmapUpdateData, Compression};
use ironrdp_pdu::fast_path::{
    EncryptionFlags, FastPathHeader, FastPathUpdatePdu, Fragmentation, UpdateCode,
};
use ironrdp_pdu::gcc::{
    ConferenceCreateResponse, RdpVersion, ServerCoreData, ServerCoreOptionalData, ServerGccBlocks,
    ServerNetworkData, ServerSecurityData,
};
use ironrdp_pdu::geometry::InclusiveRectangle;
use ironrdp_pdu::mcs::{
    AttachUserConfirm, ConnectResponse, DomainParameters, McsMessage, SendDataIndication,
};
use ironrdp_pdu::rdp::capability_sets::{
    Bitmap, BitmapDrawingFlags, CapabilitySet, DemandActive, ServerDemandActive,
};
use ironrdp_pdu::rdp::headers::{ShareControlHeader, ShareControlPdu};
use ironrdp_pdu::x224::{X224Data, X224};

/// I/O channel id the synthetic session uses.
pub const IO_CHANNEL: u16 = 1003;
/// User channel id the synthetic session uses.
pub const USER_CHANNEL: u16 = 1007;
/// Share id the synthetic session uses.
pub const SHARE_ID: u32 = 0x103EA;

fn enc<T: Encode + ?Sized>(pdu: &T) -> Result<Vec<u8>, String> {
    encode_vec(pdu).map_err(|e| e.to_string())
}

/// The MCS Connect Response naming [`IO_CHANNEL`].
pub fn connect_response() -> Result<Vec<u8>, String> {
    let blocks = ServerGccBlocks {
        core: ServerCoreData {
            version: RdpVersion::V5_PLUS,
            optional_data: ServerCoreOptionalData::default(),
        },
        network: ServerNetworkData {
            channel_ids: Vec::new(),
            io_channel: IO_CHANNEL,
        },
        security: ServerSecurityData::no_security(),
        message_channel: None,
        multi_transport_channel: None,
    };
    let cr = ConnectResponse {
        conference_create_response: ConferenceCreateResponse::new(USER_CHANNEL, blocks)
            .map_err(|e| e.to_string())?,
        called_connect_id: 1,
        domain_parameters: DomainParameters::target(),
    };
    enc(&X224(X224Data {
        data: Cow::Owned(enc(&cr)?),
    }))
}

/// The Attach User Confirm giving [`USER_CHANNEL`].
pub fn attach_user_confirm() -> Result<Vec<u8>, String> {
    enc(&X224(McsMessage::AttachUserConfirm(AttachUserConfirm {
        result: 0,
        initiator_id: USER_CHANNEL,
    })))
}

/// A Server Demand Active for a desktop of `width` x `height`.
pub fn demand_active(width: u16, height: u16) -> Result<Vec<u8>, String> {
    let sch = ShareControlHeader {
        share_control_pdu: ShareControlPdu::ServerDemandActive(ServerDemandActive {
            pdu: DemandActive {
                source_descriptor: "RDP".into(),
                capability_sets: vec![CapabilitySet::Bitmap(Bitmap {
                    pref_bits_per_pix: 32,
                    desktop_width: width,
                    desktop_height: height,
                    desktop_resize_flag: true,
                    drawing_flags: BitmapDrawingFlags::empty(),
                })],
            },
        }),
        pdu_source: USER_CHANNEL,
        share_id: SHARE_ID,
    };
    enc(&X224(McsMessage::SendDataIndication(SendDataIndication {
        initiator_id: USER_CHANNEL,
        channel_id: IO_CHANNEL,
        user_data: Cow::Owned(enc(&sch)?),
    })))
}

/// A fast-path bitmap update filling `width` x `height` pixels at (`left`, `top`) with one
/// colour (`rgb` = red, green, blue), as a 32 bpp uncompressed bitmap.
pub fn fill(left: u16, top: u16, width: u16, height: u16, rgb: [u8; 3]) -> Result<Vec<u8>, String> {
    if width == 0 || height == 0 {
        return Err("empty rectangle".into());
    }
    let (Some(right), Some(bottom)) = (left.checked_add(width - 1), top.checked_add(height - 1))
    else {
        return Err("rectangle beyond 65535".into());
    };
    let [r, g, b] = rgb;
    let pixels: Vec<u8> = [b, g, r, 0]
        .iter()
        .copied()
        .cycle()
        .take(usize::from(width) * usize::from(height) * 4)
        .collect();
    let update = BitmapUpdateData {
        rectangles: vec![BitmapData {
            rectangle: InclusiveRectangle {
                left,
                top,
                right,
                bottom,
            },
            width,
            height,
            bits_per_pixel: 32,
            compression_flags: Compression::empty(),
            compressed_data_header: None,
            bitmap_data: &pixels,
        }],
    };
    let data = enc(&update)?;
    let pdu = enc(&FastPathUpdatePdu {
        fragmentation: Fragmentation::Single,
        update_code: UpdateCode::Bitmap,
        compression_flags: None,
        compression_type: None,
        data: &data,
    })?;
    let mut frame = enc(&FastPathHeader::new(EncryptionFlags::empty(), pdu.len()))?;
    frame.extend_from_slice(&pdu);
    Ok(frame)
}

/// The server PDUs of a session start on a `width` x `height` desktop, in order.
pub fn session_start(width: u16, height: u16) -> Result<Vec<Vec<u8>>, String> {
    Ok(vec![
        connect_response()?,
        attach_user_confirm()?,
        demand_active(width, height)?,
    ])
}
