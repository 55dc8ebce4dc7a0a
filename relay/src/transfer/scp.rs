//! The legacy SCP protocol (`scp -O`): an exec of `scp -t PATH` (the target receives: an
//! upload) or `scp -f PATH` (the target sends: a download), read both ways.
//!
//! The sending side writes records, one line each: `C<mode> <size> <name>` (a file, whose
//! `size` bytes and one status byte follow), `D<mode> 0 <name>` (enter a directory), `E`
//! (leave it), `T<mtime> 0 <atime> 0` (times of what follows), or an error (`\x01`, `\x02`
//! fatal, then a message line). The receiving side answers each record, and each file's
//! content, with one byte `\0`, or an error line, and the sender waits for that answer before
//! going on: so psm always knows which record an answer belongs to. File content streams
//! through the hash; lines are held up to [`MAX_LINE`] bytes, and directories up to
//! [`MAX_DEPTH`] deep.

use psm_control_api::scp::{ScpCommand, ScpMode as Mode};

use super::{text, Content, Event, MAX_MESSAGE, MAX_PATH};

/// Longest record or error line psm reads (OpenSSH's scp reads 2 KiB lines, plus the name).
pub const MAX_LINE: usize = 8 * 1024;
/// Deepest directory nesting followed.
pub const MAX_DEPTH: usize = 64;

/// The sending side's stream.
enum Src {
    Line(Vec<u8>),
    Body {
        left: u64,
    },
    /// The status byte after a file's content.
    Trailer,
    /// The error line after a file's content.
    TrailerMsg(Vec<u8>),
}

/// The receiving side's stream.
enum Ack {
    Byte,
    Msg(Vec<u8>),
}

/// What answer the sender waits for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// The receiver's first `\0`.
    Start,
    Nothing,
    /// The answer to a `T`, `D` (dir) or `E` record.
    Record {
        dir: bool,
    },
    /// The answer to a `C` record (then the content follows).
    FileStart,
    /// The answer to a file's content.
    FileDone,
}

struct File {
    name: String,
    size: u64,
    content: Content,
    error: Option<String>,
}

/// The SCP reader of one channel.
pub struct Scp {
    mode: Mode,
    /// The path on the command line.
    base: String,
    /// `-d`: the path names a directory (several files are sent).
    into_dir: bool,
    src: Src,
    ack: Ack,
    expect: Expect,
    dirs: Vec<String>,
    file: Option<File>,
}

/// `a/b` + `c` without doubled slashes.
fn join(parts: &[&str]) -> String {
    let mut s = String::new();
    for p in parts.iter().filter(|p| !p.is_empty()) {
        if !s.is_empty() && !s.ends_with('/') {
            s.push('/');
        }
        s.push_str(p);
    }
    s
}

/// The directory part of a path (`/a/b` → `/a`, `b` → ``, `/b` → `/`).
fn parent(p: &str) -> &str {
    let p = if p.len() > 1 {
        p.trim_end_matches('/')
    } else {
        p
    };
    match p.rsplit_once('/') {
        Some(("", _)) => "/",
        Some((dir, _)) => dir,
        None => "",
    }
}

/// Reads up to a newline into `buf`, advancing `data`: true once the line is complete (the
/// newline consumed, not kept), false when all of `data` was taken.
fn line(buf: &mut Vec<u8>, data: &mut &[u8]) -> Result<bool, String> {
    match data.iter().position(|b| *b == b'\n') {
        Some(i) => {
            if buf.len() + i > MAX_LINE {
                return Err(format!("an scp line longer than {MAX_LINE} bytes"));
            }
            buf.extend_from_slice(&data[..i]);
            *data = &data[i + 1..];
            Ok(true)
        }
        None => {
            if buf.len() + data.len() > MAX_LINE {
                return Err(format!("an scp line longer than {MAX_LINE} bytes"));
            }
            buf.extend_from_slice(data);
            *data = &[];
            Ok(false)
        }
    }
}

