//! A sink's disk queue, `siem/<sink>/`: the events not yet delivered, in order, bounded.
//!
//! - `queue.jsonl`: the audit events handed to the sink, one JSON line each, appended as they
//!   are audited. Lines of delivered events stay until the file is compacted (emptied once
//!   everything is delivered, rewritten once the delivered part is over half of it and over
//!   1 MiB).
//! - `state.json`: the `seq` of the last event delivered, the totals delivered and dropped;
//!   replaced atomically (write, then rename) after every delivered event, so a restart of
//!   psm-control neither loses nor resends one.
//!
//! When the undelivered events reach the bound (`queue_max_events` or `queue_max_bytes`), a
//! new event is not queued but counted as dropped: the oldest undelivered events are kept.
//!
//! What it does not do: fsync (like `audit.jsonl`, what the kernel holds survives a crash of
//! psm-control but not of the machine), or talk to the network.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Compaction rewrites the file once its delivered part is over this many bytes (and half of
/// it).
const COMPACT_AFTER: u64 = 1024 * 1024;
/// Most bytes [`DiskQueue::peek`] reads at once.
const READ_CHUNK: u64 = 256 * 1024;

/// What `state.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct State {
    /// `seq` of the last event delivered (0: none).
    pub delivered_seq: u64,
    /// Events delivered since the queue was created.
    pub delivered: u64,
    /// Events dropped (queue full, or not writable) since the queue was created.
    pub dropped: u64,
}

/// An undelivered event read back from the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    /// Its `seq`.
    pub seq: u64,
    /// The event: its line of `audit.jsonl`, without the newline.
    pub line: Vec<u8>,
    /// Logical offset just past its line (file offset plus the bytes compacted away before).
    end: u64,
}

/// What [`DiskQueue::push`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for delivery.
    Queued,
    /// Already queued or delivered (an older `seq`): ignored.
    Duplicate,
    /// Not queued: the queue is at its bound.
    DroppedFull,
    /// Not queued: the queue file could not be written.
    DroppedIo,
}

/// A sink's queue directory, open.
#[derive(Debug)]
pub struct DiskQueue {
    dir: PathBuf,
    file: File,
    /// Length of `queue.jsonl`.
    len: u64,
    /// Bytes compacted away from the front of the file since it was opened: a [`Queued`]'s
    /// offset stays valid across a compaction.
    base: u64,
    /// Offset of the first undelivered line.
    offset: u64,
    state: State,
    /// Undelivered events and their bytes.
    pending: u64,
    pending_bytes: u64,
    /// The highest `seq` in the queue or delivered.
    last_seq: u64,
    max_events: u64,
    max_bytes: u64,
}

