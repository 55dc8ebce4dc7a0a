//! Flow control between the two legs of a channel.
//!
//! russh replenishes a channel's receive window as soon as data is *received*, and each SSH
//! connection has one event loop that reads every packet in order. A relay that stops draining a
//! channel (to bound memory) also stops that loop from reading the window adjusts queued behind
//! the data — and if both legs do that at once, the relay deadlocks with both peers waiting for
//! window. Bounded memory and liveness need the window to follow *consumption* on at least one
//! leg:
//!
//! - **User leg (upload):** the reader always drains the user's channel, and the window psm
//!   grants the user shrinks as the upload queue grows ([`Flow::user_window`], wired into russh's
//!   `adjust_window` hook). The user can never have more in flight than psm can hold, so the
//!   user-leg loop never blocks and always sees the user's window adjusts.
//! - **Target leg (download):** the reader stops at [`DOWN_LIMIT`] queued bytes; the target's
//!   TCP stream then applies back-pressure. This is safe because the download queue drains as
//!   soon as the user consumes, and that only depends on the user-leg loop, which never blocks.
//!
//! Memory per channel stays bounded (about `2 * WINDOW + DOWN_LIMIT` plus russh's buffers); a
//! slow reader slows the writer; nothing is dropped. Every item in the download queue counts
//! against the bound (a fixed cost plus its bytes), so a flood of exit-signal or EOF messages
//! is bounded like data.
//!
//! A client that ignores its window breaks the protocol (russh would deliver the excess anyway):
//! [`WindowMirror`] replays russh's window bookkeeping for every user channel and reports the
//! first byte beyond what psm granted, so the relay can disconnect it instead of holding it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Receive window psm offers on a channel when its queue is empty (russh's default).
pub const WINDOW: u32 = 2 << 20;

/// The largest channel packet psm accepts, on both legs: the most russh's configuration allows
/// (it refuses a `maximum_packet_size` above 65535). A peer that allows it then sends half as many packets as at russh's default 32 KiB,
/// and each costs psm a decryption, an encryption, a handler call and a recording frame: a bulk
/// transfer took about 13 % less of psm's CPU per GiB (perf/BENCHMARKS.md).
pub const MAX_PACKET: u32 = 65535;
/// Upload bytes queued at which the user's window is closed down to a trickle.
pub const UP_LIMIT: usize = 2 * WINDOW as usize;
/// Upload bytes queued at which psm stops reading from the user altogether (a safety net for
/// multiplexed connections, where russh's window target is shared by all channels).
pub const UP_HARD_LIMIT: usize = 64 << 20;
/// Download bytes queued at which psm stops reading from the target.
pub const DOWN_LIMIT: usize = 4 << 20;
/// Smallest window ever offered: keeps russh sending adjusts (it adjusts when the remaining
/// window falls below half the target, so a target of 1 would never adjust again).
pub const MIN_WINDOW: u32 = 2;

/// russh's receive-window bookkeeping for the user leg, replayed from the handler's callbacks so
/// that data beyond the window can be caught.
///
/// russh keeps one target for a whole connection: on each data packet it subtracts the packet
/// from the channel's window (unless the packet is larger: "extra data" is delivered anyway),
/// and when the window falls below half the target it grants up to the target and then asks
/// the `adjust_window` hook for the next target. The hook and the data callback run in that
/// order on the connection's loop, so the mirror sees the same sequence.
pub struct WindowMirror {
    target: u32,
    /// The target in force before the hook ran for the packet being processed.
    granted: Option<u32>,
    windows: HashMap<u32, u32>,
}

/// A client sent more than its window allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowViolation {
    /// The channel.
    pub channel: u32,
    /// Bytes in the packet.
    pub sent: u32,
    /// Bytes the window still allowed.
    pub allowed: u32,
}

impl WindowMirror {
    /// A connection whose channels start with `window` (russh's `window_size`).
    pub fn new(window: u32) -> WindowMirror {
        WindowMirror {
            target: window,
            granted: None,
            windows: HashMap::new(),
        }
    }

    /// A channel was opened with the initial window.
    pub fn opened(&mut self, channel: u32, window: u32) {
        self.windows.insert(channel, window);
    }

    /// A channel was closed.
    pub fn closed(&mut self, channel: u32) {
        self.windows.remove(&channel);
    }

    /// The `adjust_window` hook returned `next`: russh has just granted the channel up to the
    /// current target, and `next` becomes the target.
    pub fn hook(&mut self, next: u32) {
        self.granted = Some(self.target);
        if next > 0 {
            self.target = next;
        }
    }

    /// A data packet of `len` bytes arrived on `channel` (after the hook, if it ran).
    pub fn data(&mut self, channel: u32, len: usize) -> Result<(), WindowViolation> {
        let granted = self.granted.take();
        let Some(w) = self.windows.get_mut(&channel) else {
            return Ok(());
        };
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        if len > *w {
            return Err(WindowViolation {
                channel,
                sent: len,
                allowed: *w,
            });
        }
        *w -= len;
        if let Some(t) = granted {
            *w = t;
        }
        Ok(())
    }
}

/// Queue accounting for one relayed channel.
#[derive(Default)]
pub struct Flow {
    up: AtomicUsize,
    down: AtomicUsize,
    /// Bytes relayed each way so far (for the per-forward audit).
    moved_up: std::sync::atomic::AtomicU64,
    moved_down: std::sync::atomic::AtomicU64,
    notify: Notify,
    /// The user closed the channel ([`Flow::user_closed`]).
    user_gone: std::sync::atomic::AtomicBool,
    gone: Notify,
    /// Counts the channel live on its worker while any of its tasks holds the flow (held for
    /// its `Drop`).
    _live: Option<Live>,
}

