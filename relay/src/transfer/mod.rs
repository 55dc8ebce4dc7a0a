//! File transfers read from the bytes of a channel as they pass: SFTP (the `sftp` subsystem,
//! which OpenSSH 9's `scp` speaks too) and the legacy SCP protocol (`scp -O`: an exec of
//! `scp -t` or `scp -f`).
//!
//! What it does: turns the bytes each way into one [`Event`] per file operation (a file read,
//! written, removed, renamed…), with the path, the bytes of content that passed and their
//! SHA-256, computed as they pass. Content that does not pass whole and in order from the
//! start of the file (random access, a resumed transfer, one cut short) is marked partial and
//! not hashed.
//!
//! What it does not do: any I/O, or anything to the bytes. It reads copies; the relay forwards
//! the same bytes whatever happens here. Its memory is bounded whatever the peers send: file
//! data streams through the hash and is never held, every other packet or line it reads whole is
//! capped, and so are the requests and handles it tracks. On anything it cannot follow it stops
//! reading that channel for good and says why once ([`Fed::gave_up`]); what was in flight is
//! reported then, marked partial.

pub mod scp;
pub mod sftp;

use ring::digest;

/// One file operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `read`, `write`, `open`, `remove`, `rename`, `mkdir`, `rmdir`, `setstat`, `symlink`,
    /// `link` (see `psm_control_api::AuditKind::FileTransfer`).
    pub operation: &'static str,
    /// The path, as the peer named it.
    pub path: String,
    /// The second path (rename, symlink, link; scp: the name the sending side gave).
    pub path2: Option<String>,
    /// Bytes of content that passed.
    pub bytes: u64,
    /// SHA-256 of that content, hex, when it is the whole file in order.
    pub sha256: Option<String>,
    /// The content that passed is not the whole file in order.
    pub partial: bool,
    /// Why there is no hash, or what else is worth knowing.
    pub note: Option<String>,
    /// Whether the peers reported success.
    pub ok: bool,
    /// What a peer reported on failure.
    pub status: Option<String>,
}

impl Event {
    fn new(operation: &'static str, path: String) -> Event {
        Event {
            operation,
            path,
            path2: None,
            bytes: 0,
            sha256: None,
            partial: false,
            note: None,
            ok: true,
            status: None,
        }
    }

    fn failed(mut self, status: impl Into<String>) -> Event {
        self.ok = false;
        self.status = Some(status.into());
        self
    }
}

/// What feeding bytes produced.
#[derive(Debug, Default)]
pub struct Fed {
    /// File operations completed.
    pub events: Vec<Event>,
    /// The parser stopped here, for this reason (reported once; it reads nothing more).
    pub gave_up: Option<String>,
}

/// Longest path kept, in bytes (longer ones are cut, marked).
pub const MAX_PATH: usize = 4096;
/// Longest peer message (an SFTP status text, an scp error line) kept, in bytes.
pub const MAX_MESSAGE: usize = 512;

/// Peer bytes as a string for the audit log: lossy UTF-8, cut at `max` bytes (marked).
pub(crate) fn text(b: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(b);
    let (kept, cut) = psm_control_api::escape::truncate(&s, max);
    if cut {
        format!("{kept}…[truncated, {} bytes]", b.len())
    } else {
        kept.to_string()
    }
}

/// The content of one file as it passes: its bytes, and its SHA-256 while it passes in order
/// from offset 0.
pub(crate) struct Content {
    bytes: u64,
    next: u64,
    started: bool,
    hash: Option<digest::Context>,
    /// Why it is not hashed.
    broken: Option<String>,
}

impl Content {
    pub(crate) fn new() -> Content {
        Content {
            bytes: 0,
            next: 0,
            started: false,
            hash: Some(digest::Context::new(&digest::SHA256)),
            broken: None,
        }
    }

    /// A piece starts at `offset`: hashing goes on only if it follows what came before.
    pub(crate) fn at(&mut self, offset: u64, what: &str) {
        if !self.started {
            self.started = true;
            if offset != 0 {
                self.stop(format!("{what} started at offset {offset}"));
            }
        } else if offset != self.next {
            self.stop(format!(
                "{what} not in order (offset {offset} after {})",
                self.next
            ));
        }
        self.next = offset;
    }

    /// Bytes of the current piece.
    pub(crate) fn feed(&mut self, data: &[u8]) {
        if let Some(h) = &mut self.hash {
            h.update(data);
        }
        self.started = true;
        self.bytes += data.len() as u64;
        self.next = self.next.saturating_add(data.len() as u64);
    }

