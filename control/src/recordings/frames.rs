//! RDP recordings as pictures: PNG frames and video, rendered offline by `psm_rdp::Sampler`
//! (one frame per interval of recorded time; see `psm_rdp::replay`).
//!
//! PNG: `DIR/frame-000001.png`, … where frame `n` shows the screen at `n` intervals (frames of
//! the connection sequence, before the desktop exists, are left out and their numbers skipped).
//! Video: the frames piped as raw RGBA to the system `ffmpeg`, VP9 in WebM or H.264 in MP4 by
//! the file's extension, at one frame per interval; a desktop resized mid-session is drawn
//! into the first frame's size (cut or padded with black). Files are created mode 0600 (they
//! show what the session showed).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use psm_control_api::Escaped;
use psm_rdp::replay::{Direction as PduDirection, Frame, Sampler};
use psm_recorder_format::file::{Record, RecordingReader};
use psm_recorder_format::wire::rdp::RDP_PDU_CHANNEL;
use psm_recorder_format::Direction;

use super::RecordingError;

/// Feeds every PDU of `reader` to a sampler taking a frame every `every_us`; `emit` gets the
/// frames. Returns the number of PDUs that could not be rendered.
fn sample<R: Read>(
    mut reader: RecordingReader<R>,
    every_us: u64,
    emit: &mut dyn FnMut(Frame<'_>) -> Result<(), RecordingError>,
) -> Result<u64, RecordingError> {
    let mut sampler = Sampler::new(every_us);
    let mut end = 0;
    while let Some(rec) = reader.next_record()? {
        end = end.max(rec.ts_us());
        if let Record::Data {
            ts_us,
            channel: RDP_PDU_CHANNEL,
            direction,
            data,
        } = rec
        {
            let dir = match direction {
                Direction::Input => PduDirection::ClientToTarget,
                Direction::Output | Direction::Error => PduDirection::TargetToClient,
            };
            sampler.feed(ts_us, dir, &data, emit)?;
        }
    }
    sampler.finish(end, emit)?;
    Ok(sampler.errors())
}

fn no_screen(id: &str) -> RecordingError {
    RecordingError::Rdp(format!(
        "recording {} shows no desktop (the session ended before its screen was drawn)",
        Escaped(id)
    ))
}

fn create_private(path: &Path) -> Result<File, RecordingError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| RecordingError::Rdp(format!("cannot create {}: {e}", path.display())))
}

/// Writes one PNG per frame into `dir` (created, mode 0700, if missing). Returns the number of
/// frames written.
pub(crate) fn png<R: Read>(
    reader: RecordingReader<R>,
    id: &str,
    dir: &Path,
    every_us: u64,
) -> Result<u64, RecordingError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| RecordingError::Rdp(format!("cannot create {}: {e}", dir.display())))?;
    let mut written = 0u64;
    sample(reader, every_us, &mut |f| {
        let path = dir.join(format!("frame-{:06}.png", f.index));
        let mut enc = png::Encoder::new(
            BufWriter::new(create_private(&path)?),
            u32::from(f.width),
            u32::from(f.height),
        );
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let png_err = |e: png::EncodingError| {
            RecordingError::Rdp(format!("cannot write {}: {e}", path.display()))
        };
        let mut w = enc.write_header().map_err(png_err)?;
        w.write_image_data(f.rgba).map_err(png_err)?;
        w.finish().map_err(png_err)?;
        written += 1;
        Ok(())
    })?;
    if written == 0 {
        return Err(no_screen(id));
    }
    Ok(written)
}

