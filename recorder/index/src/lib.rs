//! The search index of psm recordings: which line was typed or shown, in which session, when.
//!
//! psm-recorder feeds each recording's bytes to a [`Collector`] as it writes them and hands the
//! finished lines to an [`IndexWriter`] in batches (one transaction each, at each chunk flush);
//! psmctl opens the same database read-only with [`IndexReader`] to search it. The database is
//! one SQLite file, `recordings/index.db` ([`INDEX_FILE`]), with an FTS5 table using the
//! `trigram` tokenizer, so any substring of three characters or more is found through the
//! index (shorter queries scan the candidate rows). A regex cannot use the index: the rows are
//! narrowed by the other filters first (user, target, time) and then matched one by one with
//! the `regex` crate, so its cost grows with the number of indexed lines of the recordings
//! that pass those filters.
//!
//! The index is derived data: [`IndexWriter::index_file`] rebuilds a recording's rows from its
//! file (`psmctl recordings reindex`). A damaged or missing index never stops recording.
//!
//! What it does not do: read sockets, decide anything, or keep lines in memory beyond one
//! batch; [`lines`] says what a line is and what it cannot see.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fuzz;
pub mod lines;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use psm_recorder_format::file::pack::looks_binary;
use psm_recorder_format::file::{Record, RecordingReader};
use psm_recorder_format::{wire, Direction, FormatError, RecordingMeta};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

pub use lines::{Kind, Line, LineSplitter};

