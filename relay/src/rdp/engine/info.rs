//! The Client Info PDU: the client's credentials are replaced by the vaulted login; the user's
//! own password (xfreerdp sends the psm password there even after NLA) never reaches the target
//! or the recording.

use std::borrow::Cow;

use ironrdp_core::{decode, encode_vec};
use ironrdp_pdu::mcs::{McsMessage, SendDataRequest};
use ironrdp_pdu::rdp::client_info::{ClientInfoFlags, CompressionType};
use ironrdp_pdu::rdp::headers::BasicSecurityHeaderFlags;
use ironrdp_pdu::rdp::ClientInfoPdu;
use ironrdp_pdu::x224::X224;
use zeroize::Zeroize;

use super::TargetLogin;

/// Whether this io-channel payload carries the `SEC_INFO_PKT` flag (read before decoding).
pub(super) fn is_info_pkt(user_data: &[u8]) -> bool {
    user_data
        .get(..2)
        .map(|f| u16::from_le_bytes([f[0], f[1]]) & BasicSecurityHeaderFlags::INFO_PKT.bits() != 0)
        .unwrap_or(false)
}

/// The rewritten Client Info: the frame for the target and the one for the recording.
pub(super) struct Rewritten {
    /// For the target: the vaulted credentials.
    pub frame: Vec<u8>,
    /// For the recording: the same with the password emptied.
    pub record: Vec<u8>,
}

/// Rewrites the Client Info PDU carried by `initiator`/`channel_id` with `login`.
pub(super) fn rewrite(
    initiator: u16,
    channel_id: u16,
    user_data: &[u8],
    login: &TargetLogin,
) -> Result<Rewritten, String> {
    let mut pdu: ClientInfoPdu = decode(user_data).map_err(|e| format!("Client Info PDU: {e}"))?;
    if !pdu
        .security_header
        .flags
        .contains(BasicSecurityHeaderFlags::INFO_PKT)
    {
        return Err("Client Info PDU without SEC_INFO_PKT".into());
    }
    let info = &mut pdu.client_info;
    info.credentials.password.zeroize();
    if let Some(mut cookie) = info.password_cookie.take() {
        cookie.0.zeroize();
    }
    info.credentials.username.clone_from(&login.username);
    info.credentials.domain.clone_from(&login.domain);
    info.flags.set(ClientInfoFlags::AUTOLOGON, login.autologon);
    info.flags.remove(ClientInfoFlags::PASSWORD_IS_SC_PIN);
    // Uncompressed, so that recordings replay without a bulk decompressor.
    info.flags.remove(ClientInfoFlags::COMPRESSION);
    info.compression_type = CompressionType::K8;
    let record = frame(initiator, channel_id, &pdu);
    pdu.client_info.credentials.password = login.password.expose().to_owned();
    let sent = frame(initiator, channel_id, &pdu);
    pdu.client_info.credentials.password.zeroize();
    Ok(Rewritten {
        frame: sent?,
        record: record?,
    })
}

/// The MCS frame carrying `pdu`; the intermediate encoding is wiped.
fn frame(initiator: u16, channel_id: u16, pdu: &ClientInfoPdu) -> Result<Vec<u8>, String> {
    let user_data = encode_vec(pdu).map_err(|e| format!("Client Info encoding: {e}"))?;
    let x = X224(McsMessage::SendDataRequest(SendDataRequest {
        initiator_id: initiator,
        channel_id,
        user_data: Cow::Owned(user_data),
    }));
    let out = encode_vec(&x).map_err(|e| format!("Client Info encoding: {e}"));
    if let X224(McsMessage::SendDataRequest(SendDataRequest {
        user_data: Cow::Owned(mut v),
        ..
    })) = x
    {
        v.zeroize();
    }
    out
}