/// Encoder arguments for `file`'s extension.
fn codec_args(file: &Path) -> Result<&'static [&'static str], RecordingError> {
    match file.extension().and_then(OsStr::to_str) {
        Some("webm") => Ok(&[
            "-c:v",
            "libvpx-vp9",
            "-b:v",
            "0",
            "-crf",
            "40",
            "-deadline",
            "realtime",
        ]),
        Some("mp4") => Ok(&[
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast",
        ]),
        _ => Err(RecordingError::Rdp(format!(
            "{}: the video file must end in .webm (VP9) or .mp4 (H.264)",
            file.display()
        ))),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A running ffmpeg reading raw frames of one size.
struct Encoder {
    child: Child,
    stdin: Option<BufWriter<ChildStdin>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    width: u16,
    height: u16,
    canvas: Vec<u8>,
}

impl Encoder {
    fn start(
        ffmpeg: &OsStr,
        file: &Path,
        every_us: u64,
        width: u16,
        height: u16,
    ) -> Result<Self, RecordingError> {
        let g = gcd(1_000_000, every_us).max(1);
        let mut child = Command::new(ffmpeg)
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "rawvideo", "-pix_fmt", "rgba"])
            .args(["-s", &format!("{width}x{height}")])
            .args(["-r", &format!("{}/{}", 1_000_000 / g, every_us / g)])
            .args(["-i", "-", "-an"])
            // yuv420p needs even sizes
            .args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
            .args(codec_args(file)?)
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    RecordingError::Rdp(
                        "ffmpeg not found: install ffmpeg or use --format png".into(),
                    )
                } else {
                    RecordingError::Rdp(format!("cannot start ffmpeg: {e}"))
                }
            })?;
        let stdin = child.stdin.take().map(BufWriter::new);
        let stderr = child.stderr.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                text
            })
        });
        Ok(Encoder {
            child,
            stdin,
            stderr,
            width,
            height,
            canvas: Vec::new(),
        })
    }

    fn frame(&mut self, f: &Frame<'_>) -> Result<(), RecordingError> {
        let pixels: &[u8] = if (f.width, f.height) == (self.width, self.height) {
            f.rgba
        } else {
            // a resized desktop, drawn into the video's size
            let (w, h) = (usize::from(self.width), usize::from(self.height));
            let fw = usize::from(f.width);
            self.canvas.clear();
            self.canvas.resize(w * h * 4, 0);
            for px in self.canvas.chunks_exact_mut(4) {
                px[3] = 0xFF;
            }
            let cols = w.min(fw) * 4;
            for y in 0..h.min(usize::from(f.height)) {
                self.canvas[y * w * 4..][..cols].copy_from_slice(&f.rgba[y * fw * 4..][..cols]);
            }
            &self.canvas
        };
        let Some(stdin) = self.stdin.as_mut() else {
            return Ok(());
        };
        if stdin.write_all(pixels).is_err() {
            // ffmpeg stopped reading: finish() reports why
            self.stdin = None;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), RecordingError> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let status = self
            .child
            .wait()
            .map_err(|e| RecordingError::Rdp(format!("ffmpeg: {e}")))?;
        let errors = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let last = errors.lines().rev().find(|l| !l.trim().is_empty());
        Err(RecordingError::Rdp(format!(
            "ffmpeg failed ({status}): {}",
            Escaped(last.unwrap_or("no message"))
        )))
    }
}

/// Encodes the frames into the video `file` with `ffmpeg` (the program to run). Returns the
/// number of frames encoded.
pub(crate) fn video<R: Read>(
    reader: RecordingReader<R>,
    id: &str,
    file: &Path,
    every_us: u64,
    ffmpeg: &OsStr,
) -> Result<u64, RecordingError> {
    codec_args(file)?;
    // ffmpeg overwrites the file in place: it keeps this mode
    drop(create_private(file)?);
    let mut encoder: Option<Encoder> = None;
    let mut frames = 0u64;
    let result = sample(reader, every_us, &mut |f| {
        if encoder.is_none() {
            encoder = Some(Encoder::start(ffmpeg, file, every_us, f.width, f.height)?);
        }
        if let Some(e) = encoder.as_mut() {
            e.frame(&f)?;
            frames += 1;
        }
        Ok(())
    });
    let finished = match encoder {
        Some(e) => e.finish(),
        None => Ok(()),
    };
    if let Err(e) = result.and(finished) {
        let _ = fs::remove_file(file);
        return Err(e);
    }
    if frames == 0 {
        let _ = fs::remove_file(file);
        return Err(no_screen(id));
    }
    Ok(frames)
}