/// Name of the index database, inside the recordings folder.
pub const INDEX_FILE: &str = "index.db";
/// Most streams (channel and direction) followed per recording; later ones are not indexed.
pub const MAX_STREAMS: usize = 64;
/// Most lines a [`Collector`] holds between two batches; beyond it lines are dropped and the
/// recording is marked partly indexed.
pub const MAX_PENDING: usize = 20_000;
/// Most hits a search returns.
pub const MAX_HITS: usize = 10_000;

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The index database does not exist.
    #[error("no search index at {0} (psmctl recordings reindex builds it)")]
    Missing(String),
    /// SQLite failed (damaged file, disk full, locked too long).
    #[error("search index: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A recording could not be read.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The regex does not compile.
    #[error("bad regex: {0}")]
    Regex(#[from] regex::Error),
    /// The SQLite library was built without FTS5.
    #[error("this SQLite has no FTS5")]
    NoFts5,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS recordings (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    user TEXT NOT NULL,
    account TEXT NOT NULL,
    target TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    partial INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS recordings_user ON recordings(user);
CREATE INDEX IF NOT EXISTS recordings_start ON recordings(start_ms);
CREATE VIRTUAL TABLE IF NOT EXISTS lines USING fts5(
    text, recording UNINDEXED, ts_us UNINDEXED, channel UNINDEXED, typed UNINDEXED,
    tokenize = 'trigram'
);
";

/// A finished line of one recording, ready to be indexed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexLine {
    /// SSH channel on the user side.
    pub channel: u32,
    /// Typed by the user (input) rather than shown on the screen.
    pub typed: bool,
    /// The line.
    pub line: Line,
}

/// Records shorter than this are always split (keystrokes, prompts); longer ones are checked
/// ([`looks_binary`], shared with the relay, which packs what it calls binary).
#[cfg(test)]
const BINARY_MIN: usize = 256;

/// Turns one recording's DATA records into lines, with bounded memory: one [`LineSplitter`]
/// per stream (at most [`MAX_STREAMS`]) and at most [`MAX_PENDING`] lines between batches.
///
/// For an RDP recording ([`Collector::for_meta`]) the raw PDUs
/// ([`wire::rdp::RDP_PDU_CHANNEL`]) are not text and are skipped; the typed text
/// ([`wire::rdp::RDP_KEYS_CHANNEL`], input) is split like an SSH session's input, and each
/// session event ([`wire::rdp::RDP_EVENTS_CHANNEL`]) is one shown line.
#[derive(Debug, Default)]
pub struct Collector {
    rdp: bool,
    streams: HashMap<(u32, bool), LineSplitter>,
    pending: Vec<IndexLine>,
    scratch: Vec<Line>,
    /// Lines or streams were dropped.
    pub partial: bool,
}

impl Collector {
    /// An empty collector for an SSH recording.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty collector for the recording `meta` describes (SSH or RDP).
    pub fn for_meta(meta: &RecordingMeta) -> Self {
        Collector {
            rdp: meta.protocol == wire::rdp::PROTOCOL,
            ..Self::default()
        }
    }

    /// Feeds one DATA record's bytes.
    pub fn feed(&mut self, ts_us: u64, channel: u32, direction: Direction, data: &[u8]) {
        if self.rdp {
            match channel {
                wire::rdp::RDP_PDU_CHANNEL => return,
                wire::rdp::RDP_EVENTS_CHANNEL if !data.ends_with(b"\n") => {
                    // one event a record, with or without its line end
                    self.feed_stream(ts_us, channel, direction, data);
                    self.feed_stream(ts_us, channel, direction, b"\n");
                    return;
                }
                _ => {}
            }
        }
        self.feed_stream(ts_us, channel, direction, data);
    }

    fn feed_stream(&mut self, ts_us: u64, channel: u32, direction: Direction, data: &[u8]) {
        if looks_binary(data) {
            // a file going through scp, sftp or `cat`: no line a person would search for, and
            // splitting it would cost the recorder far more than writing it
            return;
        }
        let typed = direction == Direction::Input;
        let key = (channel, typed);
        if !self.streams.contains_key(&key) && self.streams.len() >= MAX_STREAMS {
            self.partial = true;
            return;
        }
        let splitter = self
            .streams
            .entry(key)
            .or_insert_with(|| LineSplitter::new(if typed { Kind::Input } else { Kind::Output }));
        self.scratch.clear();
        splitter.feed(ts_us, data, &mut self.scratch);
        self.keep(channel, typed);
    }

    fn keep(&mut self, channel: u32, typed: bool) {
        for line in self.scratch.drain(..) {
            if self.pending.len() >= MAX_PENDING {
                self.partial = true;
                continue;
            }
            self.pending.push(IndexLine {
                channel,
                typed,
                line,
            });
        }
    }

    /// Feeds a record (only DATA carries text).
    pub fn record(&mut self, rec: &Record) {
        if let Record::Data {
            ts_us,
            channel,
            direction,
            data,
        } = rec
        {
            self.feed(*ts_us, *channel, *direction, data);
        }
    }

    /// Ends every stream: their unfinished lines become pending.
    pub fn finish(&mut self) {
        let mut keys: Vec<_> = self.streams.keys().copied().collect();
        keys.sort();
        for key in keys {
            if let Some(mut s) = self.streams.remove(&key) {
                self.scratch.clear();
                s.finish(&mut self.scratch);
                self.keep(key.0, key.1);
            }
        }
    }

    /// Takes the lines finished so far.
    pub fn take(&mut self) -> Vec<IndexLine> {
        std::mem::take(&mut self.pending)
    }

    /// Lines waiting to be taken.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The index, opened for writing (psm-recorder, or `psmctl recordings reindex`).
pub struct IndexWriter {
    conn: Connection,
}

impl IndexWriter {
    /// Opens (creating if needed) the index at `path`.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.execute_batch(SCHEMA).map_err(|e| {
            if e.to_string().contains("fts5") {
                IndexError::NoFts5
            } else {
                IndexError::Sql(e)
            }
        })?;
        Ok(IndexWriter { conn })
    }

    /// Starts (or restarts) a recording: its row is written and any lines it had are removed.
    pub fn begin(&mut self, meta: &RecordingMeta) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM lines WHERE recording = ?1",
            params![meta.recording_id],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO recordings (id, session_id, user, account, target, start_ms, partial)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
            params![
                meta.recording_id,
                meta.session_id,
                meta.user,
                meta.account,
                meta.target,
                meta.start_ms as i64
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ids of the indexed recordings.
    pub fn ids(&self) -> Result<Vec<String>, IndexError> {
        let mut st = self.conn.prepare("SELECT id FROM recordings ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a recording and its lines (retention deleted its file); returns whether the
    /// index had it.
    pub fn forget(&mut self, recording_id: &str) -> Result<bool, IndexError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM lines WHERE recording = ?1",
            params![recording_id],
        )?;
        let rows = tx.execute(
            "DELETE FROM recordings WHERE id = ?1",
            params![recording_id],
        )?;
        tx.commit()?;
        Ok(rows > 0)
    }

    /// Adds a batch of a recording's lines in one transaction; `partial` marks the recording
    /// as not completely indexed.
    pub fn add(
        &mut self,
        recording_id: &str,
        lines: &[IndexLine],
        partial: bool,
    ) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO lines (text, recording, ts_us, channel, typed) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for l in lines {
                insert.execute(params![
                    l.line.text,
                    recording_id,
                    l.line.ts_us as i64,
                    l.channel,
                    l.typed
                ])?;
            }
        }
        if partial {
            tx.execute(
                "UPDATE recordings SET partial = 1 WHERE id = ?1",
                params![recording_id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Indexes a whole recording from its bytes (replacing what the index had of it); returns
    /// the number of lines. A damaged or truncated recording is indexed up to where it reads.
    pub fn index_reader<R: Read>(&mut self, reader: R) -> Result<u64, IndexError> {
        self.index_recording(RecordingReader::open(reader)?)
    }

    /// Indexes a recording already opened (an encrypted one, with its key), as
    /// [`index_reader`](Self::index_reader).
    pub fn index_recording<R: Read>(
        &mut self,
        mut reader: RecordingReader<R>,
    ) -> Result<u64, IndexError> {
        let meta = reader.meta().clone();
        self.begin(&meta)?;
        let mut c = Collector::for_meta(&meta);
        let mut count = 0u64;
        loop {
            match reader.next_record() {
                Ok(Some(rec)) => c.record(&rec),
                Ok(None) | Err(_) => break,
            }
            if c.pending() >= 4096 {
                let batch = c.take();
                count += batch.len() as u64;
                self.add(&meta.recording_id, &batch, false)?;
            }
        }
        c.finish();
        let batch = c.take();
        count += batch.len() as u64;
        self.add(&meta.recording_id, &batch, c.partial)?;
        Ok(count)
    }

    /// Indexes the recording file at `path`, as [`index_reader`](Self::index_reader).
    pub fn index_file(&mut self, path: &Path) -> Result<u64, IndexError> {
        let f = std::fs::File::open(path).map_err(FormatError::Io)?;
        self.index_reader(std::io::BufReader::new(f))
    }
}

/// What to search for.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// A substring (case-insensitive for ASCII), or with `regex` a regular expression.
    pub text: String,
    /// `text` is a regex.
    pub regex: bool,
    /// Only this psm user's sessions.
    pub user: Option<String>,
    /// Only sessions to this target (`target` or `account@target`).
    pub target: Option<String>,
    /// Only lines at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Only lines before this time (ms since the Unix epoch).
    pub until_ms: Option<u64>,
}

/// A line found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Recording id.
    pub recording_id: String,
    /// Session id.
    pub session_id: String,
    /// psm user.
    pub user: String,
    /// Target account.
    pub account: String,
    /// Target.
    pub target: String,
    /// When the session started (ms since the Unix epoch).
    pub start_ms: u64,
    /// Offset in the session, microseconds.
    pub ts_us: u64,
    /// SSH channel.
    pub channel: u32,
    /// Typed (input) rather than shown.
    pub typed: bool,
    /// The line as indexed (peer-chosen text: escape it before printing).
    pub text: String,
}

