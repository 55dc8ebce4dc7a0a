//! The search index, written beside the recordings (`recordings/index.db`) by one thread.
//!
//! Each recording feeds its DATA records to a [`Collector`] as they are written (a byte loop,
//! no I/O); at each chunk flush and at the end its finished lines go to the indexer thread as
//! one batch, written in one SQLite transaction. The write path never waits on SQLite: batches
//! go through a bounded queue with `try_send`, and a batch that does not fit is dropped and
//! the recording marked partly indexed (`psmctl recordings reindex` rebuilds it from the
//! files). When the index cannot be opened or written (damaged, disk full) the thread logs it,
//! drops what it was given and tries to open it again at most every [`RETRY`]; recording goes
//! on regardless. At each recording's start it reopens the file if it was replaced or removed
//! (a `reindex` that set a damaged one aside).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use psm_recorder_format::RecordingMeta;
use psm_recorder_index::{IndexLine, IndexWriter, INDEX_FILE};
use tracing::{info, warn};

pub use psm_recorder_index::Collector;

/// Batches waiting for the indexer thread.
const QUEUE: usize = 1024;
/// Least time between two attempts to open a failing index.
const RETRY: Duration = Duration::from_secs(10);

enum Msg {
    Begin(Box<RecordingMeta>),
    Lines {
        recording_id: String,
        lines: Vec<IndexLine>,
        partial: bool,
    },
}

/// A handle on the indexer thread; cheap to clone, one per link.
#[derive(Clone)]
pub struct Indexer {
    tx: SyncSender<Msg>,
}

impl Indexer {
    /// Starts the indexer thread for the index in `recordings`.
    pub fn start(recordings: &Path) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let path = recordings.join(INDEX_FILE);
        std::thread::Builder::new()
            .name("indexer".into())
            .spawn(move || serve(path, rx))?;
        Ok(Indexer { tx })
    }

    /// A recording starts: its rows are (re)created. False when the queue is full.
    pub fn begin(&self, meta: &RecordingMeta) -> bool {
        self.send(Msg::Begin(Box::new(meta.clone())))
    }

    /// Hands over what `c` finished; marks `c` partial when the batch could not be queued.
    pub fn batch(&self, recording_id: &str, c: &mut Collector) {
        if c.pending() == 0 && !c.partial {
            return;
        }
        let lines = c.take();
        if !self.send(Msg::Lines {
            recording_id: recording_id.to_string(),
            lines,
            partial: c.partial,
        }) {
            c.partial = true;
        }
    }

    fn send(&self, msg: Msg) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                warn!("search index queue full, a batch of lines is not indexed");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// The index file's inode, to notice it was replaced (`psmctl recordings reindex` sets a
/// damaged one aside) or removed.
fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

fn serve(path: PathBuf, rx: Receiver<Msg>) {
    let mut writer: Option<IndexWriter> = None;
    let mut opened_ino: Option<u64> = None;
    let mut last_try: Option<Instant> = None;
    while let Ok(msg) = rx.recv() {
        // at each recording's start, follow a file that was replaced or removed
        if matches!(msg, Msg::Begin(_)) && writer.is_some() && inode(&path) != opened_ino {
            info!(index = %path.display(), "search index file replaced or removed, reopening");
            writer = None;
            last_try = None;
        }
        if writer.is_none() && last_try.is_none_or(|t| t.elapsed() >= RETRY) {
            last_try = Some(Instant::now());
            match IndexWriter::open(&path) {
                Ok(w) => {
                    info!(index = %path.display(), "search index open");
                    opened_ino = inode(&path);
                    writer = Some(w);
                }
                Err(e) => {
                    warn!(index = %path.display(), error = %e, "cannot open the search index; recordings go on without it (psmctl recordings reindex rebuilds it)")
                }
            }
        }
        let Some(w) = writer.as_mut() else { continue };
        let done = match msg {
            Msg::Begin(meta) => w.begin(&meta),
            Msg::Lines {
                recording_id,
                lines,
                partial,
            } => w.add(&recording_id, &lines, partial),
        };
        if let Err(e) = done {
            warn!(index = %path.display(), error = %e, "cannot write the search index; recordings go on without it (psmctl recordings reindex rebuilds it)");
            writer = None;
        }
    }
}
