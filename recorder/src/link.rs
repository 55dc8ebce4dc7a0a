//! One relay connection: its streams, the frames that come in on it and the replies that go back.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use psm_evidence::EvidenceKey;
use psm_recorder_format::file::pack::Unpacker;
use psm_recorder_format::file::{self, Record, RecordingWriter};
use psm_recorder_format::{CloseSummary, FormatError, Frame, FrameRef, RecordingMeta, Reply};
use tracing::{debug, error, info, warn};

use crate::index::{Collector, Indexer};
use crate::recording::{Entry, Recording};
use crate::{
    now_ms, Encryption, Stats, FILE_BUFFER, FLUSH_INTERVAL, MIN_READ, REASON_DISCARDED_WITH_DATA,
    REASON_LINK_LOST, REASON_SHUTDOWN, REASON_WRITE_FAILED, RECV_BUFFER, TICK,
};

/// What a link knows about one of its streams.
pub(crate) enum Stream {
    Recording(Box<Recording>),
    /// Its frames are dropped (the recording could not be created or written).
    Dropped,
}

/// The streams of one relay connection.
pub(crate) struct Link {
    pub(crate) id: u64,
    pub(crate) dir: PathBuf,
    pub(crate) streams: HashMap<u64, Stream>,
    /// Where [`Reply`]s go (the same socket, written by this thread only).
    pub(crate) replies: UnixStream,
    /// Set when a reply could not be sent: the relay no longer hears about its streams, so the
    /// link is closed (once what the relay already sent is recorded, [`Link::hang_up`]) and
    /// the relay ends every session recorded on it (fail closed).
    pub(crate) deaf: Option<String>,
    /// Signs the trailers, encrypts the recordings when there is a recording key, counts.
    pub(crate) keys: Arc<Keys>,
    /// Where the recordings' text goes, for the search index.
    pub(crate) indexer: Indexer,
    /// Checks the relay's packed frames before they go into a recording.
    pub(crate) unpacker: Unpacker,
}

/// The keys of the recorder: the evidence key signs trailers, the recording key (if any)
/// encrypts recordings; and the counters every link adds to.
pub(crate) struct Keys {
    pub(crate) evidence: EvidenceKey,
    pub(crate) encryption: Encryption,
    pub(crate) stats: Arc<Stats>,
}

impl Link {
    pub(crate) fn new(
        id: u64,
        dir: PathBuf,
        replies: UnixStream,
        keys: Arc<Keys>,
        indexer: Indexer,
    ) -> Self {
        Link {
            id,
            dir,
            streams: HashMap::new(),
            replies,
            deaf: None,
            keys,
            indexer,
            unpacker: Unpacker::new(),
        }
    }

    pub(crate) fn reply(&mut self, reply: Reply) {
        if self.deaf.is_some() {
            return;
        }
        let mut buf = Vec::with_capacity(64);
        reply.encode(&mut buf);
        if let Err(e) = self.replies.write_all(&buf) {
            self.deaf = Some(format!("cannot answer the relay: {e}"));
        }
    }

    /// A recording stops being written: its frames are dropped from now on, the relay is told
    /// so that it ends that session, and the file is finished if it still can be.
    pub(crate) fn fail(&mut self, stream: u64, why: String) {
        let Some(Stream::Recording(r)) = self.streams.insert(stream, Stream::Dropped) else {
            return;
        };
        self.keys.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.keys.stats.ended.fetch_add(1, Ordering::Relaxed);
        let id = r.recording_id.clone();
        let ts_us = r.last_ts_us;
        let summary = CloseSummary {
            end_ms: now_ms(),
            exit_status: None,
            exit_signal: None,
            reason: format!("{REASON_WRITE_FAILED}: {why}"),
        };
        if let Err(e) = r.finish(ts_us, summary, &self.keys.evidence, false) {
            debug!(link = self.id, stream, recording_id = %id, error = %e, "failed recording cannot be finished either");
        }
        self.reply(Reply::Failed {
            stream,
            reason: why,
        });
    }

