//! The audit log: append-only, one [`AuditEvent`] JSON object per line, hash-chained,
//! checkpointed and rotated into segments.
//!
//! psm-control is its only writer. It numbers events (`seq`) when it appends them, continuing
//! from the last event written, and hands each line to the OS right away (one `write` per
//! line; no user-space buffering). Every line carries `prev_hash`, the SHA-256 of the line
//! before it, and with an evidence key ([`AuditLog::sign_checkpoints`]) a signed checkpoint
//! line is written every N events, at shutdown ([`AuditLog::checkpoint`]) and at every
//! rotation; the format and its verification are in [`psm_evidence::audit`].
//!
//! Segments: events are appended to the live segment `audit.jsonl`. When it passes a size or
//! an age ([`Rotation`]), a checkpoint (reason `rotation`) is written as its last line, it is
//! fsynced and renamed to `audit/audit-<first seq, 20 digits>.jsonl` (names sort by `seq`),
//! and a new `audit.jsonl` is created; the next event chains to the checkpoint. The order is
//! what makes it crash-safe: every event is in exactly one file at every instant (the rename
//! is atomic), and a crash before the rename leaves a live segment that ends with the
//! checkpoint (it is rotated at the next append), after it an absent or empty `audit.jsonl`,
//! which [`AuditLog::open`] creates and continues from the newest closed segment's last line
//! (`seq` and hash). Closed segments are never written again; retention deletes the oldest
//! ([`segments`], `crate::retention::select_segments`).
//!
//! [`read_tail`] reads the last events across segments without loading whole files, for
//! `psmctl audit tail`; [`verify`] checks every segment as one chain for `psmctl audit verify`.
//!
//! What it does not do: fsync every line (only a closed segment is fsynced).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use psm_control_api::{AuditEvent, AuditKind};
use psm_evidence::audit as chain;
use psm_evidence::{EvidenceKey, Hash};
use tracing::{error, info, warn};

#[cfg(test)]
mod rotation_tests;
pub mod segments;

pub use segments::{closed_segments, read_tail, segment_dir, segment_paths, verify, ClosedSegment};

/// Checkpoints are written every this many events by default.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
/// The live segment is rotated once it holds this many bytes, by default (64 MiB).
pub const DEFAULT_ROTATE_BYTES: u64 = 64 << 20;
/// The live segment is rotated once its first event is this old, by default (1 day).
pub const DEFAULT_ROTATE_INTERVAL_MS: u64 = 86_400_000;
/// After a rotation failed, the next attempt waits this long (ms).
const ROTATE_RETRY_MS: u64 = 60_000;

/// When the live segment is closed and a new one started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Once the live segment holds at least this many bytes (none: never by size).
    pub max_bytes: Option<u64>,
    /// Once the live segment's first event is older than this, in ms (none: never by age).
    pub max_age_ms: Option<u64>,
}

impl Rotation {
    /// Never rotates.
    pub const NEVER: Rotation = Rotation {
        max_bytes: None,
        max_age_ms: None,
    };

    /// Whether a live segment of `bytes` whose first event was at `started_ms` (none: it is
    /// empty) is due for rotation at `now_ms`. An empty segment never is.
    pub fn due(&self, bytes: u64, started_ms: Option<u64>, now_ms: u64) -> bool {
        let Some(started) = started_ms else {
            return false;
        };
        self.max_bytes.is_some_and(|max| bytes >= max)
            || self
                .max_age_ms
                .is_some_and(|max| now_ms.saturating_sub(started) >= max)
    }
}

