//! Exports and watch of RDP recordings, on a synthetic recording: a 64x48 desktop painted red
//! at 1.5 s and blue at 2.5 s, "hello world" typed, a few events.

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;

use bytes::Bytes;
use psm_rdp::synth;
use psm_recorder_format::file::{self, Record, RecordingWriter};
use psm_recorder_format::wire::rdp::{RDP_EVENTS_CHANNEL, RDP_KEYS_CHANNEL, RDP_PDU_CHANNEL};
use psm_recorder_format::{CloseSummary, Direction, RecordingMeta};

use super::*;

fn write_rdp_recording(data_dir: &Path, id: &str) {
    let dir = DataDir::new(data_dir).recordings();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let f = File::create(file::path_for(&dir, id).expect("path")).expect("create");
    let meta = RecordingMeta {
        protocol: "rdp".into(),
        recording_id: id.into(),
        session_id: "s-rdp".into(),
        user: "alice".into(),
        target: "win01".into(),
        account: "Administrator".into(),
        source: "127.0.0.1:5000".into(),
        start_ms: 1_700_000_000_000,
    };
    let mut w = RecordingWriter::new(f, &meta).expect("writer");
    let data = |w: &mut RecordingWriter<File>, ts_us, channel, direction, bytes: Vec<u8>| {
        w.write(&Record::Data {
            ts_us,
            channel,
            direction,
            data: Bytes::from(bytes),
        })
        .expect("data");
    };
    data(
        &mut w,
        0,
        RDP_EVENTS_CHANNEL,
        Direction::Output,
        b"connect alice Administrator@win01 from 127.0.0.1:5000\n".to_vec(),
    );
    for (i, pdu) in synth::session_start(64, 48)
        .expect("pdus")
        .into_iter()
        .enumerate()
    {
        data(
            &mut w,
            10_000 * i as u64,
            RDP_PDU_CHANNEL,
            Direction::Output,
            pdu,
        );
    }
    let red = synth::fill(0, 0, 64, 48, [255, 0, 0]).expect("red");
    let blue = synth::fill(0, 0, 64, 48, [0, 0, 255]).expect("blue");
    data(&mut w, 1_500_000, RDP_PDU_CHANNEL, Direction::Output, red);
    data(
        &mut w,
        1_000_000,
        RDP_KEYS_CHANNEL,
        Direction::Input,
        b"hello".to_vec(),
    );
    data(
        &mut w,
        1_200_000,
        RDP_KEYS_CHANNEL,
        Direction::Input,
        b" world\r".to_vec(),
    );
    data(
        &mut w,
        2_000_000,
        RDP_EVENTS_CHANNEL,
        Direction::Output,
        b"channel cliprdr refused\n".to_vec(),
    );
    data(&mut w, 2_500_000, RDP_PDU_CHANNEL, Direction::Output, blue);
    data(
        &mut w,
        3_000_000,
        RDP_EVENTS_CHANNEL,
        Direction::Output,
        b"end client_closed\n".to_vec(),
    );
    w.write(&Record::Close {
        ts_us: 3_200_000,
        summary: CloseSummary {
            end_ms: 1_700_000_003_200,
            exit_status: None,
            exit_signal: None,
            reason: "client closed".into(),
        },
    })
    .expect("close");
    w.finish().expect("finish");
}

fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(File::open(path).expect("open")));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn rdp_text_export_has_typed_lines_and_events_with_times() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_rdp_recording(tmp.path(), "rdp-1");
    let mut out = Vec::new();
    export(tmp.path(), "rdp-1", ExportFormat::Text, &mut out).expect("text");
    let text = String::from_utf8(out).expect("utf8");
    assert_eq!(
        text,
        "[00:00:00.000] * connect alice Administrator@win01 from 127.0.0.1:5000\n\
         [00:00:01.000] hello world\n\
         [00:00:02.000] * channel cliprdr refused\n\
         [00:00:03.000] * end client_closed\n"
    );
    let e = export(
        tmp.path(),
        "rdp-1",
        ExportFormat::Asciicast,
        &mut Vec::new(),
    )
    .expect_err("asciicast");
    assert!(e.to_string().contains("asciicast is for SSH"), "{e}");
}

