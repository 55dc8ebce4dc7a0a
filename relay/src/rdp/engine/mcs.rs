//! MCS Connect Initial (client) and Connect Response (target): the GCC blocks psm rewrites or
//! learns from.

use std::borrow::Cow;

use ironrdp_core::{decode, encode_vec};
use ironrdp_pdu::gcc::{ClientEarlyCapabilityFlags, ConferenceCreateRequest};
use ironrdp_pdu::mcs::{ConnectInitial, ConnectResponse};
use ironrdp_pdu::nego::SecurityProtocol;
use ironrdp_pdu::x224::{X224Data, X224};

/// What the client's Connect Initial said, and its rewritten form.
#[derive(Debug)]
pub(super) struct Initial {
    /// The frame for the target.
    pub frame: Vec<u8>,
    /// The client's keyboard layout.
    pub keyboard_layout: u32,
    /// Static channel names in the client's order (lossy text; peers choose them).
    pub channels: Vec<String>,
}

/// Decodes the client's MCS Connect Initial, writes the target's selected protocol into it and
/// turns off the graphics pipeline (EGFX), so that recordings replay without H.264, and the UDP
/// multitransport, so that nothing bypasses the relayed TCP connection.
pub(super) fn rewrite_connect_initial(
    frame: &[u8],
    target_protocol: SecurityProtocol,
) -> Result<Initial, String> {
    let x: X224<X224Data<'_>> =
        decode(frame).map_err(|e| format!("MCS Connect Initial expected: {e}"))?;
    let mut ci: ConnectInitial =
        decode(&x.0.data).map_err(|e| format!("MCS Connect Initial: {e}"))?;
    let mut gcc = ci.conference_create_request.into_gcc_blocks();
    gcc.core.optional_data.server_selected_protocol = Some(target_protocol);
    if let Some(f) = gcc.core.optional_data.early_capability_flags.as_mut() {
        f.remove(ClientEarlyCapabilityFlags::SUPPORT_DYN_VC_GFX_PROTOCOL);
    }
    // No UDP side transport: everything goes through psm's TCP leg.
    gcc.multi_transport_channel = None;
    let keyboard_layout = gcc.core.keyboard_layout;
    let channels = gcc
        .network
        .as_ref()
        .map(|n| {
            n.channels
                .iter()
                .map(|c| channel_name(c.name.as_bytes()))
                .collect()
        })
        .unwrap_or_default();
    ci.conference_create_request = ConferenceCreateRequest::new(gcc)
        .map_err(|e| format!("MCS Connect Initial re-encoding: {e}"))?;
    let inner = encode_vec(&ci).map_err(|e| format!("MCS Connect Initial re-encoding: {e}"))?;
    let frame = encode_vec(&X224(X224Data {
        data: Cow::Owned(inner),
    }))
    .map_err(|e| format!("MCS Connect Initial re-encoding: {e}"))?;
    Ok(Initial {
        frame,
        keyboard_layout,
        channels,
    })
}

/// A channel name as text: the bytes up to the first NUL, non-ASCII replaced.
pub(super) fn channel_name(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    raw[..end]
        .iter()
        .map(|&b| {
            if b.is_ascii() {
                char::from(b)
            } else {
                '\u{fffd}'
            }
        })
        .collect()
}

/// What the target's Connect Response assigned.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Response {
    /// Channel ids, in the order of the client's list.
    pub channel_ids: Vec<u16>,
    /// The I/O channel.
    pub io_channel: u16,
}

/// Decodes the target's MCS Connect Response.
pub(super) fn connect_response(frame: &[u8]) -> Result<Response, String> {
    let x: X224<X224Data<'_>> =
        decode(frame).map_err(|e| format!("MCS Connect Response expected: {e}"))?;
    let cr: ConnectResponse =
        decode(&x.0.data).map_err(|e| format!("MCS Connect Response: {e}"))?;
    Ok(Response {
        channel_ids: cr.channel_ids(),
        io_channel: cr.global_channel_id(),
    })
}
