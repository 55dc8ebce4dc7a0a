//! Real RDP PDUs built with the ironrdp encoders, for the engine's tests, the fuzz targets and
//! their corpora: a client offering channels, a target answering, a Client Info, input, channel
//! data. Nothing here is used by the relay itself.

use std::borrow::Cow;

use ironrdp_core::encode_vec;
use ironrdp_pdu::gcc::{
    ChannelDef, ChannelName, ChannelOptions, ClientCoreData, ClientCoreOptionalData,
    ClientEarlyCapabilityFlags, ClientGccBlocks, ClientNetworkData, ClientSecurityData, ColorDepth,
    ConferenceCreateResponse, ConnectionType, HighColorDepth, KeyboardType,
    MultiTransportChannelData, MultiTransportFlags, RdpVersion, SecureAccessSequence,
    ServerCoreData, ServerCoreOptionalData, ServerGccBlocks, ServerNetworkData, ServerSecurityData,
    SupportedColorDepths,
};
use ironrdp_pdu::input::fast_path::{FastPathInput, FastPathInputEvent};
use ironrdp_pdu::input::{InputEvent, InputEventPdu};
use ironrdp_pdu::mcs::{
    AttachUserConfirm, ConnectInitial, ConnectResponse, DomainParameters, McsMessage,
    SendDataIndication, SendDataRequest,
};
use ironrdp_pdu::nego::SecurityProtocol;
use ironrdp_pdu::rdp::capability_sets::{
    Bitmap, BitmapDrawingFlags, CapabilitySet, DemandActive, ServerDemandActive,
};
use ironrdp_pdu::rdp::client_info::{
    AddressFamily, ClientInfo, ClientInfoFlags, CompressionType, Credentials, ExtendedClientInfo,
};
use ironrdp_pdu::rdp::headers::{BasicSecurityHeader, BasicSecurityHeaderFlags};
use ironrdp_pdu::rdp::headers::{
    CompressionFlags, ShareControlHeader, ShareControlPdu, ShareDataHeader, ShareDataPdu,
    StreamPriority,
};
use ironrdp_pdu::rdp::ClientInfoPdu;
use ironrdp_pdu::x224::{X224Data, X224};
use psm_control_api::{RdpChannels, Secret};

use super::{Engine, EngineConfig, Out, TargetLogin};

/// The user channel of the samples.
pub const USER_CHANNEL: u16 = 1007;
/// The I/O channel of the samples.
pub const IO_CHANNEL: u16 = 1003;
/// The first static channel id of the samples (the others follow).
pub const FIRST_CHANNEL: u16 = 1004;
/// The channels xfreerdp offers, in its order.
pub const CHANNELS: [&str; 4] = ["rdpdr", "rdpsnd", "cliprdr", "drdynvc"];
/// The password the sample client types (must never leave the engine).
pub const USER_PASSWORD: &str = "User-Pass1";
/// The vaulted password of the sample configuration (must reach the target only).
pub const VAULT_PASSWORD: &str = "Vault-Pass9";

/// An encoding failure in a sample (a bug in the sample).
pub type Result<T> = std::result::Result<T, String>;

fn enc<T: ironrdp_core::Encode>(pdu: &T) -> Result<Vec<u8>> {
    encode_vec(pdu).map_err(|e| e.to_string())
}

/// The engine configuration of the samples: these rules, the target chose `SSL`, the vaulted
/// login `administrator` / [`VAULT_PASSWORD`] in domain `WIN01` with autologon.
pub fn config(rules: RdpChannels) -> EngineConfig {
    EngineConfig {
        rules,
        target_protocol: SecurityProtocol::SSL,
        login: TargetLogin {
            username: "administrator".into(),
            domain: Some("WIN01".into()),
            password: Secret::new(VAULT_PASSWORD.into()),
            autologon: true,
        },
    }
}