/// A relayed channel counted live on its worker ([`crate::control_link::Counters`]) from its
/// start until the last of its tasks lets go of its [`Flow`].
struct Live(Arc<crate::control_link::Counters>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.channels_closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Flow {
    /// A new, empty channel.
    pub fn new() -> Arc<Flow> {
        Arc::new(Flow::default())
    }

    /// A new channel, counted live on `worker` until the flow is dropped.
    pub fn counted(worker: Arc<crate::control_link::Counters>) -> Arc<Flow> {
        worker.channels_opened.fetch_add(1, Ordering::Relaxed);
        Arc::new(Flow {
            _live: Some(Live(worker)),
            ..Flow::default()
        })
    }

    /// The window to offer the user next, given the upload queue.
    pub fn user_window(&self) -> u32 {
        let queued = self.up.load(Ordering::Acquire);
        let room = UP_LIMIT.saturating_sub(queued);
        (room.min(WINDOW as usize) as u32).max(MIN_WINDOW)
    }

    /// Upload bytes were queued.
    pub fn up_queued(&self, n: usize) {
        self.up.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` bytes of data were relayed toward the target.
    pub fn count_up(&self, n: usize) {
        self.moved_up.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` bytes of data were relayed toward the user.
    pub fn count_down(&self, n: usize) {
        self.moved_down.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes relayed toward the target so far.
    pub fn moved_up(&self) -> u64 {
        self.moved_up.load(Ordering::Relaxed)
    }

    /// Bytes relayed toward the user so far.
    pub fn moved_down(&self) -> u64 {
        self.moved_down.load(Ordering::Relaxed)
    }

    /// Upload bytes reached the target.
    pub fn up_written(&self, n: usize) {
        self.up.fetch_sub(n, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Waits until the upload queue is under the safety limit.
    pub async fn up_ready(&self) {
        self.wait_below(&self.up, UP_HARD_LIMIT).await
    }

    /// Download bytes were queued.
    pub fn down_queued(&self, n: usize) {
        self.down.fetch_add(n, Ordering::AcqRel);
    }

    /// Download bytes reached the user.
    pub fn down_written(&self, n: usize) {
        self.down.fetch_sub(n, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Whether the download queue is at its limit (psm's own notices to the user are not
    /// queued then).
    pub fn down_full(&self) -> bool {
        self.down.load(Ordering::Acquire) >= DOWN_LIMIT
    }

    /// Waits until the download queue has room.
    pub async fn down_ready(&self) {
        self.wait_below(&self.down, DOWN_LIMIT).await
    }

    async fn wait_below(&self, counter: &AtomicUsize, limit: usize) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if counter.load(Ordering::Acquire) < limit {
                return;
            }
            n.await;
        }
    }

    /// The user closed the channel: nothing more can reach them, so the target side of the
    /// channel ends too. (russh does not hand the target's reply to psm's own close to the
    /// channel's reader, which would otherwise wait for it, with the channel's target
    /// connection, until the session ends.)
    pub fn user_closed(&self) {
        self.user_gone.store(true, Ordering::Release);
        self.gone.notify_waiters();
    }

    /// Waits until [`Flow::user_closed`].
    pub async fn until_user_closed(&self) {
        loop {
            let n = self.gone.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.user_gone.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }

    /// A one-line picture of both queues, for debugging stalls.
    pub fn describe(&self) -> String {
        format!(
            "up queued={} window={} / down queued={}",
            self.up.load(Ordering::Relaxed),
            self.user_window(),
            self.down.load(Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_window_follows_the_upload_queue() {
        let f = Flow::new();
        assert_eq!(f.user_window(), WINDOW);
        f.up_queued(WINDOW as usize);
        assert_eq!(
            f.user_window(),
            WINDOW,
            "up to one window queued, the full window"
        );
        f.up_queued(WINDOW as usize / 2);
        assert_eq!(f.user_window(), WINDOW / 2);
        f.up_queued(10 * WINDOW as usize);
        assert_eq!(
            f.user_window(),
            MIN_WINDOW,
            "never zero: russh must keep adjusting"
        );
        f.up_written(11 * WINDOW as usize + WINDOW as usize / 2);
        assert_eq!(f.user_window(), WINDOW);
    }

    #[test]
    fn the_window_mirror_follows_russh_and_catches_the_excess() {
        let mut m = WindowMirror::new(100);
        m.opened(0, 100);
        m.opened(1, 100);
        assert!(m.data(0, 40).is_ok());
        // 60 left; 20 more makes it 40 < 50: russh grants back up to 100, then asks the hook
        m.hook(30);
        assert!(m.data(0, 20).is_ok());
        // the channel has 100 again; 86 leaves 14 < 15: russh grants back to the target of 30
        // (and the hook, called first, keeps 30)
        m.hook(30);
        assert!(m.data(0, 86).is_ok());
        assert_eq!(
            m.data(0, 31),
            Err(WindowViolation {
                channel: 0,
                sent: 31,
                allowed: 30
            })
        );
        assert!(m.data(1, 100).is_ok(), "channels are separate");
        assert!(m.data(1, 1).is_err());
        m.closed(1);
        assert!(m.data(1, 1000).is_ok(), "closed channels are not watched");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn download_reader_waits_for_room() {
        let f = Flow::new();
        f.down_queued(DOWN_LIMIT);
        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.down_ready().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        f.down_written(1);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