#[test]
fn rdp_watch_prints_typed_lines_and_events() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_rdp_recording(tmp.path(), "rdp-1");
    let mut out = Vec::new();
    watch(tmp.path(), "rdp-1", || false, &mut out).expect("watch");
    let text = String::from_utf8(out).expect("utf8");
    assert!(text.contains("[00:00:01.000] hello world\n"), "{text}");
    assert!(text.contains("* end client_closed"), "{text}");
    assert!(
        !text.contains('\u{3}') && !text.contains('\u{1b}'),
        "{text:?}"
    );
}

#[test]
fn png_export_writes_one_frame_per_interval() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_rdp_recording(tmp.path(), "rdp-1");
    let dir = tmp.path().join("frames");
    let n = export_frames(
        tmp.path(),
        "rdp-1",
        ExportFormat::Png,
        &dir,
        1_000_000,
        OsStr::new("ffmpeg"),
    )
    .expect("png");
    // 1 s, 2 s, 3 s and the end at 3.2 s
    assert_eq!(n, 4);
    let colour = |i: u32| {
        let (w, h, px) = decode_png(&dir.join(format!("frame-{i:06}.png")));
        assert_eq!((w, h), (64, 48));
        [px[0], px[1], px[2], px[3]]
    };
    assert_eq!(colour(1), [0, 0, 0, 255]);
    assert_eq!(colour(2), [255, 0, 0, 255]);
    assert_eq!(colour(3), [0, 0, 255, 255]);
    assert_eq!(colour(4), [0, 0, 255, 255]);
    assert!(!dir.join("frame-000005.png").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("frame-000001.png"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // png and video are for RDP recordings; text to a directory is not
    super::tests::write_timed_recording(tmp.path(), "ssh-1", 2_000_000, 1_700_000_002_000);
    let e = export_frames(
        tmp.path(),
        "ssh-1",
        ExportFormat::Png,
        &dir,
        1_000_000,
        OsStr::new("ffmpeg"),
    )
    .expect_err("ssh");
    assert!(e.to_string().contains("is an SSH session"), "{e}");
    assert!(export(tmp.path(), "rdp-1", ExportFormat::Png, &mut Vec::new()).is_err());
}

#[test]
fn video_export_needs_ffmpeg_and_a_known_extension() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_rdp_recording(tmp.path(), "rdp-1");
    let file = tmp.path().join("s.webm");
    let e = export_frames(
        tmp.path(),
        "rdp-1",
        ExportFormat::Video,
        &file,
        1_000_000,
        OsStr::new("/nonexistent/ffmpeg"),
    )
    .expect_err("no ffmpeg");
    assert_eq!(
        e.to_string(),
        "ffmpeg not found: install ffmpeg or use --format png"
    );
    assert!(!file.exists(), "no empty video left behind");
    let e = export_frames(
        tmp.path(),
        "rdp-1",
        ExportFormat::Video,
        &tmp.path().join("s.avi"),
        1_000_000,
        OsStr::new("ffmpeg"),
    )
    .expect_err("avi");
    assert!(e.to_string().contains(".webm"), "{e}");
}

/// Runs the system ffmpeg (installed by scripts/test.sh).
#[test]
fn video_export_encodes_webm_and_mp4() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_rdp_recording(tmp.path(), "rdp-1");
    for (name, magic_at, magic) in [
        ("s.webm", 0, &b"\x1a\x45\xdf\xa3"[..]),
        ("s.mp4", 4, b"ftyp"),
    ] {
        let file = tmp.path().join(name);
        let n = export_frames(
            tmp.path(),
            "rdp-1",
            ExportFormat::Video,
            &file,
            500_000,
            OsStr::new("ffmpeg"),
        )
        .expect("video");
        assert_eq!(n, 7, "0.5 s .. 3 s and the end");
        let bytes = std::fs::read(&file).expect("video file");
        assert!(bytes.len() > 100, "{name}: {} bytes", bytes.len());
        assert_eq!(&bytes[magic_at..magic_at + magic.len()], magic, "{name}");
    }
}