impl Default for Rotation {
    /// 64 MiB or one day, whichever comes first.
    fn default() -> Self {
        Rotation {
            max_bytes: Some(DEFAULT_ROTATE_BYTES),
            max_age_ms: Some(DEFAULT_ROTATE_INTERVAL_MS),
        }
    }
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log could not be opened, read or written.
    #[error("audit log {}: {source}", .path.display())]
    Io {
        /// The log file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// The open audit log.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    path: PathBuf,
    next_seq: u64,
    /// The hash of the last line: what the next line carries as `prev_hash`.
    prev_hash: Hash,
    /// Signs checkpoints; without it none are written.
    signer: Option<EvidenceKey>,
    /// Events between two checkpoints.
    checkpoint_every: u64,
    /// Events appended since the last checkpoint (or since this process opened the log).
    since_checkpoint: u64,
    /// The next appended event is a checkpoint (set by [`AuditLog::checkpoint`]).
    checkpoint_next: bool,
    /// Where every appended event goes next: the SIEM sinks' queues (`crate::siem`).
    pub tap: Option<crate::siem::Tap>,
    /// When the live segment is rotated.
    rotation: Rotation,
    /// Bytes in the live segment.
    live_bytes: u64,
    /// The first `seq` and time of the live segment (none while it is empty).
    live_first: Option<(u64, u64)>,
    /// A rotation is being written (its checkpoint is not a reason to rotate again).
    rotating: bool,
    /// When a rotation last failed (ms), so that a failing one is not retried at every event.
    rotate_failed_ms: Option<u64>,
}

impl AuditLog {
    /// Opens `path` for appending (creating it, mode 0600), and finds the next `seq`.
    ///
    /// A last line cut short by a crash is closed with a newline so that the next event starts
    /// on a line of its own.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io_err = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len > 0 {
            file.seek(SeekFrom::Start(len - 1)).map_err(io_err)?;
            let mut last = [0u8; 1];
            file.read_exact(&mut last).map_err(io_err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(io_err)?;
            }
        }
        let live_bytes = file.metadata().map_err(io_err)?.len();
        let live_first = segments::first_event(path).map_err(io_err)?;
        // an empty live segment (just rotated, or a crash between the rename and its
        // creation) continues from the newest closed segment
        let head = match last_lines(&mut file, 1).map_err(io_err)?.last() {
            Some(line) => Some((last_seq(&mut file).map_err(io_err)?, chain::line_hash(line))),
            None => match closed_segments(path).map_err(io_err)?.last() {
                Some(seg) => {
                    segments::segment_tail(&seg.path).map_err(|source| AuditError::Io {
                        path: seg.path.clone(),
                        source,
                    })?
                }
                None => None,
            },
        };
        let (last_seq, prev_hash) = head.unwrap_or((0, chain::GENESIS));
        Ok(AuditLog {
            file,
            path: path.to_path_buf(),
            next_seq: last_seq + 1,
            prev_hash,
            signer: None,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            since_checkpoint: 0,
            checkpoint_next: false,
            tap: None,
            rotation: Rotation::NEVER,
            live_bytes,
            live_first,
            rotating: false,
            rotate_failed_ms: None,
        })
    }

    /// From now on, rotates the live segment as `rotation` says.
    pub fn rotate_when(&mut self, rotation: Rotation) {
        self.rotation = rotation;
    }

    /// Rotates the live segment if it is due at `now_ms` (a quiet log still rotates by age).
    pub fn rotate_if_due(&mut self, now_ms: u64) -> Result<(), AuditError> {
        let retry = self
            .rotate_failed_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= ROTATE_RETRY_MS);
        if self.rotating
            || !retry
            || !self
                .rotation
                .due(self.live_bytes, self.live_first.map(|f| f.1), now_ms)
        {
            return Ok(());
        }
        self.rotate()
            .inspect_err(|_| self.rotate_failed_ms = Some(now_ms))
    }

    /// Closes the live segment: its rotation checkpoint, fsync, rename into `audit/`, a new
    /// live segment. Nothing when it is empty. See the module documentation for the order.
    pub fn rotate(&mut self) -> Result<(), AuditError> {
        let Some((first_seq, _)) = self.live_first else {
            return Ok(());
        };
        self.rotating = true;
        let written = self.checkpoint("rotation");
        self.rotating = false;
        written?;
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, source }
        };
        self.file.sync_all().map_err(io_err(&self.path))?;
        let dir = segment_dir(&self.path);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let closed = dir.join(segments::segment_name(first_seq));
        if closed.exists() {
            // never replace a closed segment
            return Err(AuditError::Io {
                path: closed,
                source: io::Error::new(io::ErrorKind::AlreadyExists, "segment exists already"),
            });
        }
        fs::rename(&self.path, &closed).map_err(io_err(&closed))?;
        let file = match OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) => {
                // no new live file: the closed one goes back to being the live one, so that
                // nothing is appended to a closed segment
                let _ = fs::rename(&closed, &self.path);
                return Err(io_err(&self.path)(e));
            }
        };
        info!(segment = %closed.display(), first_seq, last_seq = self.next_seq - 1, "audit log rotated");
        self.file = file;
        self.live_bytes = 0;
        self.live_first = None;
        self.rotate_failed_ms = None;
        for d in [dir.as_path(), self.path.parent().unwrap_or(Path::new("."))] {
            if let Err(e) = File::open(d).and_then(|d| d.sync_all()) {
                // the rotation stands (the new live file is in use): failing here would leave
                // events going on into the renamed segment
                warn!(dir = %d.display(), error = %e, "cannot sync the audit folder after rotating");
            }
        }
        Ok(())
    }

    /// The `seq` the next appended event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, writes a checkpoint signed with `key` every `every` events (at least 1)
    /// and whenever [`checkpoint`](Self::checkpoint) is called.
    pub fn sign_checkpoints(&mut self, key: EvidenceKey, every: u64) {
        self.signer = Some(key);
        self.checkpoint_every = every.max(1);
    }

    /// Numbers `event`, chains it to the line before and appends it as one line (with its
    /// signed `checkpoint` field when [`checkpoint`](Self::checkpoint) asked for one); returns it
    /// with its `seq`. The one place events are written.
    pub fn append(&mut self, mut event: AuditEvent) -> Result<AuditEvent, AuditError> {
        if !self.checkpoint_next {
            if let Err(e) = self.rotate_if_due(psm_control_api::now_ms()) {
                error!(error = %e, "cannot rotate the audit log; it goes on in the live segment");
            }
        }
        let checkpoint = std::mem::take(&mut self.checkpoint_next);
        event.seq = self.next_seq;
        if event.ts_ms == 0 {
            event.ts_ms = psm_control_api::now_ms();
        }
        let bad = |path: &Path, why: String| AuditError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(why),
        };
        let mut line = serde_json::to_vec(&event).map_err(|e| bad(&self.path, e.to_string()))?;
        if let (true, Some(key)) = (checkpoint, &self.signer) {
            let field = chain::checkpoint_field(event.seq, event.ts_ms, &self.prev_hash, key);
            line = chain::add_field(&line, chain::CHECKPOINT_FIELD, &field)
                .ok_or_else(|| bad(&self.path, "an event is not a JSON object".into()))?;
        }
        let mut line = chain::chain_line(&line, &self.prev_hash)
            .ok_or_else(|| bad(&self.path, "an event is not a JSON object".into()))?;
        let hash = chain::line_hash(&line);
        line.push(b'\n');
        if let Err(source) = self.file.write_all(&line).and_then(|()| self.file.flush()) {
            // a line written in part (a full disk) is cut off again, so that the next one
            // starts on a line of its own and the chain goes on from the last whole line
            let _ = self.file.set_len(self.live_bytes);
            return Err(AuditError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.next_seq += 1;
        self.prev_hash = hash;
        self.live_bytes += line.len() as u64;
        self.live_first.get_or_insert((event.seq, event.ts_ms));
        if let Some(tap) = &self.tap {
            tap.offer(&line);
        }
        self.after_append(checkpoint);
        Ok(event)
    }

    /// Counts an appended event, and writes the periodic checkpoint when it is due.
    fn after_append(&mut self, was_checkpoint: bool) {
        if was_checkpoint {
            self.since_checkpoint = 0;
            return;
        }
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.checkpoint_every {
            let reason = format!("every {} events", self.checkpoint_every);
            if let Err(e) = self.checkpoint(&reason) {
                error!(error = %e, "cannot write an audit checkpoint");
            }
        }
    }

    /// Appends a checkpoint: a `notice` of kind `audit checkpoint` whose `checkpoint` field
    /// signs the hash of the line before it. Nothing without an evidence key.
    pub fn checkpoint(&mut self, reason: &str) -> Result<Option<AuditEvent>, AuditError> {
        let Some(key) = &self.signer else {
            return Ok(None);
        };
        let message = format!(
            "audit checkpoint ({reason}): events up to seq {} signed by key {}, chain hash {}",
            self.next_seq.saturating_sub(1),
            key.public().key_id(),
            psm_evidence::hex(&self.prev_hash)
        );
        self.checkpoint_next = true;
        let written = self.append_control(AuditKind::Notice {
            message,
            session_id: None,
            kind: Some(chain::CHECKPOINT_KIND.into()),
            count: None,
        });
        self.checkpoint_next = false;
        written.map(Some)
    }

    /// Appends an event made by control itself (origin `control`).
    pub fn append_control(&mut self, kind: AuditKind) -> Result<AuditEvent, AuditError> {
        self.append(AuditEvent {
            seq: 0,
            ts_ms: psm_control_api::now_ms(),
            origin: "control".into(),
            kind,
        })
    }
}