/// The index, opened read-only (psmctl).
pub struct IndexReader {
    conn: Connection,
}

impl IndexReader {
    /// Opens the index at `path` read-only; [`IndexError::Missing`] when there is none.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        if !path.exists() {
            return Err(IndexError::Missing(path.display().to_string()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        // a damaged file shows here rather than half-way through a search
        conn.query_row("SELECT count(*) FROM recordings", [], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?;
        Ok(IndexReader { conn })
    }

    /// Recordings that are not completely indexed (lines dropped past the bounds).
    pub fn partial(&self) -> Result<Vec<String>, IndexError> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM recordings WHERE partial = 1 ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Ids of the indexed recordings.
    pub fn recordings(&self) -> Result<Vec<String>, IndexError> {
        let mut st = self.conn.prepare("SELECT id FROM recordings ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Runs a query; hits in session start order, then time in the session. At most
    /// [`MAX_HITS`].
    pub fn search(&self, q: &Query) -> Result<Vec<Hit>, IndexError> {
        let re = if q.regex {
            Some(
                regex::RegexBuilder::new(&q.text)
                    .size_limit(1 << 20)
                    .build()?,
            )
        } else {
            None
        };
        let use_fts = !q.regex && q.text.chars().count() >= 3;
        let mut sql = String::from(
            "SELECT r.id, r.session_id, r.user, r.account, r.target, r.start_ms,
                    l.ts_us, l.channel, l.typed, l.text
             FROM lines l JOIN recordings r ON r.id = l.recording WHERE 1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if use_fts {
            sql.push_str(" AND l.text MATCH ?");
            args.push(format!("\"{}\"", q.text.replace('"', "\"\"")).into());
        } else if !q.regex {
            sql.push_str(" AND instr(lower(l.text), lower(?)) > 0");
            args.push(q.text.clone().into());
        }
        if let Some(u) = &q.user {
            sql.push_str(" AND r.user = ?");
            args.push(u.clone().into());
        }
        if let Some(t) = &q.target {
            if let Some((acct, target)) = t.split_once('@') {
                sql.push_str(" AND r.account = ? AND r.target = ?");
                args.push(acct.to_string().into());
                args.push(target.to_string().into());
            } else {
                sql.push_str(" AND r.target = ?");
                args.push(t.clone().into());
            }
        }
        if let Some(s) = q.since_ms {
            sql.push_str(" AND r.start_ms + l.ts_us / 1000 >= ?");
            args.push((s as i64).into());
        }
        if let Some(u) = q.until_ms {
            sql.push_str(" AND r.start_ms + l.ts_us / 1000 < ?");
            args.push((u as i64).into());
        }
        sql.push_str(" ORDER BY r.start_ms, r.id, l.ts_us, l.rowid");
        let mut st = self.conn.prepare(&sql)?;
        let mut rows = st.query(rusqlite::params_from_iter(args))?;
        let mut hits = Vec::new();
        while let Some(row) = rows.next()? {
            let text: String = row.get(9)?;
            if let Some(re) = &re {
                if !re.is_match(&text) {
                    continue;
                }
            }
            hits.push(Hit {
                recording_id: row.get(0)?,
                session_id: row.get(1)?,
                user: row.get(2)?,
                account: row.get(3)?,
                target: row.get(4)?,
                start_ms: row.get::<_, i64>(5)? as u64,
                ts_us: row.get::<_, i64>(6)? as u64,
                channel: row.get(7)?,
                typed: row.get(8)?,
                text,
            });
            if hits.len() >= MAX_HITS {
                break;
            }
        }
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use psm_recorder_format::file::RecordingWriter;

    fn meta(id: &str, user: &str, target: &str, start_ms: u64) -> RecordingMeta {
        RecordingMeta {
            recording_id: id.into(),
            session_id: format!("s-{id}"),
            user: user.into(),
            account: "root".into(),
            target: target.into(),
            start_ms,
            ..Default::default()
        }
    }

    fn recording(m: &RecordingMeta, recs: &[(u64, Direction, &[u8])]) -> Vec<u8> {
        let mut w = RecordingWriter::new(Vec::new(), m).expect("new");
        for (ts, d, b) in recs {
            w.write(&Record::Data {
                ts_us: *ts,
                channel: 0,
                direction: *d,
                data: Bytes::copy_from_slice(b),
            })
            .expect("write");
        }
        w.finish().expect("finish")
    }

    fn index() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INDEX_FILE);
        let mut w = IndexWriter::open(&path).expect("open");
        let a = recording(
            &meta("a", "alice", "db1", 1_000_000),
            &[
                (1_000_000, Direction::Input, b"cat /etc/shadow\r"),
                (1_100_000, Direction::Output, b"root:$6$xyz:19000::\r\n"),
                (5_000_000, Direction::Input, b"exit\r"),
            ],
        );
        let b = recording(
            &meta("b", "bob", "web1", 2_000_000),
            &[
                (
                    90_000_000,
                    Direction::Output,
                    b"\x1b[31mERROR disk full\x1b[0m\r\n",
                ),
                (91_000_000, Direction::Input, b"sudo rm -rf /tmp/x\r"),
            ],
        );
        assert_eq!(w.index_reader(&a[..]).expect("a"), 3);
        assert_eq!(w.index_reader(&b[..]).expect("b"), 2);
        // indexing again replaces rather than duplicates
        assert_eq!(w.index_reader(&a[..]).expect("a again"), 3);
        (dir, path)
    }

    fn q(text: &str) -> Query {
        Query {
            text: text.into(),
            ..Default::default()
        }
    }

    #[test]
    fn fts5_is_compiled_in() {
        let c = Connection::open_in_memory().expect("mem");
        c.execute_batch("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='trigram')")
            .expect("fts5 with trigram");
    }

    #[test]
    fn finds_typed_and_shown_text() {
        let (_d, path) = index();
        let r = IndexReader::open(&path).expect("reader");
        let hits = r.search(&q("/etc/shadow")).expect("search");
        assert_eq!(hits.len(), 1);
        assert!(hits[0].typed);
        assert_eq!(hits[0].ts_us, 1_000_000);
        assert_eq!(hits[0].user, "alice");
        let hits = r.search(&q("disk full")).expect("search");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].text, "ERROR disk full");
        assert!(!hits[0].typed);
        // case-insensitive, and short queries work without the index
        assert_eq!(r.search(&q("error")).expect("s").len(), 1);
        assert_eq!(r.search(&q("rm")).expect("s").len(), 1);
        assert!(r.search(&q("nothing like it")).expect("s").is_empty());
        // quotes in the query are text, not FTS syntax
        assert!(r.search(&q("\"a\" OR b")).expect("s").is_empty());
    }

    #[test]
    fn filters() {
        let (_d, path) = index();
        let r = IndexReader::open(&path).expect("reader");
        let mut query = q("r");
        assert_eq!(r.search(&query).expect("s").len(), 3);
        query.user = Some("bob".into());
        assert_eq!(r.search(&query).expect("s").len(), 2);
        query.user = None;
        query.target = Some("root@db1".into());
        assert_eq!(r.search(&query).expect("s").len(), 1);
        query.target = Some("web1".into());
        assert_eq!(r.search(&query).expect("s").len(), 2);
        query.target = None;
        // b started at 2_000_000 ms; its lines are at +90 s and +91 s
        query.since_ms = Some(2_090_500);
        let hits = r.search(&query).expect("s");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].text, "sudo rm -rf /tmp/x");
        query.since_ms = None;
        query.until_ms = Some(1_002_000);
        assert_eq!(r.search(&query).expect("s").len(), 1);
    }