/// `C0644 123 name` / `D0755 0 name`: (size, name).
fn record(line: &[u8]) -> Result<(u64, String), String> {
    let bad = || format!("a malformed scp record ({})", text(line, 80));
    let rest = &line[1..];
    let mut parts = rest.splitn(3, |b| *b == b' ');
    let mode = parts.next().ok_or_else(bad)?;
    let size = parts.next().ok_or_else(bad)?;
    let name = parts.next().ok_or_else(bad)?;
    if mode.is_empty() || !mode.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return Err(bad());
    }
    let size = std::str::from_utf8(size)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    Ok((size, text(name, MAX_PATH)))
}

impl Scp {
    /// The reader for an exec of `command`, when it is `scp -t` or `scp -f`.
    pub fn from_command(command: &str) -> Option<Scp> {
        let c = ScpCommand::parse(command)?;
        Some(Scp {
            mode: c.mode,
            base: text(c.path.as_bytes(), MAX_PATH),
            into_dir: c.into_dir,
            src: Src::Line(Vec::new()),
            ack: Ack::Byte,
            expect: Expect::Start,
            dirs: Vec::new(),
            file: None,
        })
    }

    /// Bytes from the user.
    pub fn up(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        match self.mode {
            Mode::Upload => self.source(data, out),
            Mode::Download => self.sink(data, out),
        }
    }

    /// Bytes from the target.
    pub fn down(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        match self.mode {
            Mode::Upload => self.sink(data, out),
            Mode::Download => self.source(data, out),
        }
    }

    /// The channel ended (or psm gave up, `why`): a file in flight is reported as such.
    pub fn finish(mut self, why: &str, out: &mut Vec<Event>) {
        if let Some(mut f) = self.file.take() {
            let passed = f.content.next();
            let status = match self.expect {
                Expect::FileStart => format!("no answer to the file's start: {why}"),
                Expect::FileDone => format!("no answer after the content: {why}"),
                _ => format!("{why} after {passed} of {} bytes", f.size),
            };
            if passed < f.size || !matches!(self.expect, Expect::FileDone) {
                f.content
                    .stop(format!("{passed} of {} bytes passed", f.size));
            }
            out.push(self.file_event(f, Some(status)));
        }
    }