fn io_at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl DiskQueue {
    /// Opens (creating it, mode 0700) the queue in `dir`, bounded by `max_events` and
    /// `max_bytes`, and finds the undelivered events.
    pub fn open(dir: &Path, max_events: u64, max_bytes: u64) -> io::Result<DiskQueue> {
        fs::create_dir_all(dir).map_err(|e| io_at(dir, e))?;
        fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| io_at(dir, e))?;
        let state_path = dir.join("state.json");
        let state: State = match fs::read(&state_path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    // Not a reason to keep psm-control down: set it aside and deliver again
                    // what the queue file still holds (duplicates rather than losses).
                    let bad = dir.join("state.json.bad");
                    tracing::error!(file = %state_path.display(), error = %e, moved_to = %bad.display(), "unreadable SIEM queue state; what the queue holds is sent again");
                    fs::rename(&state_path, &bad).map_err(|e| io_at(&state_path, e))?;
                    State::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_at(&state_path, e)),
        };
        let path = dir.join("queue.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_at(&path, e))?;
        let mut q = DiskQueue {
            dir: dir.to_path_buf(),
            len: 0,
            base: 0,
            offset: 0,
            pending: 0,
            pending_bytes: 0,
            last_seq: state.delivered_seq,
            state,
            max_events,
            max_bytes,
            file: file.try_clone().map_err(|e| io_at(&path, e))?,
        };
        // One pass over the file: where the undelivered part starts, how big it is. A line cut
        // short by a crash is cut off.
        file.seek(SeekFrom::Start(0)).map_err(|e| io_at(&path, e))?;
        let mut reader = BufReader::new(&mut file);
        let mut pos = 0u64;
        let mut first_undelivered = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_at(&path, e))?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                q.file.set_len(pos).map_err(|e| io_at(&path, e))?;
                break;
            }
            if let Some(seq) = line_seq(&line) {
                if seq > q.state.delivered_seq {
                    first_undelivered.get_or_insert(pos);
                    q.pending += 1;
                    q.pending_bytes += n as u64;
                }
                q.last_seq = q.last_seq.max(seq);
            }
            pos += n as u64;
        }
        q.len = pos;
        q.offset = first_undelivered.unwrap_or(pos);
        Ok(q)
    }

    /// Queues the event `seq` (`line`: its JSON object, one line), unless the queue is at its
    /// bound or already holds `seq` or a later event.
    pub fn push(&mut self, seq: u64, line: &[u8]) -> Pushed {
        if seq <= self.last_seq {
            return Pushed::Duplicate;
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line.contains(&b'\n') {
            return self.dropped(Pushed::DroppedIo);
        }
        let mut line = line.to_vec();
        line.push(b'\n');
        if self.pending >= self.max_events
            || self.pending_bytes + line.len() as u64 > self.max_bytes
        {
            return self.dropped(Pushed::DroppedFull);
        }
        if let Err(e) = self.file.write_all(&line) {
            tracing::error!(queue = %self.dir.display(), error = %e, "cannot write to a SIEM sink's queue");
            // Whatever part was written is cut off again (or, if that fails too, skipped as an
            // unreadable line when the queue is next opened).
            let _ = self.file.set_len(self.len);
            return self.dropped(Pushed::DroppedIo);
        }
        self.len += line.len() as u64;
        self.pending += 1;
        self.pending_bytes += line.len() as u64;
        self.last_seq = seq;
        Pushed::Queued
    }

    fn dropped(&mut self, why: Pushed) -> Pushed {
        self.state.dropped += 1;
        why
    }

    /// Up to `max` undelivered events, oldest first, without removing them.
    pub fn peek(&mut self, max: usize) -> io::Result<Vec<Queued>> {
        let mut out = Vec::new();
        let mut pos = self.offset;
        while out.len() < max && pos < self.len {
            let want = (self.len - pos).min(READ_CHUNK);
            let mut buf = vec![0u8; want as usize];
            self.file.seek(SeekFrom::Start(pos))?;
            self.file.read_exact(&mut buf)?;
            let mut consumed = 0usize;
            for line in buf.split_inclusive(|&b| b == b'\n') {
                if line.last() != Some(&b'\n') || out.len() >= max {
                    break; // a line that continues beyond this chunk, or enough
                }
                consumed += line.len();
                let end = self.base + pos + consumed as u64;
                match line_seq(line) {
                    Some(seq) if seq > self.state.delivered_seq => out.push(Queued {
                        seq,
                        line: line[..line.len() - 1].to_vec(),
                        end,
                    }),
                    Some(_) => {}
                    None => {
                        tracing::warn!(queue = %self.dir.display(), offset = pos + consumed as u64 - line.len() as u64, "unreadable line in a SIEM sink's queue; skipped");
                    }
                }
            }
            if consumed == 0 {
                // One line longer than a chunk: read it whole.
                let mut rest = Vec::new();
                self.file.seek(SeekFrom::Start(pos))?;
                (&mut self.file)
                    .take(self.len - pos)
                    .read_to_end(&mut rest)?;
                let line_len = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |i| i + 1);
                let end = self.base + pos + line_len as u64;
                let line = &rest[..line_len];
                if let Some(seq) = line_seq(line).filter(|s| *s > self.state.delivered_seq) {
                    out.push(Queued {
                        seq,
                        line: line.strip_suffix(b"\n").unwrap_or(line).to_vec(),
                        end,
                    });
                }
                consumed = line_len;
            }
            pos += consumed as u64;
        }
        Ok(out)
    }

    /// Records `item` (the oldest undelivered event) as delivered, persistently.
    pub fn ack(&mut self, item: &Queued) -> io::Result<()> {
        let end = item.end.saturating_sub(self.base).min(self.len);
        let line_len = end.saturating_sub(self.offset);
        self.offset = end;
        self.pending = self.pending.saturating_sub(1);
        self.pending_bytes = self.pending_bytes.saturating_sub(line_len);
        self.state.delivered_seq = item.seq;
        self.state.delivered += 1;
        self.save_state()?;
        self.compact()
    }

    fn save_state(&self) -> io::Result<()> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let bytes = serde_json::to_vec(&self.state).map_err(io::Error::other)?;
        fs::write(&tmp, bytes).map_err(|e| io_at(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io_at(&path, e))
    }

    /// Saves the counters (the dropped count changes without a delivery).
    pub fn flush_state(&self) -> io::Result<()> {
        self.save_state()
    }

    /// Frees the delivered part of the file: all of it when nothing is pending, or by
    /// rewriting the pending part once the delivered part is big.
    fn compact(&mut self) -> io::Result<()> {
        let path = self.dir.join("queue.jsonl");
        if self.pending == 0 {
            if self.len > 0 {
                self.file.set_len(0).map_err(|e| io_at(&path, e))?;
                self.base += self.len;
                self.len = 0;
                self.offset = 0;
            }
            return Ok(());
        }
        if self.offset < COMPACT_AFTER || self.offset < self.len / 2 {
            return Ok(());
        }
        let tmp = self.dir.join("queue.jsonl.tmp");
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_at(&tmp, e))?;
        self.file.seek(SeekFrom::Start(self.offset))?;
        io::copy(&mut (&mut self.file).take(self.len - self.offset), &mut out)
            .map_err(|e| io_at(&tmp, e))?;
        drop(out);
        fs::rename(&tmp, &path).map_err(|e| io_at(&path, e))?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_at(&path, e))?;
        self.len -= self.offset;
        self.base += self.offset;
        self.offset = 0;
        Ok(())
    }

    /// Undelivered events.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Undelivered bytes.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// The counters.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Length of `queue.jsonl` (delivered lines not yet compacted included).
    pub fn file_len(&self) -> u64 {
        self.len
    }
}

