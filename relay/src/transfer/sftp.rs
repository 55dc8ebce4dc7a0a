//! SFTP version 3 (draft-ietf-secsh-filexfer-02, as OpenSSH speaks it), read both ways.
//!
//! Requests (user → target) are remembered by id until their reply (target → user) says how
//! they went; open files are tracked by handle from the `HANDLE` reply to the `CLOSE`'s reply,
//! which ends them as one event per direction content moved in. `WRITE` and `DATA` payloads
//! stream through the file's hash and are never held; every other packet psm reads is held
//! whole up to [`MAX_WHOLE`] bytes, and the rest (listings, attributes, …) are skipped
//! unread. Requests psm does not report (`STAT`, `READDIR`, …) are not remembered.

use std::collections::HashMap;

mod wire;

use super::{Content, Event};
use wire::*;

/// Longest packet psm reads whole (a request with its paths, a status reply). OpenSSH's
/// sftp-server takes messages of up to 256 KiB, but those that carry paths stay far below.
pub const MAX_WHOLE: usize = 64 * 1024;
/// Longest handle (OpenSSH's are 4 bytes; the protocol says at most 256).
pub const MAX_HANDLE: usize = 256;
/// Files open at once that psm tracks.
pub const MAX_HANDLES: usize = 256;
/// Requests awaiting their reply that psm remembers (OpenSSH's client has 64 in flight).
pub const MAX_PENDING: usize = 4096;
/// Bytes of paths and handles held for pending requests and open files.
pub const MAX_HELD: usize = 1024 * 1024;

/// What a request asked, remembered until its reply.
enum Pending {
    Open {
        path: String,
        flags: u32,
    },
    Read {
        handle: Vec<u8>,
        offset: u64,
    },
    Write {
        handle: Vec<u8>,
    },
    Close {
        handle: Vec<u8>,
    },
    /// Reported as one event when its status arrives.
    Op(Event),
}

impl Pending {
    /// Bytes it holds, against [`MAX_HELD`].
    fn weight(&self) -> usize {
        32 + match self {
            Pending::Open { path, .. } => path.len(),
            Pending::Read { handle, .. }
            | Pending::Write { handle }
            | Pending::Close { handle } => handle.len(),
            Pending::Op(e) => {
                e.path.len()
                    + e.path2.as_ref().map_or(0, String::len)
                    + e.note.as_ref().map_or(0, String::len)
            }
        }
    }
}

/// An open file.
struct File {
    path: String,
    flags: u32,
    read: Content,
    written: Content,
    /// The read reached the end of the file (an `EOF` status where the content stopped).
    eof: bool,
    /// The first failure of a read or write on it.
    error: Option<String>,
}

impl File {
    fn weight(&self, handle: &[u8]) -> usize {
        64 + self.path.len() + handle.len()
    }

    /// Its events: one per direction content moved in, or one `open` when none did.
    fn finish(mut self, ok: bool, status: Option<String>, out: &mut Vec<Event>) {
        let (ok, status) = match (ok, self.error.take()) {
            (true, Some(e)) => (false, Some(e)),
            (ok, e) => (ok, status.or(e)),
        };
        let done = |mut e: Event, out: &mut Vec<Event>| {
            e.ok = ok;
            e.status = status.clone();
            out.push(e);
        };
        let wrote = self.written.started()
            || (self.flags & FXF_WRITE != 0 && self.flags & FXF_TRUNC != 0 && !self.read.started());
        let read = self.read.started();
        if wrote {
            let mut e = Event::new("write", self.path.clone());
            self.written.finish(&mut e);
            if self.flags & FXF_APPEND != 0 {
                e.partial = true;
                e.sha256 = None;
                e.note.get_or_insert_with(|| "appended to the file".into());
            }
            done(e, out);
        }
        if read {
            if !self.eof {
                let at = self.read.next();
                self.read.stop(format!(
                    "reading stopped before the end of the file (at {at})"
                ));
            }
            let mut e = Event::new("read", self.path.clone());
            self.read.finish(&mut e);
            done(e, out);
        }
        if !wrote && !read {
            let mut e = Event::new("open", self.path.clone());
            e.note = Some(format!("opened for {}", flags_text(self.flags)));
            done(e, out);
        }
    }
}