/// Reads the last lines of `file` (at most `n`), oldest first, reading backwards in chunks.
fn last_lines(file: &mut File, n: usize) -> io::Result<Vec<Vec<u8>>> {
    const CHUNK: u64 = 64 * 1024;
    let len = file.metadata()?.len();
    let mut pos = len;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Enough once the buffer holds n full lines after its first newline (or reaches the
        // start of the file).
        let newlines = buf.iter().filter(|&&b| b == b'\n').count();
        if pos == 0 || newlines > n {
            break;
        }
        let step = CHUNK.min(pos);
        pos -= step;
        let mut chunk = vec![0u8; step as usize];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let mut lines: Vec<&[u8]> = buf.split(|&b| b == b'\n').collect();
    if pos > 0 && !lines.is_empty() {
        lines.remove(0); // partial first line
    }
    let mut out: Vec<Vec<u8>> = lines
        .into_iter()
        .filter(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
        .map(|l| l.to_vec())
        .collect();
    if out.len() > n {
        out.drain(..out.len() - n);
    }
    Ok(out)
}

fn last_seq(file: &mut File) -> io::Result<u64> {
    let mut want = 16;
    loop {
        let lines = last_lines(file, want)?;
        if let Some(seq) = lines
            .iter()
            .rev()
            .find_map(|l| serde_json::from_slice::<AuditEvent>(l).ok())
            .map(|e| e.seq)
        {
            return Ok(seq);
        }
        if lines.len() < want {
            return Ok(0); // the whole file, and no readable event
        }
        want *= 16;
    }
}

/// Size of the audit log in bytes (0 when missing).
pub fn log_size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(msg: &str) -> AuditEvent {
        AuditEvent {
            seq: 0,
            ts_ms: 5,
            origin: "relay-1".into(),
            kind: AuditKind::Notice {
                message: msg.into(),
                session_id: None,
                kind: None,
                count: None,
            },
        }
    }

    #[test]
    fn seq_continues_across_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).expect("open");
        assert_eq!(log.next_seq(), 1);
        assert_eq!(log.append(notice("a")).expect("append").seq, 1);
        assert_eq!(
            log.append_control(AuditKind::AdminChange {
                action: "user add".into(),
                object: "alice".into(),
                actor_uid: Some(0),
                actor: Some("root".into()),
            })
            .expect("append")
            .seq,
            2
        );
        drop(log);
        let mut log = AuditLog::open(&path).expect("reopen");
        assert_eq!(log.next_seq(), 3);
        log.append(notice("c")).expect("append");
        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 3);
        let events = read_tail(&path, 10).expect("tail");
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(events[1].origin, "control");
        let last = read_tail(&path, 2).expect("tail");
        assert_eq!(last.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn survives_a_torn_last_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).expect("open");
        for i in 0..5 {
            log.append(notice(&format!("n{i}"))).expect("append");
        }
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"seq\":99,\"ts_ms\"").expect("torn");
        drop(f);
        let mut log = AuditLog::open(&path).expect("reopen");
        assert_eq!(log.next_seq(), 6);
        log.append(notice("after")).expect("append");
        let events = read_tail(&path, 3).expect("tail");
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
    }

    fn key() -> EvidenceKey {
        EvidenceKey::generate().expect("key").0
    }

    #[test]
    fn lines_are_chained_and_checkpointed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("audit.jsonl");
        let k = key();
        let public = *k.public();
        let mut log = AuditLog::open(&path).expect("open");
        log.sign_checkpoints(k, 3);
        for i in 0..7 {
            log.append(notice(&format!("n{i}"))).expect("append");
        }
        log.checkpoint("shutdown").expect("checkpoint");
        drop(log);
        // 7 events, a checkpoint after every 3 (seq 4 and 8), and the shutdown one (seq 10)
        let events = read_tail(&path, 100).expect("tail");
        assert_eq!(events.len(), 10);
        let checkpoints: Vec<u64> = events
            .iter()
            .filter(|e| matches!(&e.kind, AuditKind::Notice { kind: Some(k), .. } if k == "audit checkpoint"))
            .map(|e| e.seq)
            .collect();
        assert_eq!(checkpoints, [4, 8, 10]);
        let rep = verify(&path, Some(&public)).expect("verify");
        assert!(rep.ok(), "{rep}");
        assert_eq!(rep.good_checkpoints, 3);
        assert_eq!(rep.after_checkpoint, 0);
        // reopened, the chain goes on from the last line
        let mut log = AuditLog::open(&path).expect("reopen");
        log.append(notice("after")).expect("append");
        drop(log);
        let rep = verify(&path, Some(&public)).expect("verify");
        assert!(rep.ok(), "{rep}");
        assert_eq!(rep.after_checkpoint, 1);
        // every line is still an event with an "event" field
        for line in fs::read_to_string(&path).expect("read").lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            assert!(
                v.get("event").is_some() && v.get("prev_hash").is_some(),
                "{line}"
            );
        }
    }

    #[test]
    fn edits_and_deletions_are_located() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("audit.jsonl");
        let k = key();
        let public = *k.public();
        let mut log = AuditLog::open(&path).expect("open");
        log.sign_checkpoints(k, 100);
        for i in 0..6 {
            log.append(notice(&format!("n{i}"))).expect("append");
        }
        log.checkpoint("shutdown").expect("checkpoint");
        drop(log);
        let text = fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replacen("\"n2\"", "\"nX\"", 1);
        fs::write(&path, &edited).expect("write");
        let rep = verify(&path, Some(&public)).expect("verify");
        assert!(!rep.ok());
        assert!(
            rep.to_string()
                .contains("line 4: event seq 3 (line 3) was modified"),
            "{rep}"
        );

        let mut without = lines.clone();
        without.remove(4);
        fs::write(&path, without.join("\n") + "\n").expect("write");
        let rep = verify(&path, Some(&public)).expect("verify");
        assert!(rep.to_string().contains("event seq 5 is missing"), "{rep}");

        // a forged checkpoint signature
        let last = lines[6].replace("\"signature\":\"", "\"signature\":\"00");
        let mut forged = lines.clone();
        forged[6] = &last;
        fs::write(&path, forged.join("\n") + "\n").expect("write");
        let rep = verify(&path, Some(&public)).expect("verify");
        assert!(rep.to_string().contains("checkpoint event seq 7"), "{rep}");
    }

    #[test]
    fn tail_of_a_large_log() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).expect("open");
        let pad = "x".repeat(300);
        for _ in 0..1000 {
            log.append(notice(&pad)).expect("append");
        }
        drop(log);
        assert!(log_size(&path) > 64 * 1024 * 3);
        let events = read_tail(&path, 400).expect("tail");
        assert_eq!(events.len(), 400);
        assert_eq!(events[0].seq, 601);
        assert_eq!(events[399].seq, 1000);
        assert_eq!(AuditLog::open(&path).expect("open").next_seq(), 1001);
        assert!(read_tail(&tmp.path().join("missing"), 5)
            .expect("missing")
            .is_empty());
    }
}
