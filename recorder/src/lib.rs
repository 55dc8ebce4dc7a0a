//! psm-recorder: the daemon that writes session recordings to disk.
//!
//! It listens on `recorder.sock` in the data directory, where relays connect and send
//! [`Frame`]s (see [`psm_recorder_format::wire`]). Only processes of the uid that owns the data
//! directory may connect (checked with `SO_PEERCRED`), so nobody else can forge a recording.
//! Each stream a relay opens becomes one file `recordings/<recording_id>.psmrec`
//! ([`psm_recorder_format::file`]): OPEN creates it (never over an existing one) and is answered
//! with [`Reply::Opened`], or [`Reply::Refused`] when the file cannot be created; DATA and RESIZE
//! append, CLOSE ends and fsyncs it, DISCARD removes a recording whose session never started.
//! When a recording cannot be written any more (disk full, I/O error) the recorder answers
//! [`Reply::Failed`] for that stream and drops its frames: the relay ends that one session, the
//! link and its other sessions go on. Open files are flushed (a sealed chunk: a zstd frame and
//! its SEAL, written out) at least every 250 ms, every 256 KiB and at every RESIZE, so a crash
//! loses at most the last quarter of a second. A stream still open when its relay's connection
//! drops is closed with the reason `"relay link lost"`; on SIGTERM/SIGINT, with `"recorder
//! shutdown"`.
//!
//! Every finished recording gets a trailer signed with the evidence key (`evidence.key` in the
//! data directory, created on first start by this process or psm-control, whichever starts
//! first; see `psm_evidence`). The trailer says whether the recording ended with the session's
//! own CLOSE or with one the recorder made up (link lost, shutdown, write failure): the latter
//! verify as truncated, signed up to where the recorder got.
//!
//! With a recording key ([`Encryption`], `[recorder] encryption_key_file` in `psm.toml`),
//! every new recording is encrypted at rest (format version 4, see
//! [`psm_recorder_format::crypt`]): its seals and trailer still verify without the key.
//! Without one it is written in format version 5 (chunks in the clear, sealed as written). The
//! text of encrypted recordings stays out of the search index (which is not encrypted) unless
//! [`Encryption::index_encrypted`] says otherwise.
//!
//! Every connection is served by its own thread (reading, decoding, compressing, writing), so
//! heavy work never stalls accepting; a malformed frame drops only the connection it came on.
//!
//! What it does not do: decide anything about sessions (the relay decides whether recording is
//! required), or read recordings (psmctl does that through [`psm_recorder_format::export`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::future::Future;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use psm_evidence::EvidenceKey;
use psm_recorder_format::crypt::RecordingKey;
use psm_recorder_format::file::{self, Record, RecordingWriter};
use psm_recorder_format::wire::MAX_FRAME;
use psm_recorder_format::{
    CloseSummary, Direction, FormatError, Frame, FrameRef, RecordingMeta, Reply,
};
use tracing::{debug, error, info, warn};

mod index;
use index::{Collector, Indexer};

/// Name of the socket relays connect to, inside the data directory.
pub const RECORDER_SOCKET: &str = "recorder.sock";
/// Name of the folder of recordings, inside the data directory.
pub const RECORDINGS_DIR: &str = "recordings";
/// Close reason written for streams still open when their relay's connection drops.
pub const REASON_LINK_LOST: &str = "relay link lost";
/// Close reason written for streams still open when the recorder stops.
pub const REASON_SHUTDOWN: &str = "recorder shutdown";
/// Close reason written for a recording that could not be written any more (disk full, I/O
/// error), when its file can still be finished.
pub const REASON_WRITE_FAILED: &str = "recording failed";

/// Longest time written data waits before it is flushed to the file (and acknowledged to the
/// relay as durable). Well under the relay's durable window (1 s by default), so that a
/// session's window moves on before it fills with time.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Uncompressed bytes after which a stream is flushed at once: a quarter of the relay's
/// default durable window (1 MiB), so that a busy session is acknowledged several times per
/// window and keeps moving.
pub const FLUSH_BYTES: u64 = 256 * 1024;

/// How often a connection thread wakes without traffic (flushes, shutdown check).
const TICK: Duration = Duration::from_millis(50);
/// Receive buffer of a connection: a largest frame plus room to read more behind it.
const RECV_BUFFER: usize = 2 * MAX_FRAME;
/// Below this much free space at the end of the receive buffer, the partial frame is moved to
/// its front.
const MIN_READ: usize = 256 * 1024;
/// Buffer between a recording's zstd encoder and its file.
const FILE_BUFFER: usize = 256 * 1024;

