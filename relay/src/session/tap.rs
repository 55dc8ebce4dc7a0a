//! What psm reads from a channel's bytes besides relaying them: the file operations of an SFTP
//! or legacy SCP channel (parsed by [`crate::transfer`]) and how an exec command ended, each
//! audited through the session's sink (`file_transfer`, `command_end`).
//!
//! The relaying tasks hand the tap a look at each message before they forward it; nothing here
//! can hold up, change or stop what is relayed. When the parser gives up on a channel, the tap
//! stops reading it and the session gets one notice.

use std::sync::{Arc, Mutex, MutexGuard};

use psm_control_api::{AuditKind, ChannelKind};
use tracing::debug;

use crate::flow::Flow;
use crate::pipe::Item;
use crate::session::Shared;
use crate::transfer::{Event, Fed, Transfer};

/// Longest command line kept in a `command_end` event (as in `command`).
const MAX_LINE: usize = 4096;

/// How an exec command ended.
#[derive(Default)]
struct Exit {
    status: Option<u32>,
    signal: Option<String>,
}

/// The tap on one channel.
pub(crate) struct Tap {
    channel: u32,
    protocol: &'static str,
    transfer: Mutex<Option<Transfer>>,
    /// An exec's command line: a `command_end` is audited when the channel ends.
    command: Option<String>,
    exit: Mutex<Exit>,
    started_ms: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tap {
    /// The tap for a channel that starts `kind` with `command` (an exec's command line or a
    /// subsystem's name); None when there is nothing to read.
    pub(crate) fn for_start(
        channel: u32,
        kind: Option<ChannelKind>,
        command: &str,
        exec: bool,
    ) -> Option<Arc<Tap>> {
        let transfer = match kind {
            Some(ChannelKind::Sftp) => Some(Transfer::sftp()),
            Some(ChannelKind::Scp) => Transfer::scp(command),
            _ => None,
        };
        if transfer.is_none() && !exec {
            return None;
        }
        Some(Arc::new(Tap {
            channel,
            protocol: transfer.as_ref().map_or("sftp", Transfer::protocol),
            transfer: Mutex::new(transfer),
            command: exec.then(|| {
                psm_control_api::escape::truncate(command, MAX_LINE)
                    .0
                    .to_string()
            }),
            exit: Mutex::new(Exit::default()),
            started_ms: psm_control_api::now_ms(),
        }))
    }

    /// Data from the user, about to be forwarded.
    pub(crate) fn up(&self, shared: &Shared, data: &[u8]) {
        self.feed(shared, |t| t.up(data));
    }

    /// A message from the target, about to be forwarded.
    pub(crate) fn down(&self, shared: &Shared, item: &Item) {
        match item {
            Item::Data(d) => self.feed(shared, |t| t.down(d)),
            Item::ExitStatus(s) => lock(&self.exit).status = Some(*s),
            Item::ExitSignal { signal, .. } => {
                lock(&self.exit).signal = Some(crate::pipe::sig_name(signal))
            }
            _ => {}
        }
    }

    fn feed(&self, shared: &Shared, f: impl FnOnce(&mut Transfer) -> Fed) {
        let fed = {
            let mut t = lock(&self.transfer);
            let Some(tr) = t.as_mut() else { return };
            let fed = f(tr);
            if fed.gave_up.is_some() {
                *t = None;
            }
            fed
        };
        self.emit(shared, fed.events);
        if let Some(why) = fed.gave_up {
            let ch = self.channel;
            let protocol = self.protocol;
            shared.notices.note("file transfer not followed", "", || {
                format!(
                    "psm stopped reading the {protocol} transfers of channel {ch} (session {}): {}; its later file operations are not audited (the channel is still relayed and recorded)",
                    shared.session_id,
                    crate::escape_short(&why)
                )
            });
        }
    }

    /// The channel ended: transfers in flight, and an exec's `command_end`.
    pub(crate) fn end(&self, shared: &Shared, flow: &Flow) {
        let rest = lock(&self.transfer).take().map(|mut t| t.finish());
        self.emit(shared, rest.unwrap_or_default());
        let Some(line) = &self.command else { return };
        let Some((user, target, account)) = shared.who() else {
            return;
        };
        let exit = std::mem::take(&mut *lock(&self.exit));
        shared.audit.emit(AuditKind::CommandEnd {
            session_id: shared.session_id.clone(),
            user,
            target,
            account,
            channel: self.channel,
            line: line.clone(),
            exit_status: exit.status,
            exit_signal: exit.signal,
            duration_ms: psm_control_api::now_ms().saturating_sub(self.started_ms),
            bytes_up: flow.moved_up(),
            bytes_down: flow.moved_down(),
        });
    }

    fn emit(&self, shared: &Shared, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let Some((user, target, account)) = shared.who() else {
            return;
        };
        for e in events {
            debug!(session = %shared.session_id, channel = self.channel, operation = e.operation,
                path = %crate::escape_short(&e.path), bytes = e.bytes, ok = e.ok, "file transfer");
            shared.audit.emit(AuditKind::FileTransfer {
                session_id: shared.session_id.clone(),
                user: user.clone(),
                target: target.clone(),
                account: account.clone(),
                channel: self.channel,
                protocol: self.protocol.to_string(),
                operation: e.operation.to_string(),
                path: e.path,
                path2: e.path2,
                bytes: e.bytes,
                sha256: e.sha256,
                partial: e.partial,
                note: e.note,
                ok: e.ok,
                status: e.status,
            });
        }
    }
}