    /// Reads and handles frames until the connection ends or the recorder stops, then closes
    /// every stream still open.
    pub(crate) fn serve(self, stream: UnixStream, stop: &AtomicBool) {
        let stats = self.keys.stats.clone();
        stats.links.fetch_add(1, Ordering::Relaxed);
        self.serve_link(stream, stop);
        stats.links.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn serve_link(mut self, mut stream: UnixStream, stop: &AtomicBool) {
        let mut rx = Received::new();
        let mut next_sweep = Instant::now() + TICK;
        let reason = loop {
            if stop.load(Ordering::SeqCst) {
                break REASON_SHUTDOWN;
            }
            match rx.read(&mut stream) {
                Ok(0) => {
                    if stop.load(Ordering::SeqCst) {
                        break REASON_SHUTDOWN;
                    }
                    info!(
                        link = self.id,
                        open = self.open_count(),
                        "relay disconnected"
                    );
                    break REASON_LINK_LOST;
                }
                Ok(_) => {
                    if let Err(e) = self.take_frames(&mut rx) {
                        error!(link = self.id, error = %e, "malformed frame, dropping relay connection");
                        break REASON_LINK_LOST;
                    }
                    if self.deaf.is_some() {
                        self.hang_up(&mut stream, &mut rx);
                        break REASON_LINK_LOST;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    warn!(link = self.id, error = %e, "relay connection failed");
                    break REASON_LINK_LOST;
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.flush_due(now);
                next_sweep = now + TICK;
                if self.deaf.is_some() {
                    self.hang_up(&mut stream, &mut rx);
                    break REASON_LINK_LOST;
                }
            }
        };
        let _ = stream.shutdown(std::net::Shutdown::Both);
        self.close_all(reason);
    }

    /// Handles the complete frames `rx` holds and takes them out of it.
    fn take_frames(&mut self, rx: &mut Received) -> Result<(), FormatError> {
        let used = self.handle_frames(rx.pending())?;
        rx.consume(used);
        Ok(())
    }

    /// A reply could not be sent ([`Link::deaf`]): the link ends. What the relay sent before is
    /// recorded first, as far as it is already on the socket: a relay that died (its end
    /// closed, the usual reason a reply cannot go) sent every frame it wrote, and a read that
    /// would wait finds nothing more of it. Bounded by [`DRAIN_MAX`] bytes, against a relay
    /// that still writes but no longer reads.
    fn hang_up(&mut self, stream: &mut UnixStream, rx: &mut Received) {
        // (kept: replies to what is drained are not tried)
        let why = self.deaf.clone().unwrap_or_default();
        error!(link = self.id, error = %why, "dropping the relay connection");
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        self.drain(stream, rx);
    }

    /// Reads and handles frames from `src` until a read would wait, the end, an error, or
    /// [`DRAIN_MAX`] bytes.
    fn drain(&mut self, src: &mut impl Read, rx: &mut Received) {
        let mut left = DRAIN_MAX;
        while left > 0 {
            match rx.read(src) {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
            if let Err(e) = self.take_frames(rx) {
                error!(link = self.id, error = %e, "malformed frame after the link went deaf");
                return;
            }
        }
    }

    pub(crate) fn open_count(&self) -> usize {
        self.streams
            .values()
            .filter(|s| matches!(s, Stream::Recording(_)))
            .count()
    }

    /// Handles every complete frame at the front of `buf`; returns how many bytes they used.
    pub(crate) fn handle_frames(&mut self, buf: &[u8]) -> Result<usize, FormatError> {
        let mut used = 0;
        while let Some((frame, n)) = Frame::decode_ref(&buf[used..])? {
            used += n;
            match frame {
                FrameRef::Data {
                    stream,
                    ts_us,
                    channel,
                    direction,
                    data,
                } => self.append(
                    stream,
                    Entry::Data {
                        ts_us,
                        channel,
                        direction,
                        data,
                    },
                ),
                FrameRef::Packed {
                    stream,
                    ts_us,
                    plain_len,
                    data_len,
                    frame,
                } => self.append(
                    stream,
                    Entry::Packed {
                        ts_us,
                        plain_len,
                        data_len,
                        frame,
                    },
                ),
                FrameRef::Other(frame) => self.handle(frame),
            }
        }
        Ok(used)
    }

    pub(crate) fn handle(&mut self, frame: Frame) {
        match frame {
            Frame::Open { stream, meta } => self.open(stream, meta),
            f @ (Frame::Data { .. } | Frame::Packed { .. }) => {
                // (`handle_frames` takes these borrowed from the receive buffer; an owned one
                // goes the same way)
                let mut buf = Vec::new();
                f.encode(&mut buf);
                if let Err(e) = self.handle_frames(&buf) {
                    error!(link = self.id, error = %e, "frame does not re-encode");
                }
            }
            Frame::Resize {
                stream,
                ts_us,
                channel,
                cols,
                rows,
            } => {
                self.append(
                    stream,
                    Entry::Other(Record::Resize {
                        ts_us,
                        channel,
                        cols,
                        rows,
                    }),
                );
                // a session event: seal the chunk now
                self.flush_stream(stream);
            }
            Frame::Close {
                stream,
                ts_us,
                summary,
            } => self.close(stream, ts_us, summary),
            Frame::Discard { stream } => self.discard(stream),
        }
    }

    pub(crate) fn open(&mut self, stream: u64, meta: RecordingMeta) {
        if self.streams.contains_key(&stream) {
            error!(link = self.id, stream, recording_id = %meta.recording_id, "stream opened twice, ignoring the second open");
            return;
        }
        match self.create(&meta) {
            Ok(rec) => {
                info!(
                    link = self.id,
                    stream,
                    recording_id = %meta.recording_id,
                    session_id = %meta.session_id,
                    user = %meta.user,
                    target = %meta.target,
                    account = %meta.account,
                    "recording started"
                );
                self.streams
                    .insert(stream, Stream::Recording(Box::new(rec)));
                self.keys.stats.opened.fetch_add(1, Ordering::Relaxed);
                self.reply(Reply::Opened { stream });
            }
            Err(e) => {
                error!(link = self.id, stream, recording_id = %meta.recording_id, error = %e, "cannot create recording");
                self.streams.insert(stream, Stream::Dropped);
                self.keys.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.reply(Reply::Refused {
                    stream,
                    reason: format!("cannot create recording {}: {e}", meta.recording_id),
                });
            }
        }
    }

    pub(crate) fn create(&self, meta: &RecordingMeta) -> Result<Recording, FormatError> {
        let path = file::path_for(&self.dir, &meta.recording_id)?;
        // the trailer names the session: an id it cannot hold whole would make a genuine
        // recording fail verification
        if !file::valid_id(&meta.session_id) {
            return Err(FormatError::Malformed(format!(
                "invalid session id {:?} (expected 1 to 64 of A-Z a-z 0-9 _ -)",
                meta.session_id.chars().take(80).collect::<String>()
            )));
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    FormatError::Malformed(format!(
                        "{} already exists, not overwriting it",
                        path.display()
                    ))
                } else {
                    e.into()
                }
            })?;
        let key = self.keys.encryption.key.as_ref();
        let started =
            RecordingWriter::with_key(BufWriter::with_capacity(FILE_BUFFER, file), meta, key)
                .and_then(|mut writer| {
                    // the header is on disk from the start: the recording is listed while it runs
                    writer.flush()?;
                    Ok(writer)
                });
        let writer = match started {
            Ok(w) => w,
            Err(e) => {
                // a file without its whole header (a full disk) would only ever verify as
                // damaged: it goes, and the relay is refused
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        let mut lines = Collector::for_meta(meta);
        let indexed = key.is_none() || self.keys.encryption.index_encrypted;
        if indexed && !self.indexer.begin(meta) {
            lines.partial = true;
        }
        Ok(Recording {
            writer,
            recording_id: meta.recording_id.clone(),
            path,
            start_ms: meta.start_ms,
            last_ts_us: 0,
            dirty_since: None,
            data_bytes: 0,
            acked: 0,
            lines,
            indexer: indexed.then(|| self.indexer.clone()),
        })
    }

    pub(crate) fn append(&mut self, stream: u64, entry: Entry<'_>) {
        match self.streams.get_mut(&stream) {
            Some(Stream::Recording(r)) => match r.write(&entry, &mut self.unpacker) {
                Ok(()) => {
                    let n = entry.data_len();
                    if n > 0 {
                        self.keys.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    if let Some(bytes) = r.take_ack() {
                        self.reply(Reply::Durable { stream, bytes });
                    }
                }
                Err(e) => {
                    error!(link = self.id, stream, recording_id = %r.recording_id, error = %e, "cannot write recording");
                    let why = format!("cannot write recording {}: {e}", r.recording_id);
                    self.fail(stream, why);
                }
            },
            Some(Stream::Dropped) => {}
            None => {
                warn!(
                    link = self.id,
                    stream, "frame for a stream that was never opened, dropping its frames"
                );
                self.streams.insert(stream, Stream::Dropped);
            }
        }
    }

    pub(crate) fn close(&mut self, stream: u64, ts_us: u64, summary: CloseSummary) {
        match self.streams.remove(&stream) {
            Some(Stream::Recording(r)) => {
                self.keys.stats.ended.fetch_add(1, Ordering::Relaxed);
                let id = r.recording_id.clone();
                let bytes = r.data_bytes;
                match r.finish(ts_us, summary, &self.keys.evidence, true) {
                    // the session's last bytes are in the finished file
                    Ok(()) => self.reply(Reply::Durable { stream, bytes }),
                    Err(e) => {
                        error!(link = self.id, stream, recording_id = %id, error = %e, "cannot finish recording");
                        // the relay's end-of-session record must not look clean
                        self.keys.stats.failed.fetch_add(1, Ordering::Relaxed);
                        self.reply(Reply::Failed {
                            stream,
                            reason: format!("cannot finish recording {id}: {e}"),
                        });
                    }
                }
            }
            Some(Stream::Dropped) => debug!(link = self.id, stream, "dropped stream closed"),
            None => warn!(
                link = self.id,
                stream, "close for a stream that was never opened"
            ),
        }
    }

    /// Removes the recording of a session that never started (it holds only its header). One
    /// that holds session data is evidence, whatever the relay says: it is finished instead,
    /// marked as closed by the recorder.
    pub(crate) fn discard(&mut self, stream: u64) {
        match self.streams.remove(&stream) {
            Some(Stream::Recording(r)) if r.data_bytes > 0 => {
                self.keys.stats.ended.fetch_add(1, Ordering::Relaxed);
                let (id, bytes, ts_us) = (r.recording_id.clone(), r.data_bytes, r.last_ts_us);
                warn!(link = self.id, stream, recording_id = %id, bytes, "discard for a recording that holds session data: kept and finished");
                let summary = CloseSummary {
                    end_ms: now_ms(),
                    exit_status: None,
                    exit_signal: None,
                    reason: REASON_DISCARDED_WITH_DATA.to_string(),
                };
                if let Err(e) = r.finish(ts_us, summary, &self.keys.evidence, false) {
                    error!(link = self.id, stream, recording_id = %id, error = %e, "cannot finish recording");
                }
            }
            Some(Stream::Recording(r)) => {
                self.keys.stats.ended.fetch_add(1, Ordering::Relaxed);
                let Recording {
                    writer,
                    recording_id,
                    path,
                    ..
                } = *r;
                drop(writer);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        info!(link = self.id, stream, %recording_id, "recording discarded: the session never started")
                    }
                    Err(e) => {
                        warn!(link = self.id, stream, %recording_id, error = %e, "cannot remove discarded recording")
                    }
                }
            }
            Some(Stream::Dropped) => {}
            None => warn!(
                link = self.id,
                stream, "discard for a stream that was never opened"
            ),
        }
    }

    /// Flushes one recording now (after a session event).
    pub(crate) fn flush_stream(&mut self, stream: u64) {
        let Some(Stream::Recording(r)) = self.streams.get_mut(&stream) else {
            return;
        };
        match r.flush() {
            Ok(()) => {
                if let Some(bytes) = r.take_ack() {
                    self.reply(Reply::Durable { stream, bytes });
                }
            }
            Err(e) => {
                error!(link = self.id, stream, recording_id = %r.recording_id, error = %e, "cannot flush recording");
                let why = format!("cannot flush recording {}: {e}", r.recording_id);
                self.fail(stream, why);
            }
        }
    }

    /// Flushes the recordings whose oldest unflushed data is about to be `FLUSH_INTERVAL` old.
    pub(crate) fn flush_due(&mut self, now: Instant) {
        let due = FLUSH_INTERVAL.saturating_sub(TICK);
        let mut failed = Vec::new();
        let mut acks = Vec::new();
        for (stream, s) in &mut self.streams {
            if let Stream::Recording(r) = s {
                if r.dirty_since.is_some_and(|t| now.duration_since(t) >= due) {
                    match r.flush() {
                        Ok(()) => acks.extend(r.take_ack().map(|bytes| (*stream, bytes))),
                        Err(e) => {
                            error!(link = self.id, stream, recording_id = %r.recording_id, error = %e, "cannot flush recording");
                            failed.push((
                                *stream,
                                format!("cannot flush recording {}: {e}", r.recording_id),
                            ));
                        }
                    }
                }
            }
        }
        for (stream, bytes) in acks {
            self.reply(Reply::Durable { stream, bytes });
        }
        for (stream, why) in failed {
            self.fail(stream, why);
        }
    }

    /// Closes every recording still open, with `reason`.
    pub(crate) fn close_all(&mut self, reason: &str) {
        let end_ms = now_ms();
        for (stream, s) in self.streams.drain() {
            let Stream::Recording(r) = s else { continue };
            self.keys.stats.ended.fetch_add(1, Ordering::Relaxed);
            let ts_us = r
                .last_ts_us
                .max(end_ms.saturating_sub(r.start_ms).saturating_mul(1000));
            let id = r.recording_id.clone();
            let summary = CloseSummary {
                end_ms,
                exit_status: None,
                exit_signal: None,
                reason: reason.to_string(),
            };
            if let Err(e) = r.finish(ts_us, summary, &self.keys.evidence, false) {
                error!(link = self.id, stream, recording_id = %id, error = %e, "cannot finish recording");
            }
        }
    }
}

/// Bytes a link reads after a reply failed, at most ([`Link::hang_up`]): more than a relay
/// can have queued on the socket (its send and the recorder's receive buffers).
const DRAIN_MAX: usize = RECV_BUFFER;

/// A link's receive buffer: `buf[start..end]` is read and not yet handled (the front of a
/// frame still coming).
struct Received {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Received {
    fn new() -> Self {
        Received {
            buf: vec![0u8; RECV_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// One read from `stream` behind what is pending; the bytes read (0: end of stream).
    fn read(&mut self, stream: &mut impl Read) -> io::Result<usize> {
        let n = stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// `used` bytes at the front were handled. The rest (a frame cut short) moves to the front
    /// when the room behind it is short of [`MIN_READ`], so a read always has room: the buffer
    /// holds a largest frame twice.
    fn consume(&mut self, used: usize) {
        self.start += used;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MIN_READ {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use psm_recorder_format::file::RecordingReader;
    use psm_recorder_format::Direction;

    fn link(dir: &std::path::Path, replies: UnixStream) -> Link {
        let keys = Arc::new(Keys {
            evidence: EvidenceKey::generate().expect("evidence key").0,
            encryption: Encryption::default(),
            stats: Arc::new(Stats::default()),
        });
        let indexer = Indexer::start(dir).expect("indexer");
        Link::new(1, dir.to_path_buf(), replies, keys, indexer)
    }

    /// A link in `dir` whose replies go to a relay that is gone: its first reply fails.
    fn deaf_link(dir: &std::path::Path) -> Link {
        let (replies, gone) = UnixStream::pair().expect("pair");
        drop(gone);
        link(dir, replies)
    }

    fn meta(id: &str) -> RecordingMeta {
        RecordingMeta {
            protocol: String::new(),
            recording_id: id.into(),
            session_id: format!("session-{id}"),
            user: "alice".into(),
            target: "db1".into(),
            account: "root".into(),
            source: "192.0.2.7:40000".into(),
            start_ms: 1_700_000_000_000,
        }
    }

    fn output(path: &std::path::Path) -> (Vec<u8>, String) {
        let f = fs::File::open(path).expect("recording");
        let mut reader = RecordingReader::open(f).expect("open");
        let (mut out, mut reason) = (Vec::new(), String::new());
        while let Some(r) = reader.next_record().expect("record") {
            match r {
                Record::Data { data, .. } => out.extend_from_slice(&data),
                Record::Close { summary, .. } => reason = summary.reason,
                _ => {}
            }
        }
        (out, reason)
    }

    /// The relay sent a session's opening and its bytes, then died; the recorder read the
    /// opening and only the front of the bytes before its answer to the opening found the
    /// relay gone. The rest, already on the socket, is still recorded (a flake of
    /// `dropped_connection_closes_its_streams` in CI: the recording held no output).
    #[test]
    fn a_relay_gone_before_its_answer_keeps_what_it_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut link = deaf_link(dir.path());
        let (mut relay, mut recorder) = UnixStream::pair().expect("pair");
        relay
            .set_write_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut wire = Vec::new();
        Frame::Open {
            stream: 9,
            meta: meta("gone"),
        }
        .encode(&mut wire);
        let opened = wire.len();
        Frame::Data {
            stream: 9,
            ts_us: 1_000,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from(bytes.clone()),
        }
        .encode(&mut wire);

        // the loop's first read: the opening and the front of the bytes
        let cut = opened + 5_000;
        relay.write_all(&wire[..cut]).expect("front");
        let mut rx = Received::new();
        assert_eq!(rx.read(&mut recorder).expect("read"), cut);
        link.take_frames(&mut rx).expect("frames");
        assert!(link.deaf.is_some(), "the answer to the opening failed");
        // the rest was sent before the relay died
        relay.write_all(&wire[cut..]).expect("rest");
        drop(relay);

        link.hang_up(&mut recorder, &mut rx);
        link.close_all(REASON_LINK_LOST);
        let (out, reason) = output(&file::path_for(dir.path(), "gone").expect("path"));
        assert_eq!(out, bytes);
        assert_eq!(reason, REASON_LINK_LOST);
    }

    /// A relay alive but no longer reading is not waited for: the drain stops at the first
    /// read that would wait (and, [`a_drain_is_bounded`], after [`DRAIN_MAX`] bytes of one
    /// that never stops writing).
    #[test]
    fn a_deaf_link_reads_only_what_is_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut link = deaf_link(dir.path());
        let (mut relay, mut recorder) = UnixStream::pair().expect("pair");
        relay
            .set_write_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut wire = Vec::new();
        Frame::Open {
            stream: 3,
            meta: meta("deaf"),
        }
        .encode(&mut wire);
        relay.write_all(&wire).expect("open");
        let mut rx = Received::new();
        rx.read(&mut recorder).expect("read");
        link.take_frames(&mut rx).expect("frames");
        assert!(link.deaf.is_some());
        // the relay is alive and sends nothing more: the drain returns at once (a read that
        // waited would take the 30 s the socket allows it)
        recorder
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("timeout");
        let started = Instant::now();
        link.hang_up(&mut recorder, &mut rx);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));

        link.close_all(REASON_LINK_LOST);
        let (out, reason) = output(&file::path_for(dir.path(), "deaf").expect("path"));
        assert!(out.is_empty());
        assert_eq!(reason, REASON_LINK_LOST);
    }

    /// Frames of stream 3 without end, as a relay that never stops writing would send them.
    struct Endless {
        frame: Vec<u8>,
        at: usize,
        served: usize,
    }

    impl Read for Endless {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(self.frame.len() - self.at);
            out[..n].copy_from_slice(&self.frame[self.at..self.at + n]);
            self.at = (self.at + n) % self.frame.len();
            self.served += n;
            Ok(n)
        }
    }

    /// The drain of a deaf link stops after [`DRAIN_MAX`] bytes of a relay that writes on.
    #[test]
    fn a_drain_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut link = deaf_link(dir.path());
        let mut wire = Vec::new();
        Frame::Open {
            stream: 3,
            meta: meta("endless"),
        }
        .encode(&mut wire);
        let mut rx = Received::new();
        link.handle_frames(&wire).expect("open");
        assert!(link.deaf.is_some());
        let mut frame = Vec::new();
        Frame::Data {
            stream: 3,
            ts_us: 5,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from(vec![b'x'; 64 * 1024]),
        }
        .encode(&mut frame);
        let mut endless = Endless {
            frame,
            at: 0,
            served: 0,
        };
        link.drain(&mut endless, &mut rx);
        assert!(
            endless.served >= DRAIN_MAX && endless.served < DRAIN_MAX + RECV_BUFFER,
            "read {} bytes",
            endless.served
        );
        link.close_all(REASON_LINK_LOST);
        let (out, _) = output(&file::path_for(dir.path(), "endless").expect("path"));
        assert!(!out.is_empty() && out.len() <= DRAIN_MAX, "{}", out.len());
    }
}