/// Errors that stop the recorder.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    /// The data directory, the recordings folder or the socket could not be set up.
    #[error("cannot set up {path}: {source}")]
    Setup {
        /// What could not be set up.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another process already listens on the socket.
    #[error("another recorder is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    /// The evidence key that signs recordings could not be read or created.
    #[error(transparent)]
    Evidence(#[from] psm_evidence::KeyError),
}

fn setup_err_addr(addr: std::net::SocketAddr) -> impl FnOnce(io::Error) -> RecorderError {
    move |source| RecorderError::Setup {
        path: PathBuf::from(format!("metrics address {addr}")),
        source,
    }
}

fn setup_err(path: &Path) -> impl FnOnce(io::Error) -> RecorderError + '_ {
    move |source| RecorderError::Setup {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether and how recordings are encrypted at rest.
#[derive(Debug, Default)]
pub struct Encryption {
    /// The recording key; `None`: recordings are written unencrypted.
    pub key: Option<RecordingKey>,
    /// Whether the text of encrypted recordings goes into the search index anyway (where it
    /// is in the clear); by default it does not, and search does not find them.
    pub index_encrypted: bool,
    /// Where to serve the recorder's counters (Prometheus text); `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The recorder's counters, served in the Prometheus text format where `--metrics-listen`
/// asks for it.
#[derive(Default)]
pub struct Stats {
    /// Relay links connected now.
    pub links: AtomicU64,
    /// Recordings created.
    pub opened: AtomicU64,
    /// Recordings that could not be created.
    pub refused: AtomicU64,
    /// Recordings that stopped being written (write or flush failures).
    pub failed: AtomicU64,
    /// Recordings finished, failed or discarded (opened minus ended: open now).
    pub ended: AtomicU64,
    /// Session bytes recorded (DATA payloads, before compression).
    pub bytes: AtomicU64,
}

impl Stats {
    /// The counters as Prometheus families.
    pub fn families(&self) -> Vec<psm_metrics::Family> {
        use psm_metrics::{Family, Kind};
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let opened = self.opened.load(Ordering::Relaxed);
        let ended = self.ended.load(Ordering::Relaxed);
        vec![
            Family::new("psm_recorder_links", Kind::Gauge, "Relay links connected.")
                .sample(vec![], v(&self.links)),
            Family::new(
                "psm_recorder_recordings_open",
                Kind::Gauge,
                "Recordings being written.",
            )
            .sample(vec![], opened.saturating_sub(ended) as f64),
            Family::new(
                "psm_recorder_recordings_opened_total",
                Kind::Counter,
                "Recordings created.",
            )
            .sample(vec![], opened as f64),
            Family::new(
                "psm_recorder_recordings_refused_total",
                Kind::Counter,
                "Recordings that could not be created.",
            )
            .sample(vec![], v(&self.refused)),
            Family::new(
                "psm_recorder_recordings_failed_total",
                Kind::Counter,
                "Recordings that stopped being written.",
            )
            .sample(vec![], v(&self.failed)),
            Family::new(
                "psm_recorder_bytes_total",
                Kind::Counter,
                "Session bytes recorded, before compression.",
            )
            .sample(vec![], v(&self.bytes)),
        ]
    }
}

/// Runs the recorder on `data_dir` until SIGTERM or SIGINT, then finishes every open recording
/// (reason `"recorder shutdown"`) and removes the socket.
pub async fn run(data_dir: PathBuf) -> Result<(), RecorderError> {
    run_with(data_dir, Encryption::default()).await
}

/// Like [`run`], encrypting recordings as `encryption` says.
pub async fn run_with(data_dir: PathBuf, encryption: Encryption) -> Result<(), RecorderError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(RecorderError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RecorderError::Signals)?;
    run_until_with(data_dir, encryption, async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
    .await
}

/// Runs the recorder on `data_dir` until `shutdown` completes, then stops as [`run`] does on a
/// signal.
pub async fn run_until(
    data_dir: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RecorderError> {
    run_until_with(data_dir, Encryption::default(), shutdown).await
}

/// Like [`run_until`], encrypting recordings as `encryption` says.
pub async fn run_until_with(
    data_dir: PathBuf,
    encryption: Encryption,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RecorderError> {
    let recordings = prepare_dirs(&data_dir)?;
    match &encryption.key {
        Some(k) => {
            info!(key_id = %k.id(), index_encrypted = encryption.index_encrypted, "recordings are encrypted at rest")
        }
        None => info!("recordings are not encrypted at rest"),
    }
    let (key, created) = EvidenceKey::load_or_create(&data_dir)?;
    info!(public_key = %key.public(), key_id = %key.public().key_id(), created, "evidence key");
    let stats = Arc::new(Stats::default());
    if let Some(addr) = encryption.metrics_listen {
        let st = stats.clone();
        let bound = psm_metrics::serve(addr, move || psm_metrics::render(&st.families()))
            .map_err(setup_err_addr(addr))?;
        info!(listen = %bound, "recorder counters served (Prometheus text)");
    }
    let keys = Arc::new(Keys {
        evidence: key,
        encryption,
        stats,
    });
    let owner_uid = fs::metadata(&data_dir).map_err(setup_err(&data_dir))?.uid();
    let socket_path = data_dir.join(RECORDER_SOCKET);
    remove_stale_socket(&socket_path)?;
    let listener = tokio::net::UnixListener::bind(&socket_path).map_err(setup_err(&socket_path))?;
    fs::set_permissions(&socket_path, Permissions::from_mode(0o600))
        .map_err(setup_err(&socket_path))?;
    info!(socket = %socket_path.display(), recordings = %recordings.display(), "listening");

    let stop = Arc::new(AtomicBool::new(false));
    let indexer = Indexer::start(&recordings).map_err(setup_err(&recordings))?;
    let mut links: Vec<LinkHandle> = Vec::new();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_id += 1;
                    links.retain(|l| !l.thread.is_finished());
                    match start_link(next_id, stream, owner_uid, &recordings, &stop, &keys, &indexer) {
                        Ok(link) => links.push(link),
                        Err(e) => error!(link = next_id, error = %e, "cannot serve relay connection"),
                    }
                }
                Err(e) => {
                    // out of descriptors and the like: wait a little rather than spin
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    info!(links = links.len(), "shutting down");
    drop(listener);
    stop.store(true, Ordering::SeqCst);
    for link in &links {
        // wakes a thread blocked in read; it sees `stop` and finishes its recordings
        let _ = link.stream.shutdown(std::net::Shutdown::Read);
    }
    let joined = tokio::task::spawn_blocking(move || {
        for link in links {
            if link.thread.join().is_err() {
                error!(link = link.id, "relay connection thread panicked");
            }
        }
    })
    .await;
    if joined.is_err() {
        error!("cannot wait for relay connection threads");
    }
    if let Err(e) = fs::remove_file(&socket_path) {
        warn!(socket = %socket_path.display(), error = %e, "cannot remove socket");
    }
    info!("stopped");
    Ok(())
}

/// Creates the data directory (if missing) and `recordings/`, both mode 0700.
fn prepare_dirs(data_dir: &Path) -> Result<PathBuf, RecorderError> {
    let recordings = data_dir.join(RECORDINGS_DIR);
    for dir in [data_dir, recordings.as_path()] {
        if !dir.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(setup_err(dir))?;
        }
    }
    fs::set_permissions(&recordings, Permissions::from_mode(0o700))
        .map_err(setup_err(&recordings))?;
    Ok(recordings)
}

/// Removes a socket file left by a recorder that died; refuses when one still listens on it.
fn remove_stale_socket(path: &Path) -> Result<(), RecorderError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if UnixStream::connect(path).is_ok() {
        return Err(RecorderError::AlreadyRunning(path.to_path_buf()));
    }
    match fs::remove_file(path) {
        Ok(()) => {
            info!(socket = %path.display(), "removed stale socket");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(setup_err(path)(e)),
    }
}

/// A relay connection and the thread serving it.
struct LinkHandle {
    id: u64,
    /// A second handle on the socket, to wake the thread at shutdown.
    stream: UnixStream,
    thread: JoinHandle<()>,
}

fn start_link(
    id: u64,
    stream: tokio::net::UnixStream,
    owner_uid: u32,
    recordings: &Path,
    stop: &Arc<AtomicBool>,
    keys: &Arc<Keys>,
    indexer: &Indexer,
) -> io::Result<LinkHandle> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == owner_uid => {
            info!(link = id, uid = cred.uid(), pid = ?cred.pid(), "relay connected")
        }
        Ok(cred) => {
            warn!(link = id, uid = cred.uid(), pid = ?cred.pid(), owner_uid, "refused connection: peer does not own the data directory");
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "uid {} does not own the data directory (owner uid {owner_uid})",
                    cred.uid()
                ),
            ));
        }
        Err(e) => {
            warn!(link = id, error = %e, "refused connection: cannot check peer credentials");
            return Err(e);
        }
    }
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    let waker = stream.try_clone()?;
    let replies = stream.try_clone()?;
    let dir = recordings.to_path_buf();
    let stop = Arc::clone(stop);
    let keys = Arc::clone(keys);
    let indexer = indexer.clone();
    let thread = std::thread::Builder::new()
        .name(format!("relay-link-{id}"))
        .spawn(move || Link::new(id, dir, replies, keys, indexer).serve(stream, &stop))?;
    Ok(LinkHandle {
        id,
        stream: waker,
        thread,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// One recording being written.
struct Recording {
    writer: RecordingWriter<BufWriter<File>>,
    recording_id: String,
    path: PathBuf,
    start_ms: u64,
    last_ts_us: u64,
    /// When data was first written since the last flush.
    dirty_since: Option<Instant>,
    /// DATA payload bytes written so far.
    data_bytes: u64,
    /// DATA payload bytes the relay was last told are durable.
    acked: u64,
    /// The lines of text seen so far, for the search index.
    lines: Collector,
    /// Where they go at each flush; `None` when the recording is not indexed (encrypted).
    indexer: Option<Indexer>,
}

/// A record to append: DATA borrowed from the link's receive buffer (written without a copy),
/// or any other record.
enum Entry<'a> {
    Data {
        ts_us: u64,
        channel: u32,
        direction: Direction,
        data: &'a [u8],
    },
    Other(Record),
}

impl Entry<'_> {
    /// DATA bytes it carries.
    fn data_len(&self) -> usize {
        match self {
            Entry::Data { data, .. } => data.len(),
            Entry::Other(_) => 0,
        }
    }
}

