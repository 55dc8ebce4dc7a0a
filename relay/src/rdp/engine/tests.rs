//! The engine against real PDUs (built with the ironrdp encoders in [`super::samples`]).

use ironrdp_cliprdr::pdu::{
    ClipboardFormat, ClipboardFormatId, ClipboardPdu, FormatDataRequest, FormatList,
};
use ironrdp_core::{decode, encode_vec};
use ironrdp_pdu::gcc::ClientEarlyCapabilityFlags;
use ironrdp_pdu::input::fast_path::{FastPathInputEvent, KeyboardFlags};
use ironrdp_pdu::mcs::{ConnectInitial, DisconnectProviderUltimatum, DisconnectReason, McsMessage};
use ironrdp_pdu::nego::SecurityProtocol;
use ironrdp_pdu::rdp::client_info::ClientInfoFlags;
use ironrdp_pdu::rdp::ClientInfoPdu;
use ironrdp_pdu::x224::{X224Data, X224};
use psm_control_api::{ClipboardRule, RdpChannels};
use psm_recorder_format::Direction;

use super::samples::{self, channel_id, channel_pdu, CHANNELS, USER_PASSWORD, VAULT_PASSWORD};
use super::{Engine, EngineError, Out, RdpEvent};
use crate::rdp::frame::FrameKind::{FastPath, X224 as X};

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn to_target(out: &[Out]) -> Vec<&Vec<u8>> {
    out.iter()
        .filter_map(|o| match o {
            Out::ToTarget(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn to_client(out: &[Out]) -> Vec<&Vec<u8>> {
    out.iter()
        .filter_map(|o| match o {
            Out::ToClient(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn records(out: &[Out], dir: Direction) -> Vec<&Vec<u8>> {
    out.iter()
        .filter_map(|o| match o {
            Out::Record { direction, pdu } if *direction == dir => Some(pdu),
            _ => None,
        })
        .collect()
}

fn events(out: &[Out]) -> Vec<&RdpEvent> {
    out.iter()
        .filter_map(|o| match o {
            Out::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn typed(out: &[Out]) -> String {
    out.iter()
        .filter_map(|o| match o {
            Out::Typed(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

/// The static-channel payload (a cliprdr message) of an MCS frame.
fn channel_message(frame: &[u8]) -> Vec<u8> {
    let X224(msg) = decode::<X224<McsMessage<'_>>>(frame).expect("MCS");
    let data = match msg {
        McsMessage::SendDataRequest(r) => r.user_data.into_owned(),
        McsMessage::SendDataIndication(i) => i.user_data.into_owned(),
        other => panic!("not channel data: {other:?}"),
    };
    data[8..].to_vec()
}

fn clip(pdu: &ClipboardPdu<'_>) -> Vec<u8> {
    channel_pdu(&encode_vec(pdu).expect("cliprdr"))
}

fn format_list() -> Vec<u8> {
    let list = FormatList::new_unicode(
        &[ClipboardFormat::new(ClipboardFormatId::CF_UNICODETEXT)],
        true,
    )
    .expect("format list");
    clip(&ClipboardPdu::FormatList(list))
}

fn data_request() -> Vec<u8> {
    clip(&ClipboardPdu::FormatDataRequest(FormatDataRequest {
        format: ClipboardFormatId::CF_UNICODETEXT,
    }))
}

#[test]
fn connect_initial_gets_target_protocol_no_gfx_and_channel_rules() {
    let mut e = Engine::new(samples::config(RdpChannels::default()));
    let mut out = Vec::new();
    let ci = samples::connect_initial(&CHANNELS, 0x407).expect("sample");
    e.client_frame(X, &ci, &mut out).expect("connect initial");

    let sent = to_target(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(records(&out, Direction::Input), sent, "recorded as relayed");
    let x: X224<X224Data<'_>> = decode(sent[0]).expect("X.224");
    let ci: ConnectInitial = decode(&x.0.data).expect("Connect Initial");
    let gcc = ci.conference_create_request.gcc_blocks();
    assert_eq!(
        gcc.core.optional_data.server_selected_protocol,
        Some(SecurityProtocol::SSL),
        "the target's choice, not the client's HYBRID toward psm"
    );
    let early = gcc
        .core
        .optional_data
        .early_capability_flags
        .expect("flags");
    assert!(!early.contains(ClientEarlyCapabilityFlags::SUPPORT_DYN_VC_GFX_PROTOCOL));
    assert!(early.contains(ClientEarlyCapabilityFlags::SUPPORT_ERR_INFO_PDU));
    assert!(gcc.multi_transport_channel.is_none(), "no UDP around psm");
    let names: Vec<_> = ci
        .channel_names()
        .expect("channels")
        .iter()
        .map(|c| c.name.as_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(
        names, CHANNELS,
        "refused channels stay listed so ids stay aligned"
    );

    let ev = events(&out);
    assert_eq!(ev[0], &RdpEvent::Keyboard { layout: 0x407 });
    let refused: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            RdpEvent::Refused {
                channel,
                what: "channel",
                ..
            } => Some(channel.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(refused, ["rdpdr", "cliprdr"], "defaults: audio only");
    assert_eq!(
        ev.last(),
        Some(&&RdpEvent::Channels {
            offered: CHANNELS.iter().map(|s| s.to_string()).collect(),
            refused: vec!["rdpdr".into(), "cliprdr".into()],
        })
    );
}

#[test]
fn client_info_carries_the_vaulted_login_and_never_the_users_password() {
    let (_, out) = samples::connected(RdpChannels::default()).expect("connected");
    let user_pw = [USER_PASSWORD.as_bytes().to_vec(), utf16(USER_PASSWORD)];
    for o in &out {
        let bytes: &[u8] = match o {
            Out::ToTarget(f) | Out::ToClient(f) => f,
            Out::Record { pdu, .. } => pdu,
            Out::Typed(t) => t.as_bytes(),
            Out::Event(e) => &format!("{e:?}").into_bytes(),
        };
        for pw in &user_pw {
            assert!(
                !contains(bytes, pw),
                "the user's password left the engine: {o:?}"
            );
        }
    }
    let info_frame = *to_target(&out).last().expect("client info sent");
    let X224(McsMessage::SendDataRequest(sdr)) =
        decode::<X224<McsMessage<'_>>>(info_frame).expect("MCS")
    else {
        panic!("not a send data request")
    };
    assert_eq!(sdr.channel_id, samples::IO_CHANNEL);
    let info: ClientInfoPdu = decode(&sdr.user_data).expect("Client Info");
    let ci = &info.client_info;
    assert_eq!(ci.credentials.username, "administrator");
    assert_eq!(ci.credentials.domain.as_deref(), Some("WIN01"));
    assert_eq!(ci.credentials.password, VAULT_PASSWORD);
    assert!(ci.flags.contains(ClientInfoFlags::AUTOLOGON));
    assert!(
        !ci.flags.contains(ClientInfoFlags::COMPRESSION),
        "recordings need no decompressor"
    );
    assert!(
        ci.flags.contains(ClientInfoFlags::UNICODE),
        "other flags kept"
    );

    let rec = *records(&out, Direction::Input).last().expect("recorded");
    assert_ne!(rec, info_frame);
    for o in &out {
        if let Out::Record { pdu, .. } = o {
            assert!(
                !contains(pdu, &utf16(VAULT_PASSWORD)),
                "vaulted password recorded"
            );
        }
    }
    let X224(McsMessage::SendDataRequest(sdr)) = decode::<X224<McsMessage<'_>>>(rec).expect("MCS")
    else {
        panic!("not a send data request")
    };
    let info: ClientInfoPdu = decode(&sdr.user_data).expect("recorded Client Info");
    assert_eq!(info.client_info.credentials.password, "");
    assert_eq!(info.client_info.credentials.username, "administrator");
}

#[test]
fn keyboard_input_becomes_typed_text_and_activity() {
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    assert!(!e.take_input_seen());
    let key = |code, up: bool| {
        FastPathInputEvent::KeyboardEvent(
            if up {
                KeyboardFlags::RELEASE
            } else {
                KeyboardFlags::empty()
            },
            code,
        )
    };
    let mut out = Vec::new();
    // "ls" then Enter, as scancodes (l = 0x26, s = 0x1f, Enter = 0x1c), then "é" as Unicode.
    let frame = samples::fast_path(vec![
        key(0x26, false),
        key(0x26, true),
        key(0x1f, false),
        key(0x1f, true),
    ])
    .expect("sample");
    e.client_frame(FastPath, &frame, &mut out).expect("input");
    assert_eq!(to_target(&out), [&frame], "input relayed unchanged");
    assert_eq!(records(&out, Direction::Input), [&frame]);
    let frame = samples::fast_path(vec![
        FastPathInputEvent::UnicodeKeyboardEvent(KeyboardFlags::empty(), 0xe9),
        FastPathInputEvent::UnicodeKeyboardEvent(KeyboardFlags::RELEASE, 0xe9),
    ])
    .expect("sample");
    e.client_frame(FastPath, &frame, &mut out).expect("input");
    assert_eq!(typed(&out), "lsé");
    assert!(e.take_input_seen());
    assert!(!e.take_input_seen(), "taken");
}

#[test]
fn slow_path_keyboard_input_is_typed_text_too() {
    use ironrdp_pdu::input::scan_code::KeyboardFlags as F;
    use ironrdp_pdu::input::{InputEvent, ScanCodePdu};
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let key = |key_code, flags| InputEvent::ScanCode(ScanCodePdu { flags, key_code });
    // Shift+a, then b.
    let f = samples::slow_path(vec![
        key(0x2a, F::empty()),
        key(0x1e, F::empty()),
        key(0x1e, F::RELEASE),
        key(0x2a, F::RELEASE),
        key(0x30, F::empty()),
    ])
    .expect("sample");
    let mut out = Vec::new();
    e.client_frame(X, &f, &mut out).expect("relayed");
    assert_eq!(to_target(&out), [&f]);
    assert_eq!(typed(&out), "Ab");
    assert!(e.take_input_seen());
}

#[test]
fn refused_channels_carry_nothing_either_way() {
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let mut out = Vec::new();
    let up = samples::send_data_request(channel_id("cliprdr"), format_list()).expect("sample");
    e.client_frame(X, &up, &mut out)
        .expect("dropped, not an error");
    let down =
        samples::send_data_indication(channel_id("rdpdr"), channel_pdu(&[0x72, 0x44, 0x6e, 0x49]))
            .expect("sample");
    e.target_frame(X, &down, &mut out)
        .expect("dropped, not an error");
    assert!(out.is_empty(), "{out:?}");
    // An allowed channel (rdpsnd: audio is on by default) passes both ways.
    let snd =
        samples::send_data_indication(channel_id("rdpsnd"), channel_pdu(&[7, 0, 4, 0, 1, 2, 3, 4]))
            .expect("sample");
    e.target_frame(X, &snd, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&snd]);
}

#[test]
fn clipboard_to_target_only() {
    let rules = RdpChannels {
        clipboard: ClipboardRule::ToTarget,
        ..RdpChannels::default()
    };
    let (mut e, _) = samples::connected(rules).expect("connected");
    let id = channel_id("cliprdr");

    // The user copies: the client's Format List reaches the target.
    let mut out = Vec::new();
    let f = samples::send_data_request(id, format_list()).expect("sample");
    e.client_frame(X, &f, &mut out).expect("relayed");
    assert_eq!(to_target(&out), [&f]);
    assert!(events(&out).is_empty());

    // The target asks for the data: allowed.
    let mut out = Vec::new();
    let f = samples::send_data_indication(id, data_request()).expect("sample");
    e.target_frame(X, &f, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&f]);

    // Something is copied on the target: its Format List never reaches the client, and the
    // target hears OK.
    let mut out = Vec::new();
    let f = samples::send_data_indication(id, format_list()).expect("sample");
    e.target_frame(X, &f, &mut out).expect("filtered");
    assert!(to_client(&out).is_empty());
    let replies = to_target(&out);
    assert_eq!(replies.len(), 1);
    let reply = channel_message(replies[0]);
    let X224(McsMessage::SendDataRequest(r)) =
        decode::<X224<McsMessage<'_>>>(replies[0]).expect("MCS")
    else {
        panic!("not a request")
    };
    assert_eq!(r.channel_id, id);
    assert_eq!(
        &r.user_data[4..8],
        &0x13u32.to_le_bytes(),
        "first, last, show protocol"
    );
    assert!(matches!(
        decode::<ClipboardPdu<'_>>(&reply).expect("cliprdr"),
        ClipboardPdu::FormatListResponse(ironrdp_cliprdr::pdu::FormatListResponse::Ok)
    ));
    assert!(matches!(
        events(&out)[..],
        [RdpEvent::Refused {
            what: "from-target",
            ..
        }]
    ));

    // The client asks for the target's data anyway: it gets a failure, the target nothing.
    let mut out = Vec::new();
    let f = samples::send_data_request(id, data_request()).expect("sample");
    e.client_frame(X, &f, &mut out).expect("filtered");
    assert!(to_target(&out).is_empty());
    let replies = to_client(&out);
    assert_eq!(replies.len(), 1);
    let reply = channel_message(replies[0]);
    let ClipboardPdu::FormatDataResponse(r) = decode::<ClipboardPdu<'_>>(&reply).expect("cliprdr")
    else {
        panic!("not a data response")
    };
    assert!(r.is_error());
    assert_eq!(events(&out).len(), 1, "one event per attempt");
}

#[test]
fn clipboard_from_target_only_drops_the_clients_copies() {
    let rules = RdpChannels {
        clipboard: ClipboardRule::FromTarget,
        ..RdpChannels::default()
    };
    let (mut e, _) = samples::connected(rules).expect("connected");
    let id = channel_id("cliprdr");
    let mut out = Vec::new();
    e.client_frame(
        X,
        &samples::send_data_request(id, format_list()).expect("sample"),
        &mut out,
    )
    .expect("filtered");
    assert!(to_target(&out).is_empty());
    assert_eq!(to_client(&out).len(), 1, "the client hears OK");
    assert!(matches!(
        events(&out)[..],
        [RdpEvent::Refused {
            what: "to-target",
            ..
        }]
    ));
    let mut out = Vec::new();
    let f = samples::send_data_indication(id, format_list()).expect("sample");
    e.target_frame(X, &f, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&f]);
    // the protocol's capabilities pass either way; a message type it does not have carries
    // nothing past the rule, either way
    let caps = samples::send_data_request(id, channel_pdu(&[7, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]))
        .expect("sample");
    let mut out = Vec::new();
    e.client_frame(X, &caps, &mut out).expect("relayed");
    assert_eq!(to_target(&out), [&caps]);
    for (from_client, frame) in [
        (
            true,
            samples::send_data_request(id, channel_pdu(&[0x42, 0, 0, 0, 4, 0, 0, 0, 1, 2, 3, 4]))
                .expect("sample"),
        ),
        (
            false,
            samples::send_data_indication(
                id,
                channel_pdu(&[0x42, 0, 0, 0, 4, 0, 0, 0, 1, 2, 3, 4]),
            )
            .expect("sample"),
        ),
    ] {
        let mut out = Vec::new();
        if from_client {
            e.client_frame(X, &frame, &mut out).expect("dropped");
        } else {
            e.target_frame(X, &frame, &mut out).expect("dropped");
        }
        assert!(
            to_target(&out).is_empty() && to_client(&out).is_empty(),
            "{from_client}"
        );
    }
}

fn device(ty: u32, id: u32, name: &[u8; 8], data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&u32::try_from(data.len()).expect("len").to_le_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn rdpdr_announces_only_allowed_devices() {
    let rules = RdpChannels {
        printer: true,
        ..RdpChannels::default()
    };
    let (mut e, out) = samples::connected(rules).expect("connected");
    assert!(
        !events(&out)
            .iter()
            .any(|e| matches!(e, RdpEvent::Refused { channel, .. } if channel == "rdpdr")),
        "rdpdr is open when a device kind is allowed"
    );
    let mut msg = vec![0x72, 0x44, 0x41, 0x44, 2, 0, 0, 0];
    msg.extend(device(8, 1, b"HOME\0\0\0\0", b"home\0"));
    msg.extend(device(4, 2, b"PRN1\0\0\0\0", &[0; 24]));
    let mut out = Vec::new();
    let f = samples::send_data_request(channel_id("rdpdr"), channel_pdu(&msg)).expect("sample");
    e.client_frame(X, &f, &mut out).expect("filtered");
    let sent = to_target(&out);
    assert_eq!(sent.len(), 1);
    let m = channel_message(sent[0]);
    assert_eq!(&m[4..8], &1u32.to_le_bytes(), "one device left");
    assert_eq!(&m[8..12], &4u32.to_le_bytes(), "the printer");
    assert_eq!(m.len(), 8 + 20 + 24);
    assert!(matches!(
        events(&out)[..],
        [RdpEvent::Refused { what: "drive", reason, .. }] if reason.contains("HOME")
    ));
    // Other rdpdr messages pass unchanged.
    let mut out = Vec::new();
    let f = samples::send_data_request(
        channel_id("rdpdr"),
        channel_pdu(&[0x72, 0x44, 0x43, 0x43, 1, 0, 12, 0]),
    )
    .expect("sample");
    e.client_frame(X, &f, &mut out).expect("relayed");
    assert_eq!(to_target(&out), [&f]);
    // the target's I/O requests reach the client for the printer (2) only: not for the
    // drive (1) psm left out, which the client still has loaded
    let io_request = |device: u32| {
        let mut m = vec![0x72, 0x44, 0x52, 0x49];
        m.extend(device.to_le_bytes());
        m.extend([0; 16]);
        samples::send_data_indication(channel_id("rdpdr"), channel_pdu(&m)).expect("sample")
    };
    let mut out = Vec::new();
    e.target_frame(X, &io_request(2), &mut out)
        .expect("relayed");
    assert_eq!(to_client(&out), [&io_request(2)]);
    let mut out = Vec::new();
    e.target_frame(X, &io_request(1), &mut out)
        .expect("dropped");
    assert!(to_client(&out).is_empty());
    assert!(matches!(
        events(&out)[..],
        [RdpEvent::Refused { what: "device", .. }]
    ));
    // printer messages pass where a printer was passed on
    let prn = samples::send_data_indication(
        channel_id("rdpdr"),
        channel_pdu(&[0x52, 0x50, 0x43, 0x50, 1, 0, 0, 0]),
    )
    .expect("sample");
    let mut out = Vec::new();
    e.target_frame(X, &prn, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&prn]);
    // the client removes its printer and a drive psm never passed on: the target hears of the
    // printer only, and its requests to it stop
    let mut remove = vec![0x72, 0x44, 0x4d, 0x44, 2, 0, 0, 0];
    remove.extend(2u32.to_le_bytes());
    remove.extend(1u32.to_le_bytes());
    let f = samples::send_data_request(channel_id("rdpdr"), channel_pdu(&remove)).expect("sample");
    let mut out = Vec::new();
    e.client_frame(X, &f, &mut out).expect("filtered");
    let sent = to_target(&out);
    assert_eq!(sent.len(), 1);
    let m = channel_message(sent[0]);
    assert_eq!(&m[4..], &[1, 0, 0, 0, 2, 0, 0, 0], "{m:02x?}");
    let mut out = Vec::new();
    e.target_frame(X, &io_request(2), &mut out)
        .expect("dropped");
    assert!(to_client(&out).is_empty());

    // where no printer was passed on, the target's printer messages do not reach the client
    let rules = RdpChannels {
        drive: true,
        ..RdpChannels::default()
    };
    let (mut e, _) = samples::connected(rules).expect("connected");
    let mut msg = vec![0x72, 0x44, 0x41, 0x44, 1, 0, 0, 0];
    msg.extend(device(4, 2, b"PRN1\0\0\0\0", &[0; 24]));
    let f = samples::send_data_request(channel_id("rdpdr"), channel_pdu(&msg)).expect("sample");
    e.client_frame(X, &f, &mut Vec::new()).expect("filtered");
    let mut out = Vec::new();
    e.target_frame(X, &prn, &mut out).expect("dropped");
    assert!(to_client(&out).is_empty());
}

#[test]
fn desktop_size_and_disconnects_are_events() {
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let mut out = Vec::new();
    let da = samples::demand_active(1280, 800).expect("sample");
    e.target_frame(X, &da, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&da]);
    assert_eq!(
        events(&out),
        [&RdpEvent::Desktop {
            width: 1280,
            height: 800
        }]
    );
    let dpu = encode_vec(&X224(McsMessage::DisconnectProviderUltimatum(
        DisconnectProviderUltimatum::from_reason(DisconnectReason::UserRequested),
    )))
    .expect("encode");
    let mut out = Vec::new();
    e.client_frame(X, &dpu, &mut out).expect("relayed");
    e.target_frame(X, &dpu, &mut out).expect("relayed");
    assert_eq!(
        events(&out),
        [
            &RdpEvent::Disconnect { by_client: true },
            &RdpEvent::Disconnect { by_client: false }
        ]
    );
}

#[test]
fn a_server_redirection_ends_the_session_at_the_target() {
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let mut pdu = vec![0x10, 0x00, 0x1a, 0x00, 0xef, 0x03];
    pdu.extend_from_slice(&[0; 10]);
    let f = samples::send_data_indication(samples::IO_CHANNEL, pdu.clone()).expect("sample");
    let mut out = Vec::new();
    let r = e.target_frame(X, &f, &mut out);
    assert!(matches!(r, Err(EngineError::Target(_))), "{r:?}");
    assert!(to_client(&out).is_empty());
    // behind another PDU in the same frame (clients read every PDU of a frame)
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let mut two = vec![0x08, 0x00, 0x17, 0x00, 0xef, 0x03, 0x00, 0x00];
    two.extend_from_slice(&pdu);
    let f = samples::send_data_indication(samples::IO_CHANNEL, two).expect("sample");
    let mut out = Vec::new();
    let r = e.target_frame(X, &f, &mut out);
    assert!(matches!(r, Err(EngineError::Target(_))), "{r:?}");
    assert!(to_client(&out).is_empty());
}

#[test]
fn x224_headers_other_than_the_one_clients_parse_are_refused() {
    let f = samples::send_data_indication(
        samples::IO_CHANNEL,
        vec![0x08, 0x00, 0x17, 0x00, 0xef, 0x03, 0, 0],
    )
    .expect("sample");
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let mut out = Vec::new();
    e.target_frame(X, &f, &mut out)
        .expect("the usual header passes");
    assert_eq!(to_client(&out), [&f]);
    // a length indicator of 4 (two bytes a client skips and psm would not), no end of
    // transmission, an unknown TPDU, a length indicator past the frame: each refused either way
    let mut longer = f[..7].to_vec();
    longer[4] = 4;
    longer.extend_from_slice(&[0x12, 0x34]);
    longer.extend_from_slice(&f[7..]);
    let len = u16::try_from(longer.len()).expect("short");
    longer[2..4].copy_from_slice(&len.to_be_bytes());
    let mut no_eot = f.clone();
    no_eot[6] = 0;
    let mut unknown = f.clone();
    unknown[5] = 0x50;
    let mut past = f[..7].to_vec();
    past[4] = 200;
    past[2..4].copy_from_slice(&7u16.to_be_bytes());
    for bad in [&longer, &no_eot, &unknown, &past] {
        let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
        let mut out = Vec::new();
        let r = e.target_frame(X, bad, &mut out);
        assert!(
            matches!(r, Err(EngineError::Target(_))),
            "{bad:02x?}: {r:?}"
        );
        assert!(to_client(&out).is_empty());
        let r = e.client_frame(X, bad, &mut out);
        assert!(
            matches!(r, Err(EngineError::Client(_))),
            "{bad:02x?}: {r:?}"
        );
        assert!(to_target(&out).is_empty());
    }
    // before the connection too
    let mut ci = samples::connect_initial(&CHANNELS, 0x409).expect("sample");
    ci[6] = 0;
    let mut e = Engine::new(samples::config(RdpChannels::default()));
    assert!(matches!(
        e.client_frame(X, &ci, &mut Vec::new()),
        Err(EngineError::Client(_))
    ));
}

#[test]
fn graphics_pass_untouched_and_recorded_once() {
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let frame = vec![0x00, 0x08, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05];
    let mut out = Vec::new();
    e.target_frame(FastPath, &frame, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&frame]);
    assert_eq!(records(&out, Direction::Output), [&frame]);
    assert_eq!(out.len(), 2);
}

#[test]
fn malformed_frames_end_the_session_naming_the_sender() {
    let ci = samples::connect_initial(&CHANNELS, 0x409).expect("sample");
    for n in 0..ci.len() {
        let mut e = Engine::new(samples::config(RdpChannels::default()));
        let r = e.client_frame(X, &ci[..n], &mut Vec::new());
        assert!(
            matches!(r, Err(EngineError::Client(_))),
            "cut at {n}: {r:?}"
        );
    }
    let mut e = Engine::new(samples::config(RdpChannels::default()));
    assert!(matches!(
        e.target_frame(
            X,
            &samples::connect_response(4).expect("sample"),
            &mut Vec::new()
        ),
        Err(EngineError::Target(_))
    ));
    let mut e = Engine::new(samples::config(RdpChannels::default()));
    e.client_frame(X, &ci, &mut Vec::new()).expect("initial");
    assert!(
        matches!(
            e.target_frame(
                X,
                &samples::connect_response(3).expect("sample"),
                &mut Vec::new()
            ),
            Err(EngineError::Target(_))
        ),
        "channel ids must match the client's list"
    );

    let info = samples::client_info().expect("sample");
    let input = samples::fast_path(vec![FastPathInputEvent::KeyboardEvent(
        KeyboardFlags::empty(),
        0x1e,
    )])
    .expect("sample");
    for n in 0..info.len() {
        let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
        let _ = e.client_frame(X, &info[..n], &mut Vec::new());
        let _ = e.client_frame(FastPath, &input[..n.min(input.len())], &mut Vec::new());
    }
    // A Client Info cut short never passes unrewritten.
    let mut e = Engine::new(samples::config(RdpChannels::default()));
    let mut out = Vec::new();
    e.client_frame(X, &ci, &mut out).expect("initial");
    e.target_frame(X, &samples::connect_response(4).expect("sample"), &mut out)
        .expect("response");
    let mut cut = info.clone();
    cut.truncate(info.len() - 30);
    cut[3] = u8::try_from(cut.len()).expect("short");
    cut[2] = 0;
    let mut out = Vec::new();
    assert!(e.client_frame(X, &cut, &mut out).is_err());
    assert!(to_target(&out).is_empty());
}

#[test]
fn a_client_info_that_does_not_decode_is_refused_not_relayed() {
    let (mut e, _) = samples::before_client_info(RdpChannels::default()).expect("set up");
    let mut bad = vec![0x40, 0x00, 0x00, 0x00];
    bad.extend_from_slice(&[0xff; 24]);
    let mut out = Vec::new();
    let r = e.client_frame(
        X,
        &samples::send_data_request(samples::IO_CHANNEL, bad).expect("sample"),
        &mut out,
    );
    assert!(matches!(r, Err(EngineError::Client(_))), "{r:?}");
    assert!(out.is_empty());
    // Nor does anything else come first on the I/O channel.
    let (mut e, _) = samples::before_client_info(RdpChannels::default()).expect("set up");
    let r = e.client_frame(
        X,
        &samples::send_data_request(samples::IO_CHANNEL, vec![0; 20]).expect("sample"),
        &mut out,
    );
    assert!(matches!(r, Err(EngineError::Client(_))), "{r:?}");
}

/// Writes the fuzz corpora `fuzz/corpus/rdp_*` from the samples (each file: a byte picking the
/// rules for the engine targets, then a byte stream of whole frames).
#[test]
#[ignore = "writes fuzz/corpus/rdp_*; run by hand with --ignored to regenerate them"]
fn write_fuzz_corpora() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let write = |dir: &str, name: &str, parts: &[Vec<u8>]| {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(name), parts.concat()).expect("write");
    };
    let key = |code, up: bool| {
        FastPathInputEvent::KeyboardEvent(
            if up {
                KeyboardFlags::RELEASE
            } else {
                KeyboardFlags::empty()
            },
            code,
        )
    };
    let keys = samples::fast_path(vec![key(0x26, false), key(0x26, true), key(0x1c, false)])
        .expect("sample");
    let ci = samples::connect_initial(&CHANNELS, 0x409).expect("sample");
    let info = samples::client_info().expect("sample");
    let cliprdr = channel_id("cliprdr");
    let rdpdr = channel_id("rdpdr");
    let dpu = encode_vec(&X224(McsMessage::DisconnectProviderUltimatum(
        DisconnectProviderUltimatum::from_reason(DisconnectReason::UserRequested),
    )))
    .expect("encode");
    let mut ts = vec![0x30, 0x81, 0x10];
    ts.extend_from_slice(&[0xa0; 16]);

    write("rdp_frame", "connect_initial", std::slice::from_ref(&ci));
    write(
        "rdp_frame",
        "fast_path_then_tpkt",
        &[keys.clone(), info.clone()],
    );
    write("rdp_frame", "ts_request", &[ts]);
    // from the start of the MCS phase (pick 0x40): the Connect Initial, the Connect Response
    write(
        "rdp_engine_client",
        "connect_initial",
        &[vec![0x40], ci.clone(), info.clone()],
    );
    write(
        "rdp_engine_target",
        "connect_response",
        &[
            vec![0x40],
            samples::connect_response(4).expect("sample"),
            samples::attach_user_confirm().expect("sample"),
        ],
    );

    let mut devices = vec![0x72, 0x44, 0x41, 0x44, 2, 0, 0, 0];
    devices.extend(device(8, 1, b"HOME\0\0\0\0", b"home\0"));
    devices.extend(device(4, 2, b"PRN1\0\0\0\0", &[0; 24]));
    write(
        "rdp_engine_client",
        "keys",
        &[vec![0x20], keys.clone(), dpu.clone()],
    );
    write(
        "rdp_engine_client",
        "client_info",
        &[vec![0x80], info, keys.clone()],
    );
    {
        use ironrdp_pdu::input::scan_code::KeyboardFlags as F;
        use ironrdp_pdu::input::{InputEvent, ScanCodePdu};
        let slow = samples::slow_path(vec![InputEvent::ScanCode(ScanCodePdu {
            flags: F::empty(),
            key_code: 0x1e,
        })])
        .expect("sample");
        write("rdp_engine_client", "slow_path_input", &[vec![0x00], slow]);
    }
    write(
        "rdp_engine_client",
        "clipboard_to_target",
        &[
            vec![0x01],
            samples::send_data_request(cliprdr, format_list()).expect("sample"),
            samples::send_data_request(cliprdr, data_request()).expect("sample"),
        ],
    );
    write(
        "rdp_engine_client",
        "rdpdr_printer",
        &[
            vec![0x08],
            samples::send_data_request(rdpdr, channel_pdu(&devices)).expect("sample"),
        ],
    );

    write(
        "rdp_engine_target",
        "demand_active",
        &[
            vec![0x20],
            samples::demand_active(1024, 768).expect("sample"),
            vec![0x00, 0x06, 0x00, 0x01, 0x02, 0x03],
            dpu,
        ],
    );
    let drdynvc = channel_id("drdynvc");
    write(
        "rdp_engine_target",
        "dynamic_channels",
        &[
            vec![0x20],
            samples::send_data_indication(drdynvc, dvc_create(3, "ECHO")).expect("sample"),
            samples::send_data_indication(drdynvc, dvc_create(4, "URBDRC")).expect("sample"),
            samples::send_data_indication(drdynvc, channel_pdu(&[0x30, 3, 1, 2, 3]))
                .expect("sample"),
        ],
    );
    write(
        "rdp_engine_target",
        "clipboard_from_target",
        &[
            vec![0x02],
            samples::send_data_indication(cliprdr, format_list()).expect("sample"),
            samples::send_data_indication(cliprdr, data_request()).expect("sample"),
        ],
    );
}

fn dvc_create(id: u8, name: &str) -> Vec<u8> {
    let mut m = vec![0x10, id];
    m.extend_from_slice(name.as_bytes());
    m.push(0);
    channel_pdu(&m)
}

#[test]
fn dynamic_channels_open_by_name() {
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    let id = channel_id("drdynvc");
    // Display control carries nothing off either machine: relayed.
    let mut out = Vec::new();
    let f =
        samples::send_data_indication(id, dvc_create(3, "Microsoft::Windows::RDS::DisplayControl"))
            .expect("sample");
    e.target_frame(X, &f, &mut out).expect("relayed");
    assert_eq!(to_client(&out).len(), 1);
    assert_eq!(channel_message(to_client(&out)[0]), channel_message(&f));
    assert!(events(&out).is_empty());
    // USB redirection: the client never hears of it, the target hears "failed".
    let mut out = Vec::new();
    let f = samples::send_data_indication(id, dvc_create(4, "URBDRC")).expect("sample");
    e.target_frame(X, &f, &mut out).expect("filtered");
    assert!(to_client(&out).is_empty());
    let reply = channel_message(to_target(&out)[0]);
    assert_eq!(reply, [0x10, 4, 0x01, 0x00, 0x00, 0xc0]);
    assert!(matches!(
        events(&out)[..],
        [RdpEvent::Refused { channel, what: "channel", .. }] if channel == "URBDRC"
    ));
    // ECHO carries whatever its two ends put in it: not without the grant
    let mut out = Vec::new();
    let f = samples::send_data_indication(id, dvc_create(5, "ECHO")).expect("sample");
    e.target_frame(X, &f, &mut out).expect("filtered");
    assert!(to_client(&out).is_empty(), "ECHO is not opened by default");
    // Data on open channels passes unchanged, both ways.
    let mut out = Vec::new();
    let data = samples::send_data_indication(id, channel_pdu(&[0x30, 3, 1, 2, 3])).expect("sample");
    e.target_frame(X, &data, &mut out).expect("relayed");
    let up = samples::send_data_request(id, channel_pdu(&[0x30, 3, 4, 5])).expect("sample");
    e.client_frame(X, &up, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&data]);
    assert_eq!(to_target(&out), [&up]);
}

#[test]
fn filtered_channels_keep_message_boundaries() {
    let rules = RdpChannels {
        clipboard: ClipboardRule::ToTarget,
        ..RdpChannels::default()
    };
    let (mut e, _) = samples::connected(rules).expect("connected");
    let id = channel_id("cliprdr");
    // A suspend chunk carries nothing: relayed.
    let mut suspend = 0u32.to_le_bytes().to_vec();
    suspend.extend_from_slice(&0x20u32.to_le_bytes());
    let f = samples::send_data_indication(id, suspend).expect("sample");
    let mut out = Vec::new();
    e.target_frame(X, &f, &mut out).expect("relayed");
    assert_eq!(to_client(&out), [&f]);
    // A target Format List in two chunks: neither reaches the client, one OK goes back.
    let list = format_list();
    let body = &list[8..];
    let (a, b) = body.split_at(5);
    let part = |flags: u32, data: &[u8]| {
        let mut v = u32::try_from(body.len())
            .expect("len")
            .to_le_bytes()
            .to_vec();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(data);
        samples::send_data_indication(id, v).expect("sample")
    };
    let mut out = Vec::new();
    e.target_frame(X, &part(0x1, a), &mut out).expect("first");
    e.target_frame(X, &part(0x2, b), &mut out).expect("last");
    assert!(to_client(&out).is_empty());
    assert_eq!(to_target(&out).len(), 1);
    assert_eq!(events(&out).len(), 1);
    // A continuation without a first chunk is malformed.
    let r = e.target_frame(X, &part(0x2, b), &mut Vec::new());
    assert!(matches!(r, Err(EngineError::Target(_))), "{r:?}");
}

#[test]
fn end_notice_is_a_set_error_info_on_the_share_the_target_set_up() {
    use ironrdp_pdu::rdp::headers::{ShareControlHeader, ShareControlPdu, ShareDataPdu};
    use ironrdp_pdu::rdp::server_error_info::{ErrorInfo, ProtocolIndependentCode};
    let (mut e, _) = samples::connected(RdpChannels::default()).expect("connected");
    // no share yet: nothing the client could place
    assert!(e.end_notice(super::EndNotice::MaxDuration).is_none());
    let mut out = Vec::new();
    e.target_frame(
        X,
        &samples::demand_active(1024, 768).expect("sample"),
        &mut out,
    )
    .expect("demand active");
    for (notice, code) in [
        (
            super::EndNotice::MaxDuration,
            ProtocolIndependentCode::LogonTimeout,
        ),
        (
            super::EndNotice::IdleTimeout,
            ProtocolIndependentCode::IdleTimeout,
        ),
        (
            super::EndNotice::Administrative,
            ProtocolIndependentCode::RpcInitiatedDisconnect,
        ),
    ] {
        let frame = e
            .end_notice(notice)
            .expect("a notice once the share is set up");
        assert!(
            matches!(crate::rdp::frame::next_frame(&frame), Ok(Some((X, n))) if n == frame.len())
        );
        let X224(McsMessage::SendDataIndication(sdi)) =
            decode::<X224<McsMessage<'_>>>(&frame).expect("MCS")
        else {
            panic!("not a Send Data Indication");
        };
        assert_eq!(sdi.channel_id, samples::IO_CHANNEL);
        let h: ShareControlHeader = decode(&sdi.user_data).expect("share control");
        assert_eq!(h.share_id, 0x1_03ea);
        let ShareControlPdu::Data(d) = h.share_control_pdu else {
            panic!("not a data PDU");
        };
        let ShareDataPdu::ServerSetErrorInfo(info) = d.share_data_pdu else {
            panic!("not a Set Error Info PDU");
        };
        assert_eq!(info.0, ErrorInfo::ProtocolIndependentCode(code));
    }
}
