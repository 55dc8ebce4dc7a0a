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
//! slow reader slows the writer; nothing is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Receive window psm offers on a channel when its queue is empty (russh's default).
pub const WINDOW: u32 = 2 << 20;
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

/// Queue accounting for one relayed channel.
#[derive(Default)]
pub struct Flow {
    up: AtomicUsize,
    down: AtomicUsize,
    notify: Notify,
}

impl Flow {
    /// A new, empty channel.
    pub fn new() -> Arc<Flow> {
        Arc::new(Flow::default())
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