    fn op(&self) -> &'static str {
        match self.mode {
            Mode::Upload => "write",
            Mode::Download => "read",
        }
    }

    /// Where the file named `name` is, as far as psm can tell.
    fn path_of(&self, name: &str) -> String {
        let mut parts: Vec<&str> = Vec::with_capacity(self.dirs.len() + 2);
        match self.mode {
            Mode::Upload => {
                parts.push(&self.base);
                if !self.into_dir && self.dirs.is_empty() {
                    return self.base.clone();
                }
            }
            Mode::Download => parts.push(parent(&self.base)),
        }
        parts.extend(self.dirs.iter().map(String::as_str));
        parts.push(name);
        text(join(&parts).as_bytes(), MAX_PATH)
    }

    /// The current directory's path (for errors not about one file).
    fn here(&self) -> String {
        if self.dirs.is_empty() {
            return self.base.clone();
        }
        let mut parts: Vec<&str> = vec![match self.mode {
            Mode::Upload => &self.base,
            Mode::Download => parent(&self.base),
        }];
        parts.extend(self.dirs.iter().map(String::as_str));
        text(join(&parts).as_bytes(), MAX_PATH)
    }

    fn file_event(&self, f: File, failure: Option<String>) -> Event {
        let mut e = Event::new(self.op(), self.path_of(&f.name));
        e.path2 = Some(f.name);
        f.content.finish(&mut e);
        if let Some(s) = failure.or(f.error) {
            e = e.failed(s);
        }
        e
    }

    fn source(&mut self, mut data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        while !data.is_empty() {
            match &mut self.src {
                Src::Line(buf) => {
                    if self.expect != Expect::Nothing {
                        return Err(
                            "the sending side went on without waiting for its answer".into()
                        );
                    }
                    if line(buf, &mut data)? {
                        let l = std::mem::take(buf);
                        self.record(&l, out)?;
                    }
                }
                Src::Body { left } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    *left -= n as u64;
                    if let Some(f) = &mut self.file {
                        f.content.feed(&data[..n]);
                    }
                    data = &data[n..];
                    if *left == 0 {
                        self.src = Src::Trailer;
                    }
                }
                Src::Trailer => {
                    let b = data[0];
                    data = &data[1..];
                    match b {
                        0 => {
                            self.expect = Expect::FileDone;
                            self.src = Src::Line(Vec::new());
                        }
                        1 | 2 => self.src = Src::TrailerMsg(Vec::new()),
                        _ => return Err(format!("a byte {b:#04x} where scp sends a status")),
                    }
                }
                Src::TrailerMsg(buf) => {
                    if line(buf, &mut data)? {
                        let msg = text(buf, MAX_MESSAGE);
                        if let Some(f) = &mut self.file {
                            f.error = Some(msg);
                        }
                        self.expect = Expect::FileDone;
                        self.src = Src::Line(Vec::new());
                    }
                }
            }
        }
        Ok(())
    }

    /// A record line from the sending side, without its newline.
    fn record(&mut self, l: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        let Some(&kind) = l.first() else {
            return Err("an empty scp record".into());
        };
        match kind {
            1 | 2 => {
                // the sender could not send something (a missing file): no answer follows
                let msg = text(&l[1..], MAX_MESSAGE);
                out.push(Event::new(self.op(), self.here()).failed(msg));
            }
            b'T' => self.expect = Expect::Record { dir: false },
            b'C' => {
                let (size, name) = record(l)?;
                self.file = Some(File {
                    name,
                    size,
                    content: Content::new(),
                    error: None,
                });
                self.expect = Expect::FileStart;
            }
            b'D' => {
                let (_, name) = record(l)?;
                if self.dirs.len() >= MAX_DEPTH {
                    return Err(format!("scp directories nested deeper than {MAX_DEPTH}"));
                }
                self.dirs.push(name);
                self.expect = Expect::Record { dir: true };
            }
            b'E' => {
                self.dirs.pop();
                self.expect = Expect::Record { dir: false };
            }
            _ => return Err(format!("an scp record psm does not know ({})", text(l, 80))),
        }
        Ok(())
    }

    fn sink(&mut self, mut data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        while !data.is_empty() {
            match &mut self.ack {
                Ack::Byte => {
                    let b = data[0];
                    data = &data[1..];
                    match b {
                        0 => self.answered(None, out),
                        1 | 2 => self.ack = Ack::Msg(Vec::new()),
                        _ => {
                            return Err(format!(
                                "a byte {b:#04x} where scp's receiving side answers"
                            ))
                        }
                    }
                }
                Ack::Msg(buf) => {
                    if line(buf, &mut data)? {
                        let msg = text(buf, MAX_MESSAGE);
                        self.ack = Ack::Byte;
                        self.answered(Some(msg), out);
                    }
                }
            }
        }
        Ok(())
    }

    /// The receiving side answered: `\0` (None) or an error.
    fn answered(&mut self, err: Option<String>, out: &mut Vec<Event>) {
        match std::mem::replace(&mut self.expect, Expect::Nothing) {
            Expect::Start | Expect::Nothing => {
                if let Some(e) = err {
                    out.push(Event::new(self.op(), self.here()).failed(e));
                }
            }
            Expect::Record { dir } => {
                if let Some(e) = err {
                    out.push(Event::new(self.op(), self.here()).failed(e));
                    if dir {
                        // the sender skips the directory it was refused
                        self.dirs.pop();
                    }
                }
            }
            Expect::FileStart => match err {
                Some(e) => {
                    if let Some(f) = self.file.take() {
                        let mut ev = self.file_event(f, Some(e));
                        ev.sha256 = None;
                        ev.note = Some("refused before its content".into());
                        out.push(ev);
                    }
                }
                None => {
                    let size = self.file.as_ref().map_or(0, |f| f.size);
                    if let Some(f) = &mut self.file {
                        f.content.at(0, "content");
                    }
                    self.src = if size == 0 {
                        Src::Trailer
                    } else {
                        Src::Body { left: size }
                    };
                }
            },
            Expect::FileDone => {
                if let Some(f) = self.file.take() {
                    out.push(self.file_event(f, err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        super::super::hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    }

    fn feed(s: &mut Scp, up: bool, data: &[u8], step: usize, out: &mut Vec<Event>) {
        for c in data.chunks(step.max(1)) {
            let r = if up { s.up(c, out) } else { s.down(c, out) };
            r.expect("parses");
        }
    }

    #[test]
    fn command_lines() {
        assert!(Scp::from_command("ls -t").is_none());
        assert_eq!(
            Scp::from_command("scp -t -f x").map(|s| s.mode),
            Some(Mode::Download)
        );
        assert!(Scp::from_command("scp x").is_none());
        let s = Scp::from_command("scp -v -d -t -- '/tmp/a b'").expect("scp");
        assert_eq!(
            (s.mode, s.base.as_str(), s.into_dir),
            (Mode::Upload, "/tmp/a b", true)
        );
        let s = Scp::from_command("/usr/bin/scp -r -f \"/srv/x\\\"y\" ").expect("scp");
        assert_eq!((s.mode, s.base.as_str()), (Mode::Download, "/srv/x\"y"));
        assert_eq!(
            (parent("/a/b"), parent("b"), parent("/b"), parent("/a/d/")),
            ("/a", "", "/", "/a")
        );
    }

    fn upload(step: usize) -> Vec<Event> {
        let mut s = Scp::from_command("scp -t /tmp/up.bin").expect("scp");
        let mut out = Vec::new();
        let content: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        feed(&mut s, false, b"\0", step, &mut out);
        feed(
            &mut s,
            true,
            b"T1700000000 0 1700000000 0\n",
            step,
            &mut out,
        );
        feed(&mut s, false, b"\0", step, &mut out);
        feed(&mut s, true, b"C0644 1000 local.bin\n", step, &mut out);
        feed(&mut s, false, b"\0", step, &mut out);
        feed(&mut s, true, &content, step, &mut out);
        feed(&mut s, true, b"\0", step, &mut out);
        assert!(out.is_empty());
        feed(&mut s, false, b"\0", step, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].sha256.as_deref(), Some(sha(&content).as_str()));
        out
    }

    #[test]
    fn an_upload_is_hashed_however_it_is_cut() {
        let whole = upload(100_000);
        for step in [1, 2, 5, 64] {
            assert_eq!(upload(step), whole);
        }
        let e = &whole[0];
        assert_eq!(
            (e.operation, e.path.as_str(), e.path2.as_deref()),
            ("write", "/tmp/up.bin", Some("local.bin"))
        );
        assert_eq!((e.bytes, e.ok, e.partial), (1000, true, false));
    }

    #[test]
    fn a_recursive_download_names_each_file() {
        let mut s = Scp::from_command("scp -r -f /srv/data").expect("scp");
        let mut out = Vec::new();
        feed(&mut s, true, b"\0", 1, &mut out);
        feed(&mut s, false, b"D0755 0 data\n", 3, &mut out);
        feed(&mut s, true, b"\0", 1, &mut out);
        feed(&mut s, false, b"C0600 3 a.txt\n", 3, &mut out);
        feed(&mut s, true, b"\0", 1, &mut out);
        feed(&mut s, false, b"abc\0", 3, &mut out);
        feed(&mut s, true, b"\0", 1, &mut out);
        feed(&mut s, false, b"C0600 0 empty\n", 3, &mut out);
        feed(&mut s, true, b"\0", 1, &mut out);
        feed(&mut s, false, b"\0", 3, &mut out);
        feed(&mut s, true, b"\0", 1, &mut out);
        // the target could not read this one: an error line after its content
        feed(&mut s, false, b"C0600 2 bad\n", 3, &mut out);
        feed(&mut s, true, b"\0", 1, &mut out);
        feed(
            &mut s,
            false,
            b"xy\x01scp: bad: Input/output error\n",
            3,
            &mut out,
        );
        feed(&mut s, true, b"\0", 1, &mut out);
        feed(&mut s, false, b"E\n", 3, &mut out);
        feed(&mut s, true, b"\0", 1, &mut out);
        // a file refused by the user's side
        feed(&mut s, false, b"C0600 5 ro\n", 3, &mut out);
        feed(
            &mut s,
            true,
            b"\x01scp: ro: Permission denied\n",
            4,
            &mut out,
        );
        // the target cannot open one
        feed(
            &mut s,
            false,
            b"\x01scp: /srv/nope: No such file or directory\n",
            3,
            &mut out,
        );
        let v: Vec<(&str, &str, u64, bool)> = out
            .iter()
            .map(|e| (e.operation, e.path.as_str(), e.bytes, e.ok))
            .collect();
        assert_eq!(
            v,
            vec![
                ("read", "/srv/data/a.txt", 3, true),
                ("read", "/srv/data/empty", 0, true),
                ("read", "/srv/data/bad", 2, false),
                ("read", "/srv/ro", 0, false),
                ("read", "/srv/data", 0, false),
            ]
        );
        assert_eq!(out[0].sha256.as_deref(), Some(sha(b"abc").as_str()));
        assert_eq!(out[1].sha256.as_deref(), Some(sha(b"").as_str()));
        assert_eq!(
            out[2].status.as_deref(),
            Some("scp: bad: Input/output error")
        );
        assert_eq!(out[3].status.as_deref(), Some("scp: ro: Permission denied"));
        assert!(out[3].sha256.is_none());
    }

    #[test]
    fn several_files_into_a_directory_and_a_cut_transfer() {
        let mut s = Scp::from_command("scp -d -t /tmp/dst").expect("scp");
        let mut out = Vec::new();
        feed(&mut s, false, b"\0", 1, &mut out);
        feed(&mut s, true, b"C0644 10 f1\n", 100, &mut out);
        feed(&mut s, false, b"\0", 1, &mut out);
        feed(&mut s, true, b"12345", 100, &mut out);
        s.finish("the channel ended", &mut out);
        assert_eq!(out.len(), 1);
        let e = &out[0];
        assert_eq!(
            (e.path.as_str(), e.bytes, e.ok, e.partial),
            ("/tmp/dst/f1", 5, false, true)
        );
        assert!(e.sha256.is_none());
        assert_eq!(
            e.status.as_deref(),
            Some("the channel ended after 5 of 10 bytes")
        );
    }

    #[test]
    fn hostile_peers_are_bounded() {
        let mut out = Vec::new();
        let mut s = Scp::from_command("scp -t /x").expect("scp");
        s.down(b"\0", &mut out).expect("start");
        assert!(
            s.up(&vec![b'C'; MAX_LINE + 1], &mut out).is_err(),
            "a line without end"
        );
        let mut s = Scp::from_command("scp -t /x").expect("scp");
        s.down(b"\0", &mut out).expect("start");
        assert!(s.up(b"C0644 12x name\n", &mut out).is_err(), "a bad size");
        let mut s = Scp::from_command("scp -t /x").expect("scp");
        s.down(b"\0", &mut out).expect("start");
        assert!(s.up(b"Zzz\n", &mut out).is_err(), "an unknown record");
        let mut s = Scp::from_command("scp -t /x").expect("scp");
        assert!(
            s.up(b"C0644 1 a\n", &mut out).is_err(),
            "did not wait for the start"
        );
        let mut s = Scp::from_command("scp -t /x").expect("scp");
        assert!(s.down(b"\x07", &mut out).is_err(), "a bad answer");
        let mut s = Scp::from_command("scp -r -t /x").expect("scp");
        s.down(b"\0", &mut out).expect("start");
        let mut r = Ok(());
        for _ in 0..=MAX_DEPTH {
            r = s.up(b"D0755 0 d\n", &mut out);
            if r.is_err() {
                break;
            }
            s.down(b"\0", &mut out).expect("ack");
        }
        assert!(r.is_err(), "too deep");
        // a huge declared size streams without being held
        let mut s = Scp::from_command("scp -t /x").expect("scp");
        s.down(b"\0", &mut out).expect("start");
        s.up(b"C0644 18446744073709551615 big\n", &mut out)
            .expect("record");
        s.down(b"\0", &mut out).expect("ack");
        s.up(&[0u8; 100_000], &mut out).expect("content");
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 99;
        for _ in 0..2000 {
            let mut s = Scp::from_command("scp -r -t /x").expect("scp");
            let mut out = Vec::new();
            let alphabet = b"\0\x01\x02\nCDET 0644 1 a";
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let b = [alphabet[(x as usize >> 3) % alphabet.len()]];
                let _ = if x & 1 == 0 {
                    s.up(&b, &mut out)
                } else {
                    s.down(&b, &mut out)
                };
            }
            s.finish("end", &mut out);
        }
    }
}
