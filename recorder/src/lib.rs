//! psm-recorder: the daemon that writes session recordings to disk.
//!
//! It listens on `recorder.sock` in the data directory, where relays connect and send
//! [`Frame`](psm_recorder_format::Frame)s (see [`psm_recorder_format::wire`]). Only processes of the uid that owns the data
//! directory may connect (checked with `SO_PEERCRED`), so nobody else can forge a recording.
//! Each stream a relay opens becomes one file `recordings/<recording_id>.psmrec`
//! ([`psm_recorder_format::file`]): OPEN creates it (never over an existing one) and is answered
//! with [`Reply::Opened`](psm_recorder_format::Reply::Opened), or [`Reply::Refused`](psm_recorder_format::Reply::Refused) when the file cannot be created; DATA and RESIZE
//! append, CLOSE ends and fsyncs it, DISCARD removes a recording whose session never started
//! (one that holds session data is finished instead: it is evidence).
//! When a recording cannot be written any more (disk full, I/O error) the recorder answers
//! [`Reply::Failed`](psm_recorder_format::Reply::Failed) for that stream and drops its frames: the relay ends that one session, the
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

use std::fs::{self, DirBuilder, Permissions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use psm_evidence::EvidenceKey;
use psm_recorder_format::crypt::RecordingKey;
use psm_recorder_format::wire::MAX_FRAME;
use tracing::{error, info, warn};

mod index;
mod link;
mod recording;
use index::Indexer;
use link::{Keys, Link};

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
/// Close reason written for a recording the relay asked to discard (its session never
/// started) that holds session data nonetheless: evidence is kept, whatever the relay says.
pub const REASON_DISCARDED_WITH_DATA: &str = "discard refused: the recording holds session data";

/// Longest time written data waits before it is flushed to the file (and acknowledged to the
/// relay as durable). Well under the relay's durable window (1 s by default), so that a
/// session's window moves on before it fills with time.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// How long a reply to the relay may wait for room in the link's socket before the link stops
/// answering (the relay's own stall limit then ends its sessions).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
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
        if let Some(why) = psm_metrics::exposure(bound) {
            tracing::warn!(listen = %bound, "{why}");
        }
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
    // a relay that stops reading replies makes this link deaf (it drops its replies) instead of
    // holding its thread, and with it the recordings and the shutdown, in a blocked send
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
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

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
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
