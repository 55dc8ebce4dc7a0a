//! The asciicast v2 rendering ([`asciicast`]): a JSON header, then one JSON line per event,
//! with the control characters JSON would leave raw written as `\u` escapes.

use std::io::{BufWriter, Read, Write};

use serde::Serialize;

use super::{is_screen, Decoders, PIECE};
use crate::file::{Record, RecordingReader};
use crate::sanitize::is_bidi_control;
use crate::{Direction, FormatError};

/// Terminal size assumed when a recording has no resize record, or when the pty was requested
/// without a size (0x0: `ssh -tt` with no terminal on its standard input).
const DEFAULT_SIZE: (u32, u32) = (80, 24);
/// `TERM` written in the asciicast header (the relay does not record the client's).
pub(super) const DEFAULT_TERM: &str = "xterm-256color";
/// How many DATA bytes [`asciicast`] holds back while looking for the first resize.
const LOOKAHEAD_BYTES: usize = 1024 * 1024;

#[derive(Serialize)]
struct CastHeader<'a> {
    version: u8,
    width: u32,
    height: u32,
    timestamp: u64,
    title: String,
    env: CastEnv<'a>,
}

#[derive(Serialize)]
struct CastEnv<'a> {
    #[serde(rename = "TERM")]
    term: &'a str,
}

fn json_err(e: serde_json::Error) -> FormatError {
    FormatError::Io(e.into())
}

/// Whether the asciicast writes `c` as a `\u` escape although JSON allows it raw.
fn cast_escapes(c: char) -> bool {
    ('\u{7f}'..='\u{9f}').contains(&c) || is_bidi_control(c)
}

/// serde_json's compact output, with [`cast_escapes`] characters written as `\u00XX`.
struct CastFormatter;

impl serde_json::ser::Formatter for CastFormatter {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> std::io::Result<()>
    where
        W: ?Sized + Write,
    {
        let mut last = 0;
        for (i, c) in fragment.char_indices() {
            if cast_escapes(c) {
                writer.write_all(&fragment.as_bytes()[last..i])?;
                // all of them are in the BMP: four hex digits
                write!(writer, "\\u{:04x}", c as u32)?;
                last = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[last..])
    }
}

/// Writes `value` as JSON with [`CastFormatter`].
fn cast_json<T: Serialize + ?Sized>(out: &mut impl Write, value: &T) -> Result<(), FormatError> {
    let mut ser = serde_json::Serializer::with_formatter(out, CastFormatter);
    value.serialize(&mut ser).map_err(json_err)
}

/// Writes one `[time, "code", "text"]` line.
fn cast_event(out: &mut impl Write, ts_us: u64, code: &str, text: &str) -> Result<(), FormatError> {
    write!(
        out,
        "[{}.{:06}, \"{code}\", ",
        ts_us / 1_000_000,
        ts_us % 1_000_000
    )?;
    cast_json(out, text)?;
    out.write_all(b"]\n")?;
    Ok(())
}

/// The size a resize record gives a terminal: 80x24 when a side is 0 (a pty requested without a
/// size), as no player can show a 0-column terminal.
fn usable_size(cols: u32, rows: u32) -> (u32, u32) {
    if cols == 0 || rows == 0 {
        DEFAULT_SIZE
    } else {
        (cols, rows)
    }
}

/// Writes the recording as an asciicast v2 file.
///
/// Width and height come from the first resize record, the size the pty was requested with
/// (80x24 without one, or when it was requested as 0x0); later resizes become `r` events
/// (those without a size are left out), output and error `o` events, input `i` events. A
/// DATA record longer than 64 KiB becomes several events with its timestamp.
pub fn asciicast<R: Read>(
    mut reader: RecordingReader<R>,
    out: impl Write,
) -> Result<(), FormatError> {
    let mut out = BufWriter::new(out);
    // Hold records back until the first resize tells the terminal size.
    let mut held = Vec::new();
    let mut held_bytes = 0usize;
    let mut size = None;
    while size.is_none() && held_bytes <= LOOKAHEAD_BYTES {
        let Some(rec) = reader.next_record()? else {
            break;
        };
        match &rec {
            Record::Resize { cols, rows, .. } => size = Some(usable_size(*cols, *rows)),
            // each record counts its size in memory too: a file of empty records ends the
            // lookahead as one of large ones does
            Record::Data { data, .. } => {
                held_bytes += data.len() + std::mem::size_of::<Record>();
            }
            Record::Close { .. } => held_bytes += std::mem::size_of::<Record>(),
        }
        held.push(rec);
    }
    let (width, height) = size.unwrap_or(DEFAULT_SIZE);
    let meta = reader.meta();
    let header = CastHeader {
        version: 2,
        width,
        height,
        timestamp: meta.start_ms / 1000,
        title: format!("{}@{}@{}", meta.user, meta.account, meta.target),
        env: CastEnv { term: DEFAULT_TERM },
    };
    cast_json(&mut out, &header)?;
    out.write_all(b"\n")?;

    let mut decoders = Decoders::default();
    let mut text = String::new();
    let mut first_resize = size.is_some();
    let mut last_ts = 0;
    let mut emit = |rec: Record, out: &mut BufWriter<_>| -> Result<(), FormatError> {
        last_ts = last_ts.max(rec.ts_us());
        match rec {
            Record::Data {
                ts_us,
                channel,
                direction,
                data,
            } => {
                let code = if is_screen(direction) { "o" } else { "i" };
                for piece in data.chunks(PIECE) {
                    decoders.decode(channel, direction, piece, &mut text);
                    if !text.is_empty() {
                        cast_event(out, ts_us, code, &text)?;
                    }
                }
            }
            Record::Resize {
                ts_us, cols, rows, ..
            } => {
                if first_resize {
                    // it is the header's size
                    first_resize = false;
                } else if cols != 0 && rows != 0 {
                    cast_event(out, ts_us, "r", &format!("{cols}x{rows}"))?;
                }
            }
            Record::Close { .. } => {}
        }
        Ok(())
    };
    for rec in held {
        emit(rec, &mut out)?;
    }
    while let Some(rec) = reader.next_record()? {
        emit(rec, &mut out)?;
    }
    let mut tails: Vec<_> = decoders.0.into_iter().collect();
    tails.sort_by_key(|(key, _)| *key);
    for ((_, direction), mut stream) in tails {
        let mut text = String::new();
        stream.finish(&mut text);
        if !text.is_empty() {
            let code = if direction == Direction::Input as u8 {
                "i"
            } else {
                "o"
            };
            cast_event(&mut out, last_ts, code, &text)?;
        }
    }
    out.flush()?;
    Ok(())
}
