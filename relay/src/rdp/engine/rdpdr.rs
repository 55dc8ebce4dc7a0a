//! Device redirection (`rdpdr`) when the grant allows some device kinds: the client's Device
//! List Announce is rewritten without the devices the grant refuses, so the target never learns
//! of them; and an I/O request from the target reaches the client only for a device psm passed
//! on (a client looks a request's device up among all it loaded, so a target that guessed a
//! refused drive's number would otherwise reach it).

use super::channels::Chunk;
use super::svc::{Decision, Messages, Step};

const RDPDR_CTYP_CORE: u16 = 0x4472;
/// The printer component: a client hands its messages to the printer it loaded, whatever psm
/// passed on.
const RDPDR_CTYP_PRN: u16 = 0x5052;
const PAKID_CORE_DEVICELIST_ANNOUNCE: u16 = 0x4441;
const PAKID_CORE_DEVICELIST_REMOVE: u16 = 0x444d;
const PAKID_CORE_DEVICE_IOREQUEST: u16 = 0x4952;

const DTYP_SERIAL: u32 = 0x01;
const DTYP_PARALLEL: u32 = 0x02;
const DTYP_PRINT: u32 = 0x04;
const DTYP_FILESYSTEM: u32 = 0x08;
const DTYP_SMARTCARD: u32 = 0x20;

/// A device psm removed from the client's list.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Removed {
    /// Its kind: "drive", "printer", "smartcard", "serial", "parallel" or "device".
    pub kind: &'static str,
    /// Its DOS name as the client gave it (lossy text).
    pub name: String,
}

/// The device filter of one session's `rdpdr` channel.
#[derive(Debug)]
pub(super) struct Rdpdr {
    drive: bool,
    printer: bool,
    smartcard: bool,
    up: Messages,
    down: Messages,
    /// The ids of the devices psm passed on to the target (and the client did not remove).
    announced: std::collections::HashSet<u32>,
    /// A printer was passed on.
    printer_passed: bool,
}

/// What became of one chunk from the target.
#[derive(Debug, Default)]
pub(super) struct RdpdrDown {
    /// Frames to relay unchanged.
    pub steps: Vec<Step>,
    /// The device id of an I/O request dropped because psm never passed that device on.
    pub dropped: Option<u32>,
}

/// What became of one chunk.
#[derive(Debug, Default)]
pub(super) struct RdpdrOut {
    /// Frames to relay unchanged.
    pub steps: Vec<Step>,
    /// A rewritten Device List Announce to send instead (unchunked), and what it left out.
    pub rewritten: Option<(Vec<u8>, Vec<Removed>)>,
}

impl Rdpdr {
    /// A filter allowing the given device kinds (serial and parallel ports never).
    pub fn new(drive: bool, printer: bool, smartcard: bool) -> Rdpdr {
        Rdpdr {
            drive,
            printer,
            smartcard,
            up: Messages::default(),
            down: Messages::default(),
            announced: Default::default(),
            printer_passed: false,
        }
    }

    /// One chunk from the target: an I/O request for a device psm did not pass on is dropped.
    pub fn feed_down(&mut self, frame: &[u8], chunk: &Chunk<'_>) -> Result<RdpdrDown, String> {
        let announced = &self.announced;
        let printer_passed = self.printer_passed;
        let mut dropped = None;
        let mut decide = |head: &[u8]| -> Result<Decision, String> {
            let component = head.get(..2).map(|c| u16::from_le_bytes([c[0], c[1]]));
            if component == Some(RDPDR_CTYP_PRN) && !printer_passed {
                // printer cache data for a printer psm never passed on
                dropped = Some(0);
                return Ok(Decision::Drop);
            }
            let request = head.len() >= 8
                && component == Some(RDPDR_CTYP_CORE)
                && u16::from_le_bytes([head[2], head[3]]) == PAKID_CORE_DEVICE_IOREQUEST;
            if !request {
                return Ok(Decision::Pass);
            }
            let device = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            Ok(if announced.contains(&device) {
                Decision::Pass
            } else {
                dropped = Some(device);
                Decision::Drop
            })
        };
        let mut steps = Vec::new();
        self.down.feed(frame, chunk, 8, &mut decide, &mut steps)?;
        Ok(RdpdrDown { steps, dropped })
    }