    /// Hashing stops, for this reason (the first one is kept).
    pub(crate) fn stop(&mut self, why: String) {
        self.hash = None;
        if self.broken.is_none() {
            self.broken = Some(why);
        }
    }

    pub(crate) fn started(&self) -> bool {
        self.started
    }

    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Fills `e`'s bytes, hash, partial flag and note.
    pub(crate) fn finish(self, e: &mut Event) {
        e.bytes = self.bytes;
        match (self.hash, self.broken) {
            (Some(h), None) => e.sha256 = Some(hex(h.finish().as_ref())),
            (_, why) => {
                e.partial = true;
                e.note = why.or_else(|| Some("not hashed".into()));
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

/// The parser of one channel.
pub enum Transfer {
    /// An `sftp` subsystem.
    Sftp(Box<sftp::Sftp>),
    /// A legacy `scp -t` / `scp -f`.
    Scp(Box<scp::Scp>),
    /// Gave up, or finished.
    Stopped,
}

impl Transfer {
    /// The parser for an `sftp` subsystem channel.
    pub fn sftp() -> Transfer {
        Transfer::Sftp(Box::default())
    }

    /// The parser for an exec channel running `command`, when it is a legacy scp.
    pub fn scp(command: &str) -> Option<Transfer> {
        scp::Scp::from_command(command).map(|s| Transfer::Scp(Box::new(s)))
    }

    /// `sftp` or `scp`.
    pub fn protocol(&self) -> &'static str {
        match self {
            Transfer::Scp(_) => "scp",
            _ => "sftp",
        }
    }

    /// Bytes from the user toward the target.
    pub fn up(&mut self, data: &[u8]) -> Fed {
        self.step(|t, out| match t {
            Transfer::Sftp(s) => s.up(data, out),
            Transfer::Scp(s) => s.up(data, out),
            Transfer::Stopped => Ok(()),
        })
    }

    /// Bytes from the target toward the user.
    pub fn down(&mut self, data: &[u8]) -> Fed {
        self.step(|t, out| match t {
            Transfer::Sftp(s) => s.down(data, out),
            Transfer::Scp(s) => s.down(data, out),
            Transfer::Stopped => Ok(()),
        })
    }

    /// The channel ended: what was in flight, reported as such.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        match std::mem::replace(self, Transfer::Stopped) {
            Transfer::Sftp(s) => s.finish("the channel ended", &mut out),
            Transfer::Scp(s) => s.finish("the channel ended", &mut out),
            Transfer::Stopped => {}
        }
        out
    }

    fn step(
        &mut self,
        f: impl FnOnce(&mut Transfer, &mut Vec<Event>) -> Result<(), String>,
    ) -> Fed {
        let mut fed = Fed::default();
        if let Err(why) = f(self, &mut fed.events) {
            let note = format!("psm stopped reading the channel: {why}");
            match std::mem::replace(self, Transfer::Stopped) {
                Transfer::Sftp(s) => s.finish(&note, &mut fed.events),
                Transfer::Scp(s) => s.finish(&note, &mut fed.events),
                Transfer::Stopped => {}
            }
            fed.gave_up = Some(why);
        }
        fed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hashes_in_order_only() {
        let mut c = Content::new();
        c.at(0, "writes");
        c.feed(b"hello ");
        c.at(6, "writes");
        c.feed(b"world");
        let mut e = Event::new("write", "/f".into());
        c.finish(&mut e);
        assert_eq!(e.bytes, 11);
        assert_eq!(
            e.sha256.as_deref(),
            Some("b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9")
        );
        assert!(!e.partial);

        let mut c = Content::new();
        c.at(0, "writes");
        c.feed(b"abc");
        c.at(10, "writes");
        c.feed(b"def");
        let mut e = Event::new("write", "/f".into());
        c.finish(&mut e);
        assert_eq!((e.bytes, e.sha256.is_none(), e.partial), (6, true, true));
        assert!(e.note.as_deref().unwrap_or("").contains("not in order"));

        let mut c = Content::new();
        c.at(5, "reads");
        c.feed(b"x");
        let mut e = Event::new("read", "/f".into());
        c.finish(&mut e);
        assert!(e.partial && e.note.as_deref().unwrap_or("").contains("offset 5"));
    }

    #[test]
    fn long_paths_are_cut_and_marked() {
        let long = vec![b'a'; MAX_PATH + 10];
        let t = text(&long, MAX_PATH);
        assert!(
            t.starts_with("aaaa") && t.ends_with(&format!("[truncated, {} bytes]", MAX_PATH + 10))
        );
        assert_eq!(text(b"/tmp/\xff", MAX_PATH), "/tmp/\u{fffd}");
    }
}
