//! Flow control between the two legs of a channel.
//!
//! russh replenishes a channel's receive window as soon as data is *received*, not when it is
//! consumed, and each connection has one event loop that stops reading (for every channel) while
//! one channel's queue is full. A relay that lets either loop block while the other direction is
//! waiting for that same loop to process a window adjust deadlocks. So each direction has a
//! [`Gate`]: its reader drains into a byte-counted queue up to [`SOFT_LIMIT`]; beyond that it
//! keeps draining only while the *opposite* direction's writer is blocked (that writer needs the
//! loop this reader is freeing), and never beyond [`HARD_LIMIT`]. Memory per channel stays
//! bounded by `2 * HARD_LIMIT` plus russh's own buffers; a slow reader slows the writer; nothing
//! is dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Bytes a direction buffers before it lets its source loop apply back-pressure.
pub const SOFT_LIMIT: usize = 1 << 20;
/// Bytes a direction never exceeds.
pub const HARD_LIMIT: usize = 32 << 20;

/// One direction's accounting.
#[derive(Default)]
pub struct Gate {
    buffered: AtomicUsize,
    writer_blocked: AtomicBool,
}

/// Both directions of one channel, with a shared wake-up.
#[derive(Default)]
pub struct Flow {
    /// User to target.
    pub up: Gate,
    /// Target to user.
    pub down: Gate,
    notify: Notify,
}

/// Which direction a task serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// User to target.
    Up,
    /// Target to user.
    Down,
}

impl Flow {
    /// A new pair of gates.
    pub fn new() -> Arc<Flow> {
        Arc::new(Flow::default())
    }

    fn gates(&self, d: Dir) -> (&Gate, &Gate) {
        match d {
            Dir::Up => (&self.up, &self.down),
            Dir::Down => (&self.down, &self.up),
        }
    }

    /// Whether the reader of `d` may take more from its source now.
    pub fn may_read(&self, d: Dir) -> bool {
        let (me, other) = self.gates(d);
        let b = me.buffered.load(Ordering::Acquire);
        b < SOFT_LIMIT || (b < HARD_LIMIT && other.writer_blocked.load(Ordering::Acquire))
    }

    /// Waits until the reader of `d` may read.
    pub async fn reader_ready(&self, d: Dir) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.may_read(d) {
                return;
            }
            n.await;
        }
    }

    /// The reader of `d` queued `n` bytes.
    pub fn queued(&self, d: Dir, n: usize) {
        self.gates(d).0.buffered.fetch_add(n, Ordering::AcqRel);
    }

    /// The writer of `d` is about to write (and may block on the peer's window).
    pub fn writing(&self, d: Dir) {
        self.gates(d).0.writer_blocked.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// The writer of `d` finished writing `n` bytes.
    pub fn written(&self, d: Dir, n: usize) {
        let g = self.gates(d).0;
        g.writer_blocked.store(false, Ordering::Release);
        g.buffered.fetch_sub(n, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_then_escape_while_other_writer_blocked() {
        let f = Flow::new();
        assert!(f.may_read(Dir::Up));
        f.queued(Dir::Up, SOFT_LIMIT);
        assert!(!f.may_read(Dir::Up), "over the soft limit the loop is back-pressured");
        f.writing(Dir::Down);
        assert!(f.may_read(Dir::Up), "the down writer needs the up source's loop: keep draining");
        f.queued(Dir::Up, HARD_LIMIT - SOFT_LIMIT);
        assert!(!f.may_read(Dir::Up), "never beyond the hard limit");
        f.written(Dir::Down, 0);
        f.writing(Dir::Up);
        f.written(Dir::Up, HARD_LIMIT);
        assert!(f.may_read(Dir::Up));
        assert!(f.may_read(Dir::Down));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reader_wakes_when_writer_drains() {
        let f = Flow::new();
        f.queued(Dir::Down, SOFT_LIMIT + 1);
        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.reader_ready(Dir::Down).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        f.writing(Dir::Down);
        f.written(Dir::Down, SOFT_LIMIT + 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