/// The `seq` of an audit line, without building the whole event.
pub fn line_seq(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_control_api::{AuditEvent, AuditKind};

    /// A queue line for event `seq`.
    fn ev(seq: u64, msg: &str) -> (u64, Vec<u8>) {
        let e = AuditEvent {
            seq,
            ts_ms: 1,
            origin: "control".into(),
            kind: AuditKind::Notice {
                message: msg.into(),
                session_id: None,
                kind: None,
                count: None,
            },
        };
        (seq, serde_json::to_vec(&e).expect("json"))
    }

    fn push(q: &mut DiskQueue, seq: u64, msg: &str) -> Pushed {
        let (seq, line) = ev(seq, msg);
        q.push(seq, &line)
    }

    fn deliver(q: &mut DiskQueue, n: usize) -> Vec<u64> {
        let items = q.peek(n).expect("peek");
        for i in &items {
            q.ack(i).expect("ack");
        }
        items.iter().map(|i| i.seq).collect()
    }

    #[test]
    fn in_order_exactly_once_across_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("siem/a");
        let mut q = DiskQueue::open(&dir, 100, 1 << 20).expect("open");
        for s in 1..=5 {
            assert_eq!(push(&mut q, s, "x"), Pushed::Queued);
        }
        assert_eq!(push(&mut q, 3, "again"), Pushed::Duplicate);
        assert_eq!(q.pending(), 5);
        assert_eq!(deliver(&mut q, 2), vec![1, 2]);
        // peeking twice gives the same events until they are acknowledged
        assert_eq!(q.peek(10).expect("peek").len(), 3);
        assert_eq!(q.peek(1).expect("peek")[0].seq, 3);
        drop(q);
        let mut q = DiskQueue::open(&dir, 100, 1 << 20).expect("reopen");
        assert_eq!(q.pending(), 3);
        assert_eq!(q.state().delivered, 2);
        assert_eq!(push(&mut q, 5, "dup after restart"), Pushed::Duplicate);
        assert_eq!(push(&mut q, 6, "y"), Pushed::Queued);
        assert_eq!(deliver(&mut q, 10), vec![3, 4, 5, 6]);
        assert_eq!(q.file_len(), 0, "emptied once all is delivered");
        drop(q);
        let mut q = DiskQueue::open(&dir, 100, 1 << 20).expect("reopen");
        assert_eq!(q.pending(), 0);
        assert_eq!(q.state().delivered_seq, 6);
        assert!(q.peek(10).expect("peek").is_empty());
        push(&mut q, 7, "z");
        drop(q);
        // a damaged state file is set aside: the queue opens and sends what it holds again
        fs::write(dir.join("state.json"), b"{\"delivered_seq\":").expect("damage");
        let mut q = DiskQueue::open(&dir, 100, 1 << 20).expect("reopen despite the state");
        assert!(dir.join("state.json.bad").exists());
        assert_eq!(deliver(&mut q, 10), vec![7]);
    }

    #[test]
    fn the_bound_keeps_the_oldest_and_counts_the_rest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut q = DiskQueue::open(tmp.path(), 3, 1 << 20).expect("open");
        let got: Vec<Pushed> = (1..=5).map(|s| push(&mut q, s, "x")).collect();
        assert_eq!(
            got,
            vec![
                Pushed::Queued,
                Pushed::Queued,
                Pushed::Queued,
                Pushed::DroppedFull,
                Pushed::DroppedFull
            ]
        );
        assert_eq!(q.state().dropped, 2);
        assert_eq!(deliver(&mut q, 1), vec![1]);
        assert_eq!(push(&mut q, 6, "room again"), Pushed::Queued);
        assert_eq!(deliver(&mut q, 10), vec![2, 3, 6]);
        // bytes bound
        let big = "b".repeat(2000);
        let mut q = DiskQueue::open(&tmp.path().join("b"), 1000, 4096).expect("open");
        assert_eq!(push(&mut q, 1, &big), Pushed::Queued);
        assert_eq!(push(&mut q, 2, &big), Pushed::DroppedFull);
        assert!(q.pending_bytes() > 2000);
    }

    #[test]
    fn compaction_and_a_torn_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pad = "p".repeat(1000);
        let mut q = DiskQueue::open(tmp.path(), 100_000, 1 << 30).expect("open");
        for s in 1..=3000 {
            push(&mut q, s, &pad);
        }
        let before = q.file_len();
        let delivered = deliver(&mut q, 2000);
        assert_eq!(delivered.len(), 2000);
        assert!(
            q.file_len() < before,
            "compacted: {} < {before}",
            q.file_len()
        );
        assert_eq!(q.peek(1).expect("peek")[0].seq, 2001);
        drop(q);
        // a crash in the middle of a line
        let mut f = OpenOptions::new()
            .append(true)
            .open(tmp.path().join("queue.jsonl"))
            .expect("open");
        f.write_all(b"{\"seq\":3001,\"ts_").expect("torn");
        drop(f);
        let mut q = DiskQueue::open(tmp.path(), 100_000, 1 << 30).expect("reopen");
        assert_eq!(q.pending(), 1000);
        assert_eq!(push(&mut q, 3001, "after"), Pushed::Queued);
        let rest = deliver(&mut q, 5000);
        assert_eq!(rest.first(), Some(&2001));
        assert_eq!(rest.last(), Some(&3001));
        assert_eq!(rest.len(), 1001);
    }
}