    /// One chunk from the client.
    pub fn feed(&mut self, frame: &[u8], chunk: &Chunk<'_>) -> Result<RdpdrOut, String> {
        let mut decide = |head: &[u8]| -> Result<Decision, String> {
            let announce = head.len() >= 4
                && u16::from_le_bytes([head[0], head[1]]) == RDPDR_CTYP_CORE
                && matches!(
                    u16::from_le_bytes([head[2], head[3]]),
                    PAKID_CORE_DEVICELIST_ANNOUNCE | PAKID_CORE_DEVICELIST_REMOVE
                );
            Ok(if announce {
                Decision::Collect
            } else {
                Decision::Pass
            })
        };
        let mut steps = Vec::new();
        self.up.feed(frame, chunk, 4, &mut decide, &mut steps)?;
        let mut out = RdpdrOut::default();
        for s in steps {
            match s {
                Step::Message(m)
                    if u16::from_le_bytes([m[2], m[3]]) == PAKID_CORE_DEVICELIST_REMOVE =>
                {
                    out.rewritten = Some((self.remove(&m)?, Vec::new()))
                }
                Step::Message(m) => out.rewritten = Some(self.filter(&m)?),
                forward => out.steps.push(forward),
            }
        }
        Ok(out)
    }

    fn allowed(&self, ty: u32) -> bool {
        match ty {
            DTYP_FILESYSTEM => self.drive,
            DTYP_PRINT => self.printer,
            DTYP_SMARTCARD => self.smartcard,
            _ => false,
        }
    }

    /// A Device List Remove: its devices are no longer passed on, and the target hears only of
    /// the ones it knew.
    fn remove(&mut self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let short = || "rdpdr Device List Remove truncated".to_string();
        let (count, mut out) = list_start(msg).ok_or_else(short)?;
        let mut kept = 0u32;
        let mut at = 8usize;
        for _ in 0..count {
            let id = msg.get(at..at + 4).ok_or_else(short)?;
            let id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
            if self.announced.remove(&id) {
                out.extend_from_slice(&id.to_le_bytes());
                kept += 1;
            }
            at += 4;
        }
        out[4..8].copy_from_slice(&kept.to_le_bytes());
        Ok(out)
    }

    /// The Device List Announce without the refused devices.
    fn filter(&mut self, msg: &[u8]) -> Result<(Vec<u8>, Vec<Removed>), String> {
        let short = || "rdpdr Device List Announce truncated".to_string();
        let (count, mut out) = list_start(msg).ok_or_else(short)?;
        let mut kept = 0u32;
        let mut removed = Vec::new();
        let mut at = 8usize;
        for _ in 0..count {
            let head = msg.get(at..at + 20).ok_or_else(short)?;
            let ty = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let len = u32::from_le_bytes([head[16], head[17], head[18], head[19]]);
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| (at + 20).checked_add(l))
                .filter(|&e| e <= msg.len())
                .ok_or_else(short)?;
            let id = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            if self.allowed(ty) {
                out.extend_from_slice(&msg[at..end]);
                kept += 1;
                self.announced.insert(id);
                self.printer_passed |= ty == DTYP_PRINT;
            } else {
                // an id reused for a refused device is no longer passed on
                self.announced.remove(&id);
                removed.push(Removed {
                    kind: kind(ty),
                    name: super::mcs::channel_name(&head[8..16]),
                });
            }
            at = end;
        }
        // Anything after the list is kept as the client sent it.
        out.extend_from_slice(&msg[at..]);
        out[4..8].copy_from_slice(&kept.to_le_bytes());
        Ok((out, removed))
    }
}

/// A device list message's count, and its copy so far: the header, and a count that the
/// caller fills in once it knows how many entries it kept.
fn list_start(msg: &[u8]) -> Option<(u32, Vec<u8>)> {
    let count = msg.get(4..8)?;
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]);
    let mut out = Vec::with_capacity(msg.len());
    out.extend_from_slice(&msg[..4]);
    out.extend_from_slice(&[0; 4]);
    Some((count, out))
}

fn kind(ty: u32) -> &'static str {
    match ty {
        DTYP_FILESYSTEM => "drive",
        DTYP_PRINT => "printer",
        DTYP_SMARTCARD => "smartcard",
        DTYP_SERIAL => "serial",
        DTYP_PARALLEL => "parallel",
        _ => "device",
    }
}