/// A client's MCS Connect Initial offering `channels`, keyboard `layout`, asking for EGFX, and
/// claiming the client chose `HYBRID` toward psm.
pub fn connect_initial(channels: &[&str], layout: u32) -> Result<Vec<u8>> {
    let channels = channels
        .iter()
        .map(|n| {
            Ok(ChannelDef {
                name: ChannelName::from_utf8(n).ok_or("channel name")?,
                options: ChannelOptions::INITIALIZED,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let gcc = ClientGccBlocks {
        core: ClientCoreData {
            version: RdpVersion::V5_PLUS,
            desktop_width: 1024,
            desktop_height: 768,
            color_depth: ColorDepth::Bpp8,
            sec_access_sequence: SecureAccessSequence::Del,
            keyboard_layout: layout,
            client_build: 2600,
            client_name: "laptop".into(),
            keyboard_type: KeyboardType::IBM_ENHANCED,
            keyboard_subtype: 0,
            keyboard_functional_keys_count: 12,
            ime_file_name: String::new(),
            optional_data: ClientCoreOptionalData {
                post_beta2_color_depth: Some(ColorDepth::Bpp8),
                client_product_id: Some(1),
                serial_number: Some(0),
                high_color_depth: Some(HighColorDepth::Bpp24),
                supported_color_depths: Some(SupportedColorDepths::BPP24),
                early_capability_flags: Some(
                    ClientEarlyCapabilityFlags::SUPPORT_ERR_INFO_PDU
                        | ClientEarlyCapabilityFlags::SUPPORT_DYN_VC_GFX_PROTOCOL,
                ),
                dig_product_id: Some(String::new()),
                connection_type: Some(ConnectionType::NotUsed),
                server_selected_protocol: Some(SecurityProtocol::HYBRID),
                desktop_physical_width: None,
                desktop_physical_height: None,
                desktop_orientation: None,
                desktop_scale_factor: None,
                device_scale_factor: None,
            },
        },
        security: ClientSecurityData::no_security(),
        network: Some(ClientNetworkData { channels }),
        cluster: None,
        monitor: None,
        message_channel: None,
        multi_transport_channel: Some(MultiTransportChannelData {
            flags: MultiTransportFlags::TRANSPORT_TYPE_UDP_FECR,
        }),
        monitor_extended: None,
    };
    let ci = ConnectInitial::with_gcc_blocks(gcc).map_err(|e| e.to_string())?;
    enc(&X224(X224Data {
        data: Cow::Owned(enc(&ci)?),
    }))
}

/// A target's MCS Connect Response giving `count` channels ids from [`FIRST_CHANNEL`] on.
pub fn connect_response(count: usize) -> Result<Vec<u8>> {
    let ids = (0..count)
        .map(|i| u16::try_from(i).map(|i| FIRST_CHANNEL + i))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let gcc = ServerGccBlocks {
        core: ServerCoreData {
            version: RdpVersion::V5_PLUS,
            optional_data: ServerCoreOptionalData {
                client_requested_protocols: Some(SecurityProtocol::SSL),
                early_capability_flags: None,
            },
        },
        network: ServerNetworkData {
            channel_ids: ids,
            io_channel: IO_CHANNEL,
        },
        security: ServerSecurityData::no_security(),
        message_channel: None,
        multi_transport_channel: None,
    };
    let cr = ConnectResponse {
        conference_create_response: ConferenceCreateResponse::new(USER_CHANNEL, gcc)
            .map_err(|e| e.to_string())?,
        called_connect_id: 1,
        domain_parameters: DomainParameters::target(),
    };
    enc(&X224(X224Data {
        data: Cow::Owned(enc(&cr)?),
    }))
}

/// The target's Attach User Confirm giving [`USER_CHANNEL`].
pub fn attach_user_confirm() -> Result<Vec<u8>> {
    enc(&X224(McsMessage::AttachUserConfirm(AttachUserConfirm {
        result: 0,
        initiator_id: USER_CHANNEL,
    })))
}

/// The client's Client Info PDU: user `alice`, [`USER_PASSWORD`], compression on.
pub fn client_info() -> Result<Vec<u8>> {
    let pdu = ClientInfoPdu {
        security_header: BasicSecurityHeader {
            flags: BasicSecurityHeaderFlags::INFO_PKT,
        },
        client_info: ClientInfo {
            credentials: Credentials {
                username: "alice".into(),
                password: USER_PASSWORD.into(),
                domain: Some("123456".into()),
            },
            password_cookie: None,
            code_page: 0,
            flags: ClientInfoFlags::MOUSE
                | ClientInfoFlags::UNICODE
                | ClientInfoFlags::LOGON_NOTIFY
                | ClientInfoFlags::COMPRESSION,
            compression_type: CompressionType::Rdp61,
            alternate_shell: String::new(),
            work_dir: String::new(),
            extra_info: ExtendedClientInfo {
                address_family: AddressFamily::INET,
                address: "192.0.2.7".into(),
                dir: "C:\\client".into(),
                optional_data: Default::default(),
            },
        },
    };
    send_data_request(IO_CHANNEL, enc(&pdu)?)
}

/// A client MCS Send Data Request on `channel`.
pub fn send_data_request(channel: u16, user_data: Vec<u8>) -> Result<Vec<u8>> {
    enc(&X224(McsMessage::SendDataRequest(SendDataRequest {
        initiator_id: USER_CHANNEL,
        channel_id: channel,
        user_data: Cow::Owned(user_data),
    })))
}

/// A target MCS Send Data Indication on `channel`.
pub fn send_data_indication(channel: u16, user_data: Vec<u8>) -> Result<Vec<u8>> {
    enc(&X224(McsMessage::SendDataIndication(SendDataIndication {
        initiator_id: USER_CHANNEL,
        channel_id: channel,
        user_data: Cow::Owned(user_data),
    })))
}

/// A fast-path input frame with these events.
pub fn fast_path(events: Vec<FastPathInputEvent>) -> Result<Vec<u8>> {
    enc(&FastPathInput::new(events).map_err(|e| e.to_string())?)
}

/// A slow-path Input PDU with these events, on the I/O channel.
pub fn slow_path(events: Vec<InputEvent>) -> Result<Vec<u8>> {
    let pdu = ShareControlHeader {
        share_control_pdu: ShareControlPdu::Data(ShareDataHeader {
            share_data_pdu: ShareDataPdu::Input(InputEventPdu(events)),
            stream_priority: StreamPriority::Medium,
            compression_flags: CompressionFlags::empty(),
            compression_type: CompressionType::K8,
        }),
        pdu_source: USER_CHANNEL,
        share_id: 0x1_03ea,
    };
    send_data_request(IO_CHANNEL, enc(&pdu)?)
}

/// The target's Server Demand Active for a `width` × `height` desktop, on the I/O channel.
pub fn demand_active(width: u16, height: u16) -> Result<Vec<u8>> {
    let pdu = ShareControlHeader {
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
        share_id: 0x1_03ea,
    };
    send_data_indication(IO_CHANNEL, enc(&pdu)?)
}

/// A static channel message in one chunk (`CHANNEL_PDU_HEADER` + data).
pub fn channel_pdu(message: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + message.len());
    v.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    v.extend_from_slice(&0x3u32.to_le_bytes());
    v.extend_from_slice(message);
    v
}

/// The id of the sample channel `name`.
pub fn channel_id(name: &str) -> u16 {
    let i = CHANNELS.iter().position(|c| *c == name).unwrap_or(0);
    FIRST_CHANNEL + u16::try_from(i).unwrap_or(0)
}

/// An engine past the Connect Initial, Connect Response and Attach User Confirm (with
/// [`CHANNELS`]): the client's next I/O channel PDU must be its Client Info.
pub fn before_client_info(rules: RdpChannels) -> Result<(Engine, Vec<Out>)> {
    use super::super::frame::FrameKind::X224 as K;
    let mut e = Engine::new(config(rules));
    let mut out = Vec::new();
    let err = |e: super::EngineError| e.to_string();
    e.client_frame(K, &connect_initial(&CHANNELS, 0x409)?, &mut out)
        .map_err(err)?;
    e.target_frame(K, &connect_response(CHANNELS.len())?, &mut out)
        .map_err(err)?;
    e.target_frame(K, &attach_user_confirm()?, &mut out)
        .map_err(err)?;
    Ok((e, out))
}

/// An engine past the Connect Initial, Connect Response, Attach User Confirm and Client Info
/// (with [`CHANNELS`]), and the steps it took.
pub fn connected(rules: RdpChannels) -> Result<(Engine, Vec<Out>)> {
    use super::super::frame::FrameKind::X224 as K;
    let (mut e, mut out) = before_client_info(rules)?;
    e.client_frame(K, &client_info()?, &mut out)
        .map_err(|e| e.to_string())?;
    Ok((e, out))
}