/// The SFTP reader of one channel.
pub struct Sftp {
    up: Rx,
    down: Rx,
    pending: HashMap<u32, Pending>,
    files: HashMap<Vec<u8>, File>,
    held: usize,
}

impl Default for Sftp {
    fn default() -> Self {
        Sftp::new()
    }
}

impl Sftp {
    /// A channel whose subsystem is about to start.
    pub fn new() -> Sftp {
        Sftp {
            up: Rx::new(),
            down: Rx::new(),
            pending: HashMap::new(),
            files: HashMap::new(),
            held: 0,
        }
    }

    /// Bytes from the user.
    pub fn up(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        self.feed(From::User, data, out)
    }

    /// Bytes from the target.
    pub fn down(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        self.feed(From::Target, data, out)
    }

    /// The channel ended (or psm gave up, `why`): open files and unanswered requests.
    pub fn finish(mut self, why: &str, out: &mut Vec<Event>) {
        let mut files: Vec<(Vec<u8>, File)> = self.files.drain().collect();
        files.sort_by(|a, b| a.1.path.cmp(&b.1.path));
        for (_, f) in files {
            f.finish(false, Some(format!("not closed: {why}")), out);
        }
        let mut pending: Vec<(u32, Pending)> = self.pending.drain().collect();
        pending.sort_by_key(|p| p.0);
        for (_, p) in pending {
            let status = format!("no reply: {why}");
            match p {
                Pending::Op(e) => out.push(e.failed(status)),
                Pending::Open { path, flags } => out.push(open_failed(path, flags, status)),
                _ => {}
            }
        }
    }

    fn rx(&mut self, from: From) -> &mut Rx {
        match from {
            From::User => &mut self.up,
            From::Target => &mut self.down,
        }
    }

