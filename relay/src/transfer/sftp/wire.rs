//! SFTP's wire: packet types and codes, each direction's framing, a cursor over a packet's
//! body, and the text psm makes of a packet's fields.

use super::super::{text, MAX_MESSAGE, MAX_PATH};
use super::{MAX_HANDLE, MAX_WHOLE};

pub(super) const INIT: u8 = 1;
pub(super) const VERSION: u8 = 2;
pub(super) const OPEN: u8 = 3;
pub(super) const CLOSE: u8 = 4;
pub(super) const READ: u8 = 5;
pub(super) const WRITE: u8 = 6;
pub(super) const SETSTAT: u8 = 9;
pub(super) const FSETSTAT: u8 = 10;
pub(super) const REMOVE: u8 = 13;
pub(super) const MKDIR: u8 = 14;
pub(super) const RMDIR: u8 = 15;
pub(super) const RENAME: u8 = 18;
pub(super) const SYMLINK: u8 = 20;
pub(super) const STATUS: u8 = 101;
pub(super) const HANDLE: u8 = 102;
pub(super) const DATA: u8 = 103;
pub(super) const EXTENDED: u8 = 200;

pub(super) const FX_OK: u32 = 0;
pub(super) const FX_EOF: u32 = 1;

pub(super) const FXF_READ: u32 = 0x01;
pub(super) const FXF_WRITE: u32 = 0x02;
pub(super) const FXF_APPEND: u32 = 0x04;
pub(super) const FXF_TRUNC: u32 = 0x10;

pub(super) fn flags_text(flags: u32) -> String {
    let names = [
        (FXF_READ, "read"),
        (FXF_WRITE, "write"),
        (FXF_APPEND, "append"),
        (0x08, "create"),
        (FXF_TRUNC, "truncate"),
        (0x20, "exclusive"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(",")
    }
}

/// Where the payload of the packet being streamed goes.
pub(super) enum Sink {
    /// Nowhere (an untracked handle).
    None,
    Read(Vec<u8>),
    Write(Vec<u8>),
}

pub(super) enum St {
    /// Collecting the packet's head (or all of it) in `buf`.
    Head,
    /// A `WRITE`'s or `DATA`'s content.
    Stream { left: u64, sink: Sink },
    /// A packet psm does not read.
    Skip { left: u64 },
}

/// One direction's framing.
pub(super) struct Rx {
    pub(super) buf: Vec<u8>,
    pub(super) st: St,
}

impl Rx {
    pub(super) fn new() -> Rx {
        Rx {
            buf: Vec::new(),
            st: St::Head,
        }
    }

    pub(super) fn next_packet(&mut self) {
        self.st = St::Head;
        if self.buf.capacity() > 4096 {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

/// What the head collected so far asks for.
pub(super) enum Need {
    More(usize),
    /// The whole packet is in the buffer.
    Whole,
    /// A `WRITE`'s head: id, handle, offset; `data` content bytes follow.
    Write {
        id: u32,
        handle: Vec<u8>,
        offset: u64,
        data: u64,
    },
    /// A `DATA`'s head: id; `data` content bytes follow.
    Data {
        id: u32,
        data: u64,
    },
    Skip(u64),
}

/// Which side sent what is being read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum From {
    User,
    Target,
}

/// A cursor over a packet's body; running short is a malformed packet.
pub(super) struct Rd<'a>(pub(super) &'a [u8]);

impl<'a> Rd<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a malformed sftp packet (shorter than its fields)".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(super) fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(super) fn u64(&mut self) -> Result<u64, String> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    pub(super) fn string(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(super) fn path(&mut self) -> Result<String, String> {
        Ok(text(self.string()?, MAX_PATH))
    }
    pub(super) fn handle(&mut self) -> Result<Vec<u8>, String> {
        let h = self.string()?;
        if h.len() > MAX_HANDLE {
            return Err(format!("an sftp handle of {} bytes", h.len()));
        }
        Ok(h.to_vec())
    }
}