impl Recording {
    fn write(&mut self, entry: &Entry<'_>) -> Result<(), FormatError> {
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

    fn flush(&mut self) -> Result<(), FormatError> {
        self.dirty_since = None;
        self.writer.flush()?;
        if let Some(indexer) = &self.indexer {
            indexer.batch(&self.recording_id, &mut self.lines);
        }
        Ok(())
    }

    /// The durable count to report, when it moved since the last report (call after a flush
    /// that succeeded: everything written before it is in flushed chunks).
    fn take_ack(&mut self) -> Option<u64> {
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
    fn finish(
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

/// What a link knows about one of its streams.
enum Stream {
    Recording(Box<Recording>),
    /// Its frames are dropped (the recording could not be created or written).
    Dropped,
}

/// The streams of one relay connection.
struct Link {
    id: u64,
    dir: PathBuf,
    streams: HashMap<u64, Stream>,
    /// Where [`Reply`]s go (the same socket, written by this thread only).
    replies: UnixStream,
    /// Set when a reply could not be sent: the relay no longer hears about its streams, so the
    /// link is closed and the relay ends every session recorded on it (fail closed).
    deaf: Option<String>,
    /// Signs the trailers.
    keys: Arc<Keys>,
    /// Signs the trailers; encrypts the recordings when there is a recording key.
    indexer: Indexer,
}

/// The keys of the recorder: the evidence key signs trailers, the recording key (if any)
/// encrypts recordings; and the counters every link adds to.
struct Keys {
    evidence: EvidenceKey,
    encryption: Encryption,
    stats: Arc<Stats>,
}

impl Link {
    fn new(id: u64, dir: PathBuf, replies: UnixStream, keys: Arc<Keys>, indexer: Indexer) -> Self {
        Link {
            id,
            dir,
            streams: HashMap::new(),
            replies,
            deaf: None,
            keys,
            indexer,
        }
    }

    fn reply(&mut self, reply: Reply) {
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
    fn fail(&mut self, stream: u64, why: String) {
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
    fn serve(self, stream: UnixStream, stop: &AtomicBool) {
        let stats = self.keys.stats.clone();
        stats.links.fetch_add(1, Ordering::Relaxed);
        self.serve_link(stream, stop);
        stats.links.fetch_sub(1, Ordering::Relaxed);
    }

    fn serve_link(mut self, mut stream: UnixStream, stop: &AtomicBool) {
        let mut buf = vec![0u8; RECV_BUFFER];
        let (mut start, mut end) = (0usize, 0usize);
        let mut next_sweep = Instant::now() + TICK;
        let reason = loop {
            if stop.load(Ordering::SeqCst) {
                break REASON_SHUTDOWN;
            }
            match stream.read(&mut buf[end..]) {
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
                Ok(n) => {
                    end += n;
                    match self.handle_frames(&buf[start..end]) {
                        Ok(used) => start += used,
                        Err(e) => {
                            error!(link = self.id, error = %e, "malformed frame, dropping relay connection");
                            break REASON_LINK_LOST;
                        }
                    }
                    if let Some(why) = self.deaf.take() {
                        error!(link = self.id, error = %why, "dropping the relay connection");
                        break REASON_LINK_LOST;
                    }
                    if start == end {
                        start = 0;
                        end = 0;
                    } else if buf.len() - end < MIN_READ {
                        buf.copy_within(start..end, 0);
                        end -= start;
                        start = 0;
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
                if let Some(why) = self.deaf.take() {
                    error!(link = self.id, error = %why, "dropping the relay connection");
                    break REASON_LINK_LOST;
                }
            }
        };
        let _ = stream.shutdown(std::net::Shutdown::Both);
        self.close_all(reason);
    }

    fn open_count(&self) -> usize {
        self.streams
            .values()
            .filter(|s| matches!(s, Stream::Recording(_)))
            .count()
    }

    /// Handles every complete frame at the front of `buf`; returns how many bytes they used.
    fn handle_frames(&mut self, buf: &[u8]) -> Result<usize, FormatError> {
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
                FrameRef::Other(frame) => self.handle(frame),
            }
        }
        Ok(used)
    }

    fn handle(&mut self, frame: Frame) {
        match frame {
            Frame::Open { stream, meta } => self.open(stream, meta),
            Frame::Data {
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
                    data: &data,
                },
            ),
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

    fn open(&mut self, stream: u64, meta: RecordingMeta) {
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

    fn create(&self, meta: &RecordingMeta) -> Result<Recording, FormatError> {
        let path = file::path_for(&self.dir, &meta.recording_id)?;
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
        let mut writer =
            RecordingWriter::with_key(BufWriter::with_capacity(FILE_BUFFER, file), meta, key)?;
        // the header is on disk from the start: the recording is listed while it runs
        writer.flush()?;
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

    fn append(&mut self, stream: u64, entry: Entry<'_>) {
        match self.streams.get_mut(&stream) {
            Some(Stream::Recording(r)) => match r.write(&entry) {
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

    fn close(&mut self, stream: u64, ts_us: u64, summary: CloseSummary) {
        match self.streams.remove(&stream) {
            Some(Stream::Recording(r)) => {
                self.keys.stats.ended.fetch_add(1, Ordering::Relaxed);
                let id = r.recording_id.clone();
                let bytes = r.data_bytes;
                match r.finish(ts_us, summary, &self.keys.evidence, true) {
                    // the session's last bytes are in the finished file
                    Ok(()) => self.reply(Reply::Durable { stream, bytes }),
                    Err(e) => {
                        error!(link = self.id, stream, recording_id = %id, error = %e, "cannot finish recording")
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

    /// Removes the recording of a session that never started (it holds only its header).
    fn discard(&mut self, stream: u64) {
        match self.streams.remove(&stream) {
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
    fn flush_stream(&mut self, stream: u64) {
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

    /// Flushes the recordings whose oldest unflushed data is about to be a second old.
    fn flush_due(&mut self, now: Instant) {
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
    fn close_all(&mut self, reason: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_removed_and_live_one_refused() {
        let tmp = std::env::temp_dir().join(format!("psm-recorder-stale-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).expect("mkdir");
        let path = tmp.join(RECORDER_SOCKET);
        assert!(remove_stale_socket(&path).is_ok());
        let live = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        assert!(matches!(
            remove_stale_socket(&path),
            Err(RecorderError::AlreadyRunning(_))
        ));
        drop(live);
        assert!(path.exists());
        remove_stale_socket(&path).expect("stale");
        assert!(!path.exists());
        let _ = fs::remove_dir_all(&tmp);
    }
}
