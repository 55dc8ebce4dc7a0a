use super::{Direction, Frame, Renderer, ReplayError, Sampler};
use crate::synth;

fn pixel(r: &Renderer, x: usize, y: usize) -> [u8; 4] {
    let (w, _, data) = r.image().expect("an image");
    let i = (y * usize::from(w) + x) * 4;
    [data[i], data[i + 1], data[i + 2], data[i + 3]]
}

fn started(width: u16, height: u16) -> Renderer {
    let mut r = Renderer::new();
    for pdu in synth::session_start(width, height).expect("encode") {
        r.feed(Direction::TargetToClient, &pdu)
            .expect("connection PDU");
    }
    r
}

#[test]
fn bitmap_update_paints_the_right_pixels() {
    let mut r = Renderer::new();
    assert!(r.image().is_none(), "no image before the Demand Active");
    let start = synth::session_start(200, 100).expect("encode");
    assert!(!r.feed(Direction::TargetToClient, &start[0]).expect("cr"));
    assert_eq!(r.io_channel(), Some(synth::IO_CHANNEL));
    assert!(!r.feed(Direction::TargetToClient, &start[1]).expect("auc"));
    assert!(
        r.feed(Direction::TargetToClient, &start[2]).expect("da"),
        "a new desktop"
    );
    let (w, h, _) = r.image().expect("image");
    assert_eq!((w, h), (200, 100));

    let red = synth::fill(10, 20, 64, 32, [255, 0, 0]).expect("encode");
    assert!(r.feed(Direction::TargetToClient, &red).expect("update"));
    assert_eq!(&pixel(&r, 15, 25)[..3], &[255, 0, 0]);
    assert_eq!(&pixel(&r, 10, 20)[..3], &[255, 0, 0]);
    assert_eq!(&pixel(&r, 73, 51)[..3], &[255, 0, 0]);
    assert_eq!(
        &pixel(&r, 74, 51)[..3],
        &[0, 0, 0],
        "right of the rectangle"
    );
    assert_eq!(&pixel(&r, 0, 0)[..3], &[0, 0, 0]);
    let blue = synth::fill(0, 0, 5, 5, [0, 0, 255]).expect("encode");
    r.feed(Direction::TargetToClient, &blue).expect("update");
    assert_eq!(&pixel(&r, 4, 4)[..3], &[0, 0, 255]);
}

#[test]
fn client_pdus_and_updates_before_activation_paint_nothing() {
    let mut r = Renderer::new();
    let red = synth::fill(0, 0, 4, 4, [255, 0, 0]).expect("encode");
    assert!(!r.feed(Direction::TargetToClient, &red).expect("ignored"));
    assert!(!r.feed(Direction::ClientToTarget, &red).expect("ignored"));
    assert!(r.image().is_none());
    let mut r = started(16, 16);
    assert!(!r
        .feed(Direction::ClientToTarget, &red)
        .expect("client side"));
    assert_eq!(&pixel(&r, 0, 0)[..3], &[0, 0, 0]);
}

#[test]
fn a_new_demand_active_resizes() {
    let mut r = started(64, 48);
    let red = synth::fill(0, 0, 8, 8, [255, 0, 0]).expect("encode");
    r.feed(Direction::TargetToClient, &red).expect("update");
    let da = synth::demand_active(32, 24).expect("encode");
    assert!(r.feed(Direction::TargetToClient, &da).expect("da"));
    let (w, h, _) = r.image().expect("image");
    assert_eq!((w, h), (32, 24));
    assert_eq!(&pixel(&r, 0, 0)[..3], &[0, 0, 0], "a fresh screen");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut r = started(16, 16);
    assert!(matches!(
        r.feed(Direction::TargetToClient, b"\x03\x00\x00\x10abc"),
        Err(ReplayError::Framing(_))
    ));
    assert!(r.feed(Direction::TargetToClient, &[]).is_err());
    let huge = synth::demand_active(60000, 60000).expect("encode");
    assert!(matches!(
        r.feed(Direction::TargetToClient, &huge),
        Err(ReplayError::TooLarge { .. })
    ));
}