    fn feed(&mut self, from: From, mut data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        loop {
            let rx = match from {
                From::User => &mut self.up,
                From::Target => &mut self.down,
            };
            // a head is looked at again once complete, even with nothing more to read
            if data.is_empty() && !matches!(rx.st, St::Head) {
                return Ok(());
            }
            match &mut rx.st {
                St::Skip { left } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        rx.next_packet();
                    }
                }
                St::Stream { left, sink } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    *left -= n as u64;
                    let (chunk, rest) = data.split_at(n);
                    data = rest;
                    let end = *left == 0;
                    let file = match sink {
                        Sink::None => None,
                        Sink::Read(h) => self.files.get_mut(h.as_slice()).map(|f| &mut f.read),
                        Sink::Write(h) => self.files.get_mut(h.as_slice()).map(|f| &mut f.written),
                    };
                    if let Some(c) = file {
                        c.feed(chunk);
                    }
                    if end {
                        rx.next_packet();
                    }
                }
                St::Head => match head(&rx.buf, from)? {
                    Need::More(n) => {
                        if data.is_empty() {
                            return Ok(());
                        }
                        let n = n.min(data.len());
                        rx.buf.extend_from_slice(&data[..n]);
                        data = &data[n..];
                    }
                    Need::Skip(left) => rx.st = St::Skip { left },
                    Need::Whole => {
                        let buf = std::mem::take(&mut rx.buf);
                        let r = self.packet(from, &buf, out);
                        let rx = self.rx(from);
                        rx.buf = buf;
                        rx.next_packet();
                        r?;
                    }
                    Need::Write {
                        id,
                        handle,
                        offset,
                        data: left,
                    } => {
                        let sink = match self.files.get_mut(handle.as_slice()) {
                            Some(f) => {
                                f.written.at(offset, "writes");
                                self.remember(
                                    id,
                                    Pending::Write {
                                        handle: handle.clone(),
                                    },
                                )?;
                                Sink::Write(handle)
                            }
                            None => Sink::None,
                        };
                        self.start_stream(from, left, sink);
                    }
                    Need::Data { id, data: left } => {
                        let sink = match self.forget(id) {
                            Some(Pending::Read { handle, offset }) => {
                                match self.files.get_mut(handle.as_slice()) {
                                    Some(f) => {
                                        f.read.at(offset, "reads");
                                        Sink::Read(handle)
                                    }
                                    None => Sink::None,
                                }
                            }
                            Some(other) => {
                                // a DATA answering something else: put it back, read nothing
                                self.remember(id, other)?;
                                Sink::None
                            }
                            None => Sink::None,
                        };
                        self.start_stream(from, left, sink);
                    }
                },
            }
        }
    }

    fn start_stream(&mut self, from: From, left: u64, sink: Sink) {
        let rx = self.rx(from);
        if left == 0 {
            rx.next_packet();
        } else {
            rx.st = St::Stream { left, sink };
        }
    }

    fn remember(&mut self, id: u32, p: Pending) -> Result<(), String> {
        if let Some(old) = self.pending.remove(&id) {
            self.held = self.held.saturating_sub(old.weight());
        }
        if self.pending.len() >= MAX_PENDING {
            return Err(format!(
                "more than {MAX_PENDING} sftp requests awaiting a reply"
            ));
        }
        self.held += p.weight();
        if self.held > MAX_HELD {
            return Err(format!(
                "more than {MAX_HELD} bytes of paths awaiting replies or open"
            ));
        }
        self.pending.insert(id, p);
        Ok(())
    }

    fn forget(&mut self, id: u32) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        self.held = self.held.saturating_sub(p.weight());
        Some(p)
    }

    fn close(&mut self, handle: &[u8]) -> Option<File> {
        let f = self.files.remove(handle)?;
        self.held = self.held.saturating_sub(f.weight(handle));
        Some(f)
    }

    /// A packet read whole: `buf` is its length, type and body.
    fn packet(&mut self, from: From, buf: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        let typ = buf[4];
        let mut r = Rd(&buf[5..]);
        match from {
            From::User => self.request(typ, &mut r),
            From::Target => self.reply(typ, &mut r, out),
        }
    }

    fn request(&mut self, typ: u8, r: &mut Rd<'_>) -> Result<(), String> {
        if typ == INIT {
            return Ok(());
        }
        let id = r.u32()?;
        let p = match typ {
            OPEN => {
                let path = r.path()?;
                let flags = r.u32()?;
                Pending::Open { path, flags }
            }
            CLOSE => {
                let handle = r.handle()?;
                if !self.files.contains_key(&handle) {
                    return Ok(()); // a directory, or a handle psm does not track
                }
                Pending::Close { handle }
            }
            READ => {
                let handle = r.handle()?;
                let offset = r.u64()?;
                if !self.files.contains_key(&handle) {
                    return Ok(());
                }
                Pending::Read { handle, offset }
            }
            SETSTAT => {
                let path = r.path()?;
                let mut e = Event::new("setstat", path);
                e.note = Some(attrs_text(r)?);
                Pending::Op(e)
            }
            FSETSTAT => {
                let handle = r.handle()?;
                let Some(f) = self.files.get(&handle) else {
                    return Ok(());
                };
                let mut e = Event::new("setstat", f.path.clone());
                e.note = Some(attrs_text(r)?);
                Pending::Op(e)
            }
            REMOVE => Pending::Op(Event::new("remove", r.path()?)),
            MKDIR => {
                let mut e = Event::new("mkdir", r.path()?);
                let attrs = attrs_text(r)?;
                if !attrs.is_empty() {
                    e.note = Some(attrs);
                }
                Pending::Op(e)
            }
            RMDIR => Pending::Op(Event::new("rmdir", r.path()?)),
            RENAME => two("rename", r)?,
            SYMLINK => two("symlink", r)?,
            EXTENDED => {
                let name = r.string()?;
                match name {
                    b"posix-rename@openssh.com" => two("rename", r)?,
                    b"hardlink@openssh.com" => two("link", r)?,
                    b"lsetstat@openssh.com" => {
                        let mut e = Event::new("setstat", r.path()?);
                        e.note = Some(attrs_text(r)?);
                        Pending::Op(e)
                    }
                    b"copy-data" => {
                        let _from = r.handle()?;
                        let _from_offset = r.u64()?;
                        let _len = r.u64()?;
                        let to = r.handle()?;
                        let to_offset = r.u64()?;
                        if let Some(f) = self.files.get_mut(&to) {
                            f.written.at(to_offset, "writes");
                            f.written
                                .stop("content copied on the target (copy-data)".into());
                        }
                        return Ok(());
                    }
                    _ => return Ok(()),
                }
            }
            _ => return Ok(()),
        };
        self.remember(id, p)
    }

    fn reply(&mut self, typ: u8, r: &mut Rd<'_>, out: &mut Vec<Event>) -> Result<(), String> {
        match typ {
            VERSION => {
                let v = r.u32()?;
                if v != 3 {
                    return Err(format!("sftp version {v} (psm reads version 3)"));
                }
            }
            STATUS => {
                let id = r.u32()?;
                let code = r.u32()?;
                // OpenSSH always sends the message; very old servers may not
                let msg = r.string().unwrap_or_default();
                let Some(p) = self.forget(id) else {
                    return Ok(());
                };
                let failure = (code != FX_OK).then(|| status_text(code, msg));
                match p {
                    Pending::Op(e) => out.push(match failure {
                        Some(s) => e.failed(s),
                        None => e,
                    }),
                    Pending::Open { path, flags } => {
                        out.push(open_failed(path, flags, failure.unwrap_or_default()))
                    }
                    Pending::Read { handle, offset } => {
                        if let Some(f) = self.files.get_mut(&handle) {
                            if code == FX_EOF {
                                if !f.eof && (!f.read.started() || offset == f.read.next()) {
                                    f.read.at(offset, "reads");
                                    f.eof = true;
                                }
                            } else if let Some(s) = failure {
                                f.error.get_or_insert(s);
                            }
                        }
                    }
                    Pending::Write { handle } => {
                        if let (Some(f), Some(s)) = (self.files.get_mut(&handle), failure) {
                            f.error.get_or_insert(s);
                        }
                    }
                    Pending::Close { handle } => {
                        if let Some(f) = self.close(&handle) {
                            f.finish(code == FX_OK, failure, out);
                        }
                    }
                }
            }
            HANDLE => {
                let id = r.u32()?;
                let handle = r.handle()?;
                match self.forget(id) {
                    Some(Pending::Open { path, flags }) => {
                        if let Some(old) = self.close(&handle) {
                            old.finish(false, Some("its handle was reused".into()), out);
                        }
                        if self.files.len() >= MAX_HANDLES {
                            return Err(format!("more than {MAX_HANDLES} files open at once"));
                        }
                        let f = File {
                            path,
                            flags,
                            read: Content::new(),
                            written: Content::new(),
                            eof: false,
                            error: None,
                        };
                        self.held += f.weight(&handle);
                        if self.held > MAX_HELD {
                            return Err(format!(
                                "more than {MAX_HELD} bytes of paths awaiting replies or open"
                            ));
                        }
                        self.files.insert(handle, f);
                    }
                    Some(other) => self.remember(id, other)?,
                    None => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn two(op: &'static str, r: &mut Rd<'_>) -> Result<Pending, String> {
    let mut e = Event::new(op, r.path()?);
    e.path2 = Some(r.path()?);
    Ok(Pending::Op(e))
}

fn open_failed(path: String, flags: u32, status: String) -> Event {
    let op = if flags & FXF_WRITE != 0 {
        "write"
    } else {
        "read"
    };
    let mut e = Event::new(op, path).failed(status);
    e.note = Some(format!("open for {} refused", flags_text(flags)));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds SFTP packets.
    struct P(Vec<u8>);
    impl P {
        fn new(typ: u8) -> P {
            P(vec![typ])
        }
        fn u32(mut self, v: u32) -> P {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> P {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &[u8]) -> P {
            self = self.u32(v.len() as u32);
            self.0.extend_from_slice(v);
            self
        }
        fn done(self) -> Vec<u8> {
            let mut v = (self.0.len() as u32).to_be_bytes().to_vec();
            v.extend(self.0);
            v
        }
    }

    fn status(id: u32, code: u32) -> Vec<u8> {
        P::new(STATUS).u32(id).u32(code).s(b"msg").s(b"").done()
    }

    fn sha(b: &[u8]) -> String {
        super::super::hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    }

    /// Feeds `data` in pieces of `step` bytes.
    fn feed(s: &mut Sftp, up: bool, data: &[u8], step: usize, out: &mut Vec<Event>) {
        for c in data.chunks(step.max(1)) {
            let r = if up { s.up(c, out) } else { s.down(c, out) };
            r.expect("parses");
        }
    }

    fn hello(s: &mut Sftp, out: &mut Vec<Event>) {
        feed(s, true, &P::new(INIT).u32(3).done(), 100, out);
        feed(
            s,
            false,
            &P::new(VERSION)
                .u32(3)
                .s(b"posix-rename@openssh.com")
                .s(b"1")
                .done(),
            100,
            out,
        );
    }

    /// An upload of `content` in writes of 5 bytes, fed in pieces of `step`.
    fn upload(step: usize) -> Vec<Event> {
        let mut s = Sftp::new();
        let mut out = Vec::new();
        hello(&mut s, &mut out);
        let content = b"the quick brown fox jumps";
        feed(
            &mut s,
            true,
            &P::new(OPEN).u32(1).s(b"/tmp/up").u32(0x1a).u32(0).done(),
            step,
            &mut out,
        );
        feed(
            &mut s,
            false,
            &P::new(HANDLE).u32(1).s(b"h1").done(),
            step,
            &mut out,
        );
        let mut id = 2;
        for (i, c) in content.chunks(5).enumerate() {
            let w = P::new(WRITE).u32(id).s(b"h1").u64(i as u64 * 5).s(c).done();
            feed(&mut s, true, &w, step, &mut out);
            id += 1;
        }
        for i in 2..id {
            feed(&mut s, false, &status(i, FX_OK), step, &mut out);
        }
        feed(
            &mut s,
            true,
            &P::new(CLOSE).u32(99).s(b"h1").done(),
            step,
            &mut out,
        );
        assert!(out.is_empty(), "nothing before the close's reply");
        feed(&mut s, false, &status(99, FX_OK), step, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].sha256.as_deref(), Some(sha(content).as_str()));
        assert_eq!(out[0].bytes, content.len() as u64);
        out
    }

    #[test]
    fn an_upload_is_one_hashed_write_however_it_is_cut() {
        let whole = upload(100_000);
        for step in [1, 2, 3, 7, 13] {
            assert_eq!(upload(step), whole, "fed {step} bytes at a time");
        }
        assert_eq!(whole[0].operation, "write");
        assert_eq!(whole[0].path, "/tmp/up");
        assert!(whole[0].ok && !whole[0].partial);
    }

    #[test]
    fn a_download_is_hashed_to_its_end_of_file() {
        let mut s = Sftp::new();
        let mut out = Vec::new();
        hello(&mut s, &mut out);
        feed(
            &mut s,
            true,
            &P::new(OPEN).u32(1).s(b"/etc/motd").u32(1).u32(0).done(),
            3,
            &mut out,
        );
        feed(
            &mut s,
            false,
            &P::new(HANDLE).u32(1).s(b"\0\0\0\x01").done(),
            3,
            &mut out,
        );
        // three reads in flight, the last past the end
        for (id, off) in [(2u32, 0u64), (3, 4), (4, 8)] {
            feed(
                &mut s,
                true,
                &P::new(READ).u32(id).s(b"\0\0\0\x01").u64(off).u32(4).done(),
                5,
                &mut out,
            );
        }
        feed(
            &mut s,
            false,
            &P::new(DATA).u32(2).s(b"0123").done(),
            2,
            &mut out,
        );
        feed(
            &mut s,
            false,
            &P::new(DATA).u32(3).s(b"45").done(),
            2,
            &mut out,
        );
        feed(&mut s, false, &status(4, FX_EOF), 2, &mut out);
        // the client asks again for what the short read left out
        feed(
            &mut s,
            true,
            &P::new(READ).u32(5).s(b"\0\0\0\x01").u64(6).u32(2).done(),
            5,
            &mut out,
        );
        feed(&mut s, false, &status(5, FX_EOF), 2, &mut out);
        feed(
            &mut s,
            true,
            &P::new(CLOSE).u32(6).s(b"\0\0\0\x01").done(),
            100,
            &mut out,
        );
        feed(&mut s, false, &status(6, FX_OK), 100, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let e = &out[0];
        assert_eq!((e.operation, e.bytes, e.ok), ("read", 6, true));
        assert_eq!(e.sha256.as_deref(), Some(sha(b"012345").as_str()));
    }

    #[test]
    fn random_access_and_unfinished_reads_are_partial() {
        let mut s = Sftp::new();
        let mut out = Vec::new();
        hello(&mut s, &mut out);
        feed(
            &mut s,
            true,
            &P::new(OPEN).u32(1).s(b"/f").u32(3).u32(0).done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            false,
            &P::new(HANDLE).u32(1).s(b"h").done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            true,
            &P::new(WRITE).u32(2).s(b"h").u64(100).s(b"xx").done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            true,
            &P::new(READ).u32(3).s(b"h").u64(0).u32(10).done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            false,
            &P::new(DATA).u32(3).s(b"abc").done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            true,
            &P::new(CLOSE).u32(4).s(b"h").done(),
            100,
            &mut out,
        );
        feed(&mut s, false, &status(4, FX_OK), 100, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!((out[0].operation, out[0].bytes), ("write", 2));
        assert!(out[0].partial && out[0].sha256.is_none());
        assert!(out[0].note.as_deref().unwrap_or("").contains("offset 100"));
        assert_eq!((out[1].operation, out[1].bytes), ("read", 3));
        assert!(out[1].partial && out[1].sha256.is_none());
    }

    #[test]
    fn operations_and_failures() {
        let mut s = Sftp::new();
        let mut out = Vec::new();
        hello(&mut s, &mut out);
        let reqs = [
            P::new(REMOVE).u32(10).s(b"/a").done(),
            P::new(MKDIR).u32(11).s(b"/d").u32(4).u32(0o755).done(),
            P::new(RMDIR).u32(12).s(b"/d").done(),
            P::new(RENAME).u32(13).s(b"/a").s(b"/b").done(),
            P::new(EXTENDED)
                .u32(14)
                .s(b"posix-rename@openssh.com")
                .s(b"/b")
                .s(b"/c")
                .done(),
            P::new(SYMLINK).u32(15).s(b"/target").s(b"/link").done(),
            P::new(SETSTAT).u32(16).s(b"/c").u32(4).u32(0o104755).done(),
            P::new(OPEN).u32(17).s(b"/etc/shadow").u32(1).u32(0).done(),
            P::new(7).u32(18).s(b"/lstat").done(), // LSTAT: not reported
        ];
        for r in &reqs {
            feed(&mut s, true, r, 4, &mut out);
        }
        for id in 10..=16 {
            feed(
                &mut s,
                false,
                &status(id, if id == 12 { 4 } else { FX_OK }),
                4,
                &mut out,
            );
        }
        feed(&mut s, false, &status(17, 3), 4, &mut out);
        feed(&mut s, false, &status(18, 2), 4, &mut out);
        let ops: Vec<(&str, &str, Option<&str>, bool)> = out
            .iter()
            .map(|e| (e.operation, e.path.as_str(), e.path2.as_deref(), e.ok))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("remove", "/a", None, true),
                ("mkdir", "/d", None, true),
                ("rmdir", "/d", None, false),
                ("rename", "/a", Some("/b"), true),
                ("rename", "/b", Some("/c"), true),
                ("symlink", "/target", Some("/link"), true),
                ("setstat", "/c", None, true),
                ("read", "/etc/shadow", None, false),
            ]
        );
        assert_eq!(out[6].note.as_deref(), Some("mode 4755"));
        assert_eq!(out[2].status.as_deref(), Some("failure (4): msg"));
        assert_eq!(out[7].status.as_deref(), Some("permission denied (3): msg"));
        assert!(s.pending.is_empty() && s.held == 0);
    }

    #[test]
    fn an_empty_upload_is_hashed_and_an_unclosed_file_is_reported_at_the_end() {
        let mut s = Sftp::new();
        let mut out = Vec::new();
        hello(&mut s, &mut out);
        feed(
            &mut s,
            true,
            &P::new(OPEN).u32(1).s(b"/empty").u32(0x1a).u32(0).done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            false,
            &P::new(HANDLE).u32(1).s(b"a").done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            true,
            &P::new(CLOSE).u32(2).s(b"a").done(),
            100,
            &mut out,
        );
        feed(&mut s, false, &status(2, FX_OK), 100, &mut out);
        assert_eq!(out[0].sha256.as_deref(), Some(sha(b"").as_str()));
        feed(
            &mut s,
            true,
            &P::new(OPEN).u32(3).s(b"/big").u32(0x1a).u32(0).done(),
            100,
            &mut out,
        );
        feed(
            &mut s,
            false,
            &P::new(HANDLE).u32(3).s(b"b").done(),
            100,
            &mut out,
        );
        // a write whose content is still arriving when the channel ends
        let w = P::new(WRITE).u32(4).s(b"b").u64(0).s(&[7u8; 1000]).done();
        feed(&mut s, true, &w[..500], 100, &mut out);
        feed(
            &mut s,
            true,
            &P::new(REMOVE).u32(5).s(b"/x").done()[..3],
            100,
            &mut out,
        );
        s.finish("the channel ended", &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!((out[1].operation, out[1].ok), ("write", false));
        assert_eq!(
            out[1].status.as_deref(),
            Some("not closed: the channel ended")
        );
    }

    #[test]
    fn hostile_peers_are_bounded() {
        // a length of 4 GiB on a packet read whole
        let mut s = Sftp::new();
        let mut out = Vec::new();
        let mut bad = vec![0xff, 0xff, 0xff, 0xff, OPEN];
        bad.extend_from_slice(&[0; 64]);
        assert!(s.up(&bad, &mut out).is_err());
        // but a huge packet psm skips is just skipped, without holding it
        let mut s = Sftp::new();
        let mut big = vec![0x7f, 0xff, 0xff, 0xff, 104];
        big.extend_from_slice(&[0; 10_000]);
        s.down(&big, &mut out).expect("skips");
        assert!(s.down.buf.capacity() < 64);
        // a zero length
        assert!(Sftp::new().up(&[0, 0, 0, 0, 1], &mut out).is_err());
        // a handle too long
        let mut s = Sftp::new();
        let w = P::new(WRITE).u32(1).s(&[1; 300]).u64(0).s(b"x").done();
        assert!(s.up(&w, &mut out).is_err());
        // a write whose data length does not match its packet
        let mut s = Sftp::new();
        let mut w = P::new(WRITE).u32(1).s(b"h").u64(0).s(b"xyz").done();
        w[3] += 1;
        assert!(s.up(&w, &mut out).is_err());
        // a malformed body
        let mut s = Sftp::new();
        assert!(s
            .up(&P::new(OPEN).u32(1).u32(1000).done(), &mut out)
            .is_err());
        // a server speaking another version
        let mut s = Sftp::new();
        assert!(s.down(&P::new(VERSION).u32(6).done(), &mut out).is_err());
        // requests that are never answered
        let mut s = Sftp::new();
        let mut n = 0u32;
        let r = loop {
            let req = P::new(REMOVE).u32(n).s(&[b'a'; 1000]).done();
            if let Err(e) = s.up(&req, &mut out) {
                break e;
            }
            n += 1;
            assert!(n < 10_000);
        };
        assert!(r.contains("bytes of paths"), "{r}");
        // files opened and never closed
        let mut s = Sftp::new();
        let mut res = Ok(());
        for i in 0..(MAX_HANDLES as u32 + 1) {
            let _ = s.up(&P::new(OPEN).u32(i).s(b"/f").u32(1).u32(0).done(), &mut out);
            res = s.down(&P::new(HANDLE).u32(i).s(&i.to_be_bytes()).done(), &mut out);
            if res.is_err() {
                break;
            }
        }
        assert!(res.is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut s = Sftp::new();
            let mut out = Vec::new();
            let mut buf = Vec::new();
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf.push((x % 7) as u8 * if x & 0x100 != 0 { 37 } else { 1 });
            }
            let _ = s.up(&buf, &mut out);
            let _ = s.down(&buf, &mut out);
            s.finish("end", &mut out);
        }
    }
}
