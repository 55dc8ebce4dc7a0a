//! One recording being written: its file, what it has told the relay is durable, and its text
//! for the search index.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::time::Instant;

use psm_evidence::EvidenceKey;
use psm_recorder_format::file::pack::Unpacker;
use psm_recorder_format::file::{Record, RecordingWriter};
use psm_recorder_format::{CloseSummary, Direction, FormatError};
use tracing::info;

use crate::index::{Collector, Indexer};
use crate::FLUSH_BYTES;

/// One recording being written.
pub(crate) struct Recording {
    pub(crate) writer: RecordingWriter<BufWriter<File>>,
    pub(crate) recording_id: String,
    pub(crate) path: PathBuf,
    pub(crate) start_ms: u64,
    pub(crate) last_ts_us: u64,
    /// When data was first written since the last flush.
    pub(crate) dirty_since: Option<Instant>,
    /// DATA payload bytes written so far.
    pub(crate) data_bytes: u64,
    /// DATA payload bytes the relay was last told are durable.
    pub(crate) acked: u64,
    /// The lines of text seen so far, for the search index.
    pub(crate) lines: Collector,
    /// Where they go at each flush; `None` when the recording is not indexed (encrypted).
    pub(crate) indexer: Option<Indexer>,
}

/// A record to append: DATA borrowed from the link's receive buffer (written without a copy),
/// DATA records the relay packed (their zstd frame, borrowed likewise), or any other record.
pub(crate) enum Entry<'a> {
    Data {
        ts_us: u64,
        channel: u32,
        direction: Direction,
        data: &'a [u8],
    },
    Packed {
        ts_us: u64,
        plain_len: u32,
        data_len: u64,
        frame: &'a [u8],
    },
    Other(Record),
}

impl Entry<'_> {
    /// DATA bytes it carries.
    pub(crate) fn data_len(&self) -> usize {
        match self {
            Entry::Data { data, .. } => data.len(),
            Entry::Packed { data_len, .. } => usize::try_from(*data_len).unwrap_or(usize::MAX),
            Entry::Other(_) => 0,
        }
    }
}

impl Recording {
    /// Appends `entry`; a packed one is checked with `unpacker` first (refused whole when it is
    /// not what it claims, nothing of it written).
    pub(crate) fn write(
        &mut self,
        entry: &Entry<'_>,
        unpacker: &mut Unpacker,
    ) -> Result<(), FormatError> {
        match *entry {
            Entry::Data {
                ts_us,
                channel,
                direction,
                data,
            } => {
                self.last_ts_us = self.last_ts_us.max(ts_us);
                self.writer.write_data(ts_us, channel, direction, data)?;
                self.data_bytes += data.len() as u64;
                if self.indexer.is_some() {
                    self.lines.feed(ts_us, channel, direction, data);
                }
            }
            Entry::Packed {
                ts_us,
                plain_len,
                data_len,
                frame,
            } => {
                // binary payloads only (the relay packs what the index would skip): nothing for
                // the search index
                let checked = unpacker.check(plain_len, data_len, ts_us, frame)?;
                self.writer.append_packed(checked)?;
                self.last_ts_us = self.last_ts_us.max(ts_us);
                // (at most PACK_MAX a frame: checked)
                self.data_bytes = self.data_bytes.saturating_add(data_len);
            }
            Entry::Other(ref rec) => {
                self.last_ts_us = self.last_ts_us.max(rec.ts_us());
                self.writer.write(rec)?;
                if self.indexer.is_some() {
                    self.lines.record(rec);
                }
            }
        }
        if self.writer.pending_bytes() >= FLUSH_BYTES {
            self.flush()?;
        } else if self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<(), FormatError> {
        self.dirty_since = None;
        self.writer.flush()?;
        if let Some(indexer) = &self.indexer {
            indexer.batch(&self.recording_id, &mut self.lines);
        }
        Ok(())
    }

    /// The durable count to report, when it moved since the last report (call after a flush
    /// that succeeded: everything written before it is in flushed chunks).
    pub(crate) fn take_ack(&mut self) -> Option<u64> {
        if self.dirty_since.is_none()
            && self.writer.pending_bytes() == 0
            && self.data_bytes > self.acked
        {
            self.acked = self.data_bytes;
            Some(self.acked)
        } else {
            None
        }
    }

    /// Writes the CLOSE record, seals the last chunk, writes the trailer signed with `key`,
    /// and fsyncs the file. `complete`: `summary` is the session's own end (a CLOSE frame from
    /// the relay), not one the recorder made up.
    pub(crate) fn finish(
        self,
        ts_us: u64,
        summary: CloseSummary,
        key: &EvidenceKey,
        complete: bool,
    ) -> Result<(), FormatError> {
        let Recording {
            mut writer,
            recording_id,
            path,
            mut lines,
            indexer,
            ..
        } = self;
        if let Some(indexer) = indexer {
            lines.finish();
            indexer.batch(&recording_id, &mut lines);
        }
        let reason = summary.reason.clone();
        writer.write(&Record::Close { ts_us, summary })?;
        let file = writer
            .finish_signed(key, complete)?
            .into_inner()
            .map_err(|e| FormatError::Io(e.into_error()))?;
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            // make the directory entry durable too
            File::open(dir)?.sync_all()?;
        }
        info!(%recording_id, %reason, "recording finished");
        Ok(())
    }
}