    #[test]
    fn a_forgotten_recording_is_no_longer_found() {
        let (_d, path) = index();
        let mut w = IndexWriter::open(&path).expect("writer");
        assert!(w.forget("a").expect("forget"));
        assert!(!w.forget("a").expect("forget twice"), "already gone");
        assert_eq!(w.ids().expect("ids"), vec!["b".to_string()]);
        let r = IndexReader::open(&path).expect("reader");
        assert_eq!(r.recordings().expect("ids"), vec!["b".to_string()]);
        assert!(r.search(&q("/etc/shadow")).expect("s").is_empty());
        assert_eq!(r.search(&q("disk full")).expect("s").len(), 1);
    }

    #[test]
    fn regex_filters_candidates() {
        let (_d, path) = index();
        let r = IndexReader::open(&path).expect("reader");
        let mut query = q(r"rm\s+-rf\s+/\S+");
        query.regex = true;
        let hits = r.search(&query).expect("s");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].recording_id, "b");
        query.text = "(".into();
        assert!(matches!(r.search(&query), Err(IndexError::Regex(_))));
    }

    #[test]
    fn missing_and_damaged_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INDEX_FILE);
        assert!(matches!(
            IndexReader::open(&path),
            Err(IndexError::Missing(_))
        ));
        std::fs::write(&path, b"not a database at all, just some bytes here...").expect("w");
        assert!(IndexReader::open(&path).is_err());
    }

    #[test]
    fn rdp_recordings_index_typed_text_and_events_not_raw_pdus() {
        use wire::rdp::{RDP_EVENTS_CHANNEL, RDP_KEYS_CHANNEL, RDP_PDU_CHANNEL};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INDEX_FILE);
        let mut w = IndexWriter::open(&path).expect("open");
        let m = RecordingMeta {
            protocol: wire::rdp::PROTOCOL.into(),
            ..meta("r", "carol", "win01", 3_000_000)
        };
        let mut rw = RecordingWriter::new(Vec::new(), &m).expect("new");
        let recs: [(u64, u32, Direction, &[u8]); 6] = [
            (
                1,
                RDP_EVENTS_CHANNEL,
                Direction::Output,
                b"connected 1024x768",
            ),
            (
                2,
                RDP_PDU_CHANNEL,
                Direction::Output,
                b"\x03\x00\x00\x10 pdu-bytes-here\n",
            ),
            (
                3,
                RDP_PDU_CHANNEL,
                Direction::Input,
                b"\x03\x00\x00\x10 pdu-bytes-typed\r",
            ),
            (4, RDP_KEYS_CHANNEL, Direction::Input, b"notepad.exe\r"),
            (
                5,
                RDP_EVENTS_CHANNEL,
                Direction::Output,
                b"clipboard refused by policy",
            ),
            (6, RDP_KEYS_CHANNEL, Direction::Input, b"net user"),
        ];
        for (ts, channel, direction, data) in recs {
            rw.write(&Record::Data {
                ts_us: ts,
                channel,
                direction,
                data: Bytes::copy_from_slice(data),
            })
            .expect("write");
        }
        let rec = rw.finish().expect("finish");
        assert_eq!(w.index_reader(&rec[..]).expect("index"), 4);
        let r = IndexReader::open(&path).expect("reader");
        let hits = r.search(&q("notepad")).expect("search");
        assert_eq!(hits.len(), 1);
        assert!(hits[0].typed);
        assert_eq!(hits[0].text, "notepad.exe");
        let hits = r.search(&q("clipboard refused")).expect("search");
        assert_eq!(hits.len(), 1);
        assert!(!hits[0].typed);
        assert_eq!(hits[0].ts_us, 5);
        assert_eq!(r.search(&q("connected")).expect("search").len(), 1);
        assert_eq!(r.search(&q("net user")).expect("search").len(), 1);
        assert!(r.search(&q("pdu-bytes")).expect("search").is_empty());
    }

    #[test]
    fn binary_records_are_not_split_into_lines() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut random = vec![0u8; 32 * 1024];
        for b in random.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        let mut c = Collector::new();
        c.feed(0, 0, Direction::Output, &random);
        assert_eq!(c.pending(), 0, "random bytes give no lines");
        let mut nul_text = b"text\n".repeat(100);
        nul_text[7] = 0;
        c.feed(1, 0, Direction::Output, &nul_text);
        assert_eq!(c.pending(), 0, "a NUL makes a record binary");
        // text, UTF-8 cut at both ends of the record, and escape sequences: still lines
        let mut text = "é".as_bytes()[1..].to_vec();
        text.extend("\x1b[1mbold\x1b[0m ünïcode line\n".repeat(20).as_bytes());
        text.extend(&"é".as_bytes()[..1]);
        assert!(text.len() >= BINARY_MIN);
        c.feed(2, 0, Direction::Output, &text);
        assert_eq!(c.pending(), 20);
        assert!(!looks_binary(b"short \x00 records are always split"));
        assert!(!c.partial);
    }

    #[test]
    fn collector_bounds() {
        let mut c = Collector::new();
        for ch in 0..(MAX_STREAMS as u32 + 5) {
            c.feed(0, ch, Direction::Output, b"x y z\n");
        }
        assert!(c.partial);
        assert_eq!(c.pending(), MAX_STREAMS);
        let mut c = Collector::new();
        for _ in 0..MAX_PENDING + 3 {
            c.feed(0, 0, Direction::Output, b"line\n");
        }
        assert_eq!(c.pending(), MAX_PENDING);
        assert!(c.partial);
    }
}