/// The attributes a `SETSTAT` sets, in words (`mode 4755, owner 0:0`).
pub(super) fn attrs_text(r: &mut Rd<'_>) -> Result<String, String> {
    let flags = r.u32()?;
    let mut v = Vec::new();
    if flags & 0x1 != 0 {
        v.push(format!("size {}", r.u64()?));
    }
    if flags & 0x2 != 0 {
        let (uid, gid) = (r.u32()?, r.u32()?);
        v.push(format!("owner {uid}:{gid}"));
    }
    if flags & 0x4 != 0 {
        v.push(format!("mode {:04o}", r.u32()? & 0o7777));
    }
    if flags & 0x8 != 0 {
        let (atime, mtime) = (r.u32()?, r.u32()?);
        v.push(format!("atime {atime}, mtime {mtime}"));
    }
    Ok(v.join(", "))
}

pub(super) fn status_text(code: u32, msg: &[u8]) -> String {
    let name = match code {
        FX_OK => "ok",
        FX_EOF => "end of file",
        2 => "no such file",
        3 => "permission denied",
        4 => "failure",
        5 => "bad message",
        6 => "no connection",
        7 => "connection lost",
        8 => "operation unsupported",
        _ => "error",
    };
    let msg = text(msg, MAX_MESSAGE);
    if msg.is_empty() {
        format!("{name} ({code})")
    } else {
        format!("{name} ({code}): {msg}")
    }
}

/// Whether `typ` from `from` is read whole (else skipped, or streamed).
pub(super) fn whole(from: From, typ: u8) -> bool {
    match from {
        From::User => matches!(
            typ,
            INIT | OPEN
                | CLOSE
                | READ
                | SETSTAT
                | FSETSTAT
                | REMOVE
                | MKDIR
                | RMDIR
                | RENAME
                | SYMLINK
                | EXTENDED
        ),
        From::Target => matches!(typ, VERSION | STATUS | HANDLE),
    }
}

pub(super) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// What the head of a packet collected so far (`buf`) asks for next.
pub(super) fn head(buf: &[u8], from: From) -> Result<Need, String> {
    if buf.len() < 5 {
        return Ok(Need::More(5 - buf.len()));
    }
    let len = u64::from(be32(buf));
    if len == 0 {
        return Err("an sftp packet of length 0".into());
    }
    let typ = buf[4];
    let total = 4 + len; // the whole packet, length included
    let more =
        |want: usize| -> Option<Need> { (buf.len() < want).then(|| Need::More(want - buf.len())) };
    if whole(from, typ) {
        if len - 1 > MAX_WHOLE as u64 {
            return Err(format!(
                "an sftp packet of type {typ} and {len} bytes (psm reads up to {MAX_WHOLE})"
            ));
        }
        return Ok(more(total as usize).unwrap_or(Need::Whole));
    }
    match (from, typ) {
        (From::User, WRITE) => {
            if let Some(n) = more(13) {
                return Ok(n);
            }
            let hlen = be32(&buf[9..]) as usize;
            if hlen > MAX_HANDLE {
                return Err(format!("an sftp handle of {hlen} bytes"));
            }
            let end = 13 + hlen + 12;
            if let Some(n) = more(end) {
                return Ok(n);
            }
            let offset =
                (u64::from(be32(&buf[13 + hlen..])) << 32) | u64::from(be32(&buf[17 + hlen..]));
            let data = u64::from(be32(&buf[21 + hlen..]));
            if end as u64 + data != total {
                return Err("an sftp write whose data does not fill its packet".into());
            }
            Ok(Need::Write {
                id: be32(&buf[5..]),
                handle: buf[13..13 + hlen].to_vec(),
                offset,
                data,
            })
        }
        (From::Target, DATA) => {
            if let Some(n) = more(13) {
                return Ok(n);
            }
            let data = u64::from(be32(&buf[9..]));
            if 13 + data != total {
                return Err("an sftp data reply whose data does not fill its packet".into());
            }
            Ok(Need::Data {
                id: be32(&buf[5..]),
                data,
            })
        }
        _ => Ok(Need::Skip(len - 1)),
    }
}