#[test]
fn sampler_emits_one_frame_per_interval_and_a_last_one() {
    let mut s = Sampler::new(1_000_000);
    let mut frames: Vec<(u64, u64, u16, [u8; 4])> = Vec::new();
    let mut emit = |f: Frame<'_>| -> Result<(), ()> {
        let px = [f.rgba[0], f.rgba[1], f.rgba[2], f.rgba[3]];
        frames.push((f.index, f.ts_us, f.width, px));
        Ok(())
    };
    let mut ts = 100;
    for pdu in synth::session_start(8, 8).expect("encode") {
        s.feed(ts, Direction::TargetToClient, &pdu, &mut emit)
            .expect("feed");
        ts += 100;
    }
    // Red at 1.5 s, green at 3.2 s, end at 3.7 s.
    let red = synth::fill(0, 0, 8, 8, [255, 0, 0]).expect("encode");
    let green = synth::fill(0, 0, 8, 8, [0, 255, 0]).expect("encode");
    s.feed(1_500_000, Direction::TargetToClient, &red, &mut emit)
        .expect("feed");
    s.feed(3_200_000, Direction::TargetToClient, &green, &mut emit)
        .expect("feed");
    s.finish(3_700_000, &mut emit).expect("finish");
    assert_eq!(s.errors(), 0);
    let got: Vec<(u64, u64, [u8; 4])> = frames.iter().map(|f| (f.0, f.1, f.3)).collect();
    assert_eq!(
        got,
        vec![
            (1, 1_000_000, [0, 0, 0, 255]),
            (2, 2_000_000, [255, 0, 0, 255]),
            (3, 3_000_000, [255, 0, 0, 255]),
            (4, 3_700_000, [0, 255, 0, 255]),
        ]
    );
}

#[test]
fn sampler_skips_frames_before_the_first_image() {
    let mut s = Sampler::new(1_000_000);
    let mut indexes = Vec::new();
    let mut emit = |f: Frame<'_>| -> Result<(), ()> {
        indexes.push(f.index);
        Ok(())
    };
    let start = synth::session_start(8, 8).expect("encode");
    for pdu in &start {
        s.feed(2_500_000, Direction::TargetToClient, pdu, &mut emit)
            .expect("feed");
    }
    s.finish(4_000_000, &mut emit).expect("finish");
    assert_eq!(indexes, vec![3, 4]);
}

/// The client's Client Info as recorded: a SendDataRequest on the I/O channel.
fn client_info(compression: bool) -> Vec<u8> {
    use ironrdp_core::encode_vec;
    use ironrdp_pdu::mcs::{McsMessage, SendDataRequest};
    use ironrdp_pdu::rdp::client_info::{
        AddressFamily, ClientInfo, ClientInfoFlags, CompressionType, Credentials,
        ExtendedClientInfo, ExtendedClientOptionalInfo,
    };
    use ironrdp_pdu::rdp::headers::{BasicSecurityHeader, BasicSecurityHeaderFlags};
    use ironrdp_pdu::rdp::ClientInfoPdu;
    use ironrdp_pdu::x224::X224;
    let mut flags = ClientInfoFlags::UNICODE | ClientInfoFlags::AUTOLOGON;
    if compression {
        flags |= ClientInfoFlags::COMPRESSION;
    }
    let info = ClientInfoPdu {
        security_header: BasicSecurityHeader {
            flags: BasicSecurityHeaderFlags::INFO_PKT,
        },
        client_info: ClientInfo {
            credentials: Credentials {
                username: "psmtest".into(),
                password: String::new(),
                domain: None,
            },
            password_cookie: None,
            code_page: 0,
            flags,
            compression_type: CompressionType::Rdp61,
            alternate_shell: String::new(),
            work_dir: String::new(),
            extra_info: ExtendedClientInfo {
                address_family: AddressFamily::INET,
                address: "127.0.0.1".into(),
                dir: "C:\\".into(),
                optional_data: ExtendedClientOptionalInfo::default(),
            },
        },
    };
    encode_vec(&X224(McsMessage::SendDataRequest(SendDataRequest {
        initiator_id: synth::USER_CHANNEL,
        channel_id: synth::IO_CHANNEL,
        user_data: std::borrow::Cow::Owned(encode_vec(&info).expect("info")),
    })))
    .expect("sdr")
}

#[test]
fn the_recorded_client_info_sets_the_bulk_compression() {
    use ironrdp_pdu::rdp::client_info::CompressionType;
    for (flag, expected) in [(true, Some(CompressionType::Rdp61)), (false, None)] {
        let mut r = Renderer::new();
        let start = synth::session_start(16, 16).expect("encode");
        r.feed(Direction::TargetToClient, &start[0]).expect("cr");
        r.feed(Direction::ClientToTarget, &client_info(flag))
            .expect("client info");
        assert_eq!(r.compression, expected);
        for pdu in &start[1..] {
            r.feed(Direction::TargetToClient, pdu).expect("start");
        }
        // uncompressed updates still render with a decompressor in place
        let red = synth::fill(0, 0, 4, 4, [255, 0, 0]).expect("encode");
        assert!(r.feed(Direction::TargetToClient, &red).expect("update"));
        assert_eq!(&pixel(&r, 1, 1)[..3], &[255, 0, 0]);
    }
}
