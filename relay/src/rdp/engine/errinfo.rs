//! The Set Error Info PDU (MS-RDPBCGR 2.2.5.1.1) psm sends the client before it ends a session
//! itself, so that the client shows why ("the active session limit timer … has elapsed")
//! instead of a bare "disconnected".

use std::borrow::Cow;

use ironrdp_core::encode_vec;
use ironrdp_pdu::mcs::{McsMessage, SendDataIndication};
use ironrdp_pdu::rdp::client_info::CompressionType;
use ironrdp_pdu::rdp::headers::{
    CompressionFlags, ShareControlHeader, ShareControlPdu, ShareDataHeader, ShareDataPdu,
    StreamPriority,
};
use ironrdp_pdu::rdp::server_error_info::{
    ErrorInfo, ProtocolIndependentCode, ServerSetErrorInfoPdu,
};
use ironrdp_pdu::x224::X224;

/// Why psm ends a session, as the client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndNotice {
    /// An operator, a revoked grant, a closed window or a failed recording: "initiated by an
    /// administrative tool on the server".
    Administrative,
    /// The grant's idle timeout.
    IdleTimeout,
    /// The grant's maximum duration.
    MaxDuration,
    /// The relay is stopping.
    Shutdown,
}

impl EndNotice {
    fn code(self) -> ProtocolIndependentCode {
        match self {
            EndNotice::Administrative => ProtocolIndependentCode::RpcInitiatedDisconnect,
            EndNotice::IdleTimeout => ProtocolIndependentCode::IdleTimeout,
            EndNotice::MaxDuration => ProtocolIndependentCode::LogonTimeout,
            EndNotice::Shutdown => ProtocolIndependentCode::ServerShutdown,
        }
    }
}

/// The frame carrying the notice on the I/O channel of the share the target set up.
pub(super) fn frame(
    notice: EndNotice,
    io_channel: u16,
    server_initiator: u16,
    share_id: u32,
) -> Option<Vec<u8>> {
    let pdu = ShareControlHeader {
        share_control_pdu: ShareControlPdu::Data(ShareDataHeader {
            share_data_pdu: ShareDataPdu::ServerSetErrorInfo(ServerSetErrorInfoPdu(
                ErrorInfo::ProtocolIndependentCode(notice.code()),
            )),
            stream_priority: StreamPriority::Medium,
            compression_flags: CompressionFlags::empty(),
            compression_type: CompressionType::K8,
        }),
        pdu_source: server_initiator,
        share_id,
    };
    let user_data = encode_vec(&pdu).ok()?;
    encode_vec(&X224(McsMessage::SendDataIndication(SendDataIndication {
        initiator_id: server_initiator,
        channel_id: io_channel,
        user_data: Cow::Owned(user_data),
    })))
    .ok()
}
