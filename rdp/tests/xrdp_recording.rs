//! A real recorded RDP session renders like the live client's screen.
//!
//! `fixtures/xrdp-xlogo.psmrec` is a psm recording (protocol `rdp`) of every server PDU of an
//! xrdp 0.9 session showing xlogo on a 1024x768 desktop, captured through a relaying probe
//! with Client Info compression cleared, as psm's relay does. `fixtures/xrdp-xlogo.png` is the
//! same capture rendered by the research probe, which matched a screenshot of the live xfreerdp
//! client (docs/design/rdp-plan.md §3).

use std::fs::File;
use std::path::PathBuf;

use psm_rdp::replay::{Direction, Frame, Renderer, Sampler};
use psm_recorder_format::file::{Record, RecordingReader};
use psm_recorder_format::wire::{self, rdp::RDP_PDU_CHANNEL};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The recording's PDUs with their times and directions.
fn pdus() -> Vec<(u64, Direction, Vec<u8>)> {
    let file = File::open(fixture("xrdp-xlogo.psmrec")).expect("fixture");
    let mut reader = RecordingReader::open(file).expect("a recording");
    assert_eq!(reader.meta().protocol, wire::rdp::PROTOCOL);
    let mut out = Vec::new();
    while let Some(rec) = reader.next_record().expect("readable") {
        if let Record::Data {
            ts_us,
            channel: RDP_PDU_CHANNEL,
            direction,
            data,
        } = rec
        {
            let dir = match direction {
                wire::Direction::Input => Direction::ClientToTarget,
                _ => Direction::TargetToClient,
            };
            out.push((ts_us, dir, data.to_vec()));
        }
    }
    out
}

fn reference() -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        File::open(fixture("xrdp-xlogo.png")).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    buf.truncate(info.buffer_size());
    assert_eq!(info.color_type, png::ColorType::Rgba);
    (info.width, info.height, buf)
}

#[test]
fn recorded_xrdp_session_renders_as_the_client_saw_it() {
    let mut r = Renderer::new();
    let mut errors = 0;
    for (_, dir, pdu) in pdus() {
        if r.feed(dir, &pdu).is_err() {
            errors += 1;
        }
    }
    // Finalization PDUs (Synchronize, Control, Font Map) are the only ones ActiveStage refuses.
    assert!(errors <= 4, "{errors} PDUs not rendered");
    let (w, h, rgba) = r.image().expect("an image");
    let (rw, rh, expected) = reference();
    assert_eq!((u32::from(w), u32::from(h)), (rw, rh));
    let differing = rgba
        .chunks_exact(4)
        .zip(expected.chunks_exact(4))
        .filter(|(a, b)| a[..3] != b[..3])
        .count();
    assert_eq!(differing, 0, "pixels differ from the live client's screen");
    // Not a blank screen: the xlogo is there.
    let white = rgba
        .chunks_exact(4)
        .filter(|p| p[..3] == [255, 255, 255])
        .count();
    assert!(white > 10_000, "{white} white pixels");
}

#[test]
fn sampled_frames_end_with_the_final_screen() {
    let pdus = pdus();
    let end = pdus.last().map(|p| p.0).unwrap_or_default();
    let mut s = Sampler::new(250_000);
    let mut frames = Vec::new();
    let mut emit = |f: Frame<'_>| -> Result<(), ()> {
        frames.push((f.index, f.width, f.height, f.rgba.to_vec()));
        Ok(())
    };
    for (ts, dir, pdu) in &pdus {
        s.feed(*ts, *dir, pdu, &mut emit).expect("feed");
    }
    s.finish(end, &mut emit).expect("finish");
    assert!(frames.len() >= 2, "{} frames", frames.len());
    let last = frames.last().expect("a frame");
    assert_eq!((last.1, last.2), (1024, 768));
    let (_, _, expected) = reference();
    assert!(last
        .3
        .chunks_exact(4)
        .zip(expected.chunks_exact(4))
        .all(|(a, b)| a[..3] == b[..3]));
    let indexes: Vec<u64> = frames.iter().map(|f| f.0).collect();
    assert!(indexes.windows(2).all(|w| w[1] == w[0] + 1), "{indexes:?}");
}

/// Rebuilds the fixture from a probe capture (`u64 ts_us LE, u8 action, u32 len LE, bytes`,
/// server to client), named by `PSM_RDP_PROBE_CAPTURE`.
#[test]
#[ignore = "regenerates tests/fixtures/xrdp-xlogo.psmrec from a probe capture"]
fn regenerate_fixture() {
    let src = std::env::var("PSM_RDP_PROBE_CAPTURE").expect("PSM_RDP_PROBE_CAPTURE");
    let data = std::fs::read(src).expect("capture");
    let meta = wire::RecordingMeta {
        recording_id: "xrdp-xlogo".into(),
        session_id: "fixture".into(),
        user: "alice".into(),
        target: "xrdp".into(),
        account: "psmtest".into(),
        source: "127.0.0.1:50000".into(),
        start_ms: 1_764_788_400_000,
        protocol: wire::rdp::PROTOCOL.into(),
    };
    let out = File::create(fixture("xrdp-xlogo.psmrec")).expect("create");
    let mut w = psm_recorder_format::file::RecordingWriter::new(out, &meta).expect("writer");
    let mut i = 0;
    let mut last = 0;
    while i + 13 <= data.len() {
        let ts = u64::from_le_bytes(data[i..i + 8].try_into().expect("8"));
        let len = u32::from_le_bytes(data[i + 9..i + 13].try_into().expect("4")) as usize;
        let pdu = bytes::Bytes::copy_from_slice(&data[i + 13..i + 13 + len]);
        w.write(&Record::Data {
            ts_us: ts,
            channel: RDP_PDU_CHANNEL,
            direction: wire::Direction::Output,
            data: pdu,
        })
        .expect("write");
        last = ts;
        i += 13 + len;
    }
    w.write(&Record::Close {
        ts_us: last,
        summary: wire::CloseSummary {
            end_ms: meta.start_ms + last / 1000,
            exit_status: None,
            exit_signal: None,
            reason: "client disconnected".into(),
        },
    })
    .expect("close");
    w.finish().expect("finish");
}
