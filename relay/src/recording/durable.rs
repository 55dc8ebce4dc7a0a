//! One session's durable window: how far it may run ahead of what psm-recorder confirmed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How far a session may run ahead of what psm-recorder confirmed durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Relayed bytes not yet confirmed durable at which the session stops reading.
    pub bytes: u64,
    /// Age of the oldest unconfirmed byte at which the session stops reading.
    pub time: Duration,
    /// How long a session may stay stopped (psm-recorder confirming nothing that would let it
    /// go on) before its recording counts as failed and the session ends.
    pub stall: Duration,
}

impl Default for Window {
    /// 1 MiB or 1 s, whichever is reached first; 30 s stopped at most.
    fn default() -> Self {
        Window {
            bytes: 1 << 20,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        }
    }
}

/// A worker's recording figures, for the metrics endpoint.
#[derive(Default)]
pub struct RecordStats {
    /// Times a session stopped reading because its durable window was full.
    pub pauses: AtomicU64,
    /// Sessions stopped now.
    pub paused_now: AtomicU64,
    /// Recordings failed because psm-recorder confirmed nothing for the stall limit.
    pub stalls: AtomicU64,
}

/// Marks closer together than this share one entry (a flood of tiny packets stays bounded, and
/// a session's marks are touched at most about once per grain).
const MARK_GRAIN: Duration = Duration::from_millis(10);
/// No time yet (`Durable::last_mark` before the first mark).
const NEVER: u64 = u64::MAX;

/// One stream's durable window: what was sent, what psm-recorder confirmed, and since when the
/// oldest unconfirmed byte waits.
///
/// A frame's admission reads and adds atomics only. `sent` has one writer, the session's worker
/// (every task of a session runs there); `acked` has one, the link's thread as it reads
/// psm-recorder's replies, which takes no lock of the session's. The age of the oldest
/// unconfirmed byte comes from marks (where a grain of sent bytes starts, and when), kept by the
/// worker alone: it adds one at most once per [`MARK_GRAIN`] and drops the confirmed ones when
/// `acked` passes the next mark's start, so their lock is taken about once per grain, never per
/// frame, and never by another thread.
pub(super) struct Durable {
    /// DATA bytes handed to the link (and so relayed, or about to be).
    sent: AtomicU64,
    /// DATA bytes psm-recorder confirmed durable (never more than `sent`).
    acked: AtomicU64,
    /// (start offset, µs since `epoch`) of each grain of sent bytes not wholly confirmed, oldest
    /// first; the first one holds offset `acked`.
    marks: Mutex<VecDeque<(u64, u64)>>,
    /// When the first mark's grain started (µs since `epoch`): the oldest unconfirmed byte was
    /// sent then or after, within one grain.
    oldest: AtomicU64,
    /// The second mark's start ([`NEVER`] when there is one mark): `acked` past it means the
    /// first mark is confirmed.
    next_start: AtomicU64,
    /// When the newest mark was made ([`NEVER`] before the first).
    last_mark: AtomicU64,
    epoch: Instant,
    pub(super) moved: Notify,
}

impl Default for Durable {
    fn default() -> Self {
        Durable {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            marks: Mutex::new(VecDeque::new()),
            oldest: AtomicU64::new(0),
            next_start: AtomicU64::new(NEVER),
            last_mark: AtomicU64::new(NEVER),
            epoch: Instant::now(),
            moved: Notify::new(),
        }
    }
}

impl Durable {
    fn marks<R>(&self, f: impl FnOnce(&mut VecDeque<(u64, u64)>) -> R) -> R {
        match self.marks.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// psm-recorder confirmed `bytes` (cumulative). Called by the link's thread.
    pub(super) fn ack(&self, bytes: u64) {
        let sent = self.sent.load(Ordering::Acquire);
        self.acked.fetch_max(bytes.min(sent), Ordering::AcqRel);
        self.moved.notify_waiters();
    }

    /// Drops the marks `acked` has passed (the worker, when `acked` reached `next_start`).
    fn advance(&self, acked: u64) {
        self.marks(|m| {
            while m.get(1).is_some_and(|(start, _)| *start <= acked) {
                m.pop_front();
            }
            if let Some((_, t)) = m.front() {
                self.oldest.store(*t, Ordering::Relaxed);
            }
            let next = m.get(1).map_or(NEVER, |(start, _)| *start);
            self.next_start.store(next, Ordering::Relaxed);
        });
    }

    /// Takes `len` more bytes into the window if it has room now; otherwise how long to wait
    /// at most before looking again. Called by the session's worker only.
    pub(super) fn try_admit(&self, len: u64, w: Window, now: Instant) -> Result<(), Duration> {
        let now_us = self.micros(now);
        let acked = self.acked.load(Ordering::Acquire);
        if acked >= self.next_start.load(Ordering::Relaxed) {
            self.advance(acked);
        }
        let sent = self.sent.load(Ordering::Relaxed);
        let unacked = sent.saturating_sub(acked);
        if unacked > 0 {
            let age =
                Duration::from_micros(now_us.saturating_sub(self.oldest.load(Ordering::Relaxed)));
            if unacked + len > w.bytes || age >= w.time {
                let left = w.time.saturating_sub(age);
                return Err(if left.is_zero() {
                    Duration::from_millis(50)
                } else {
                    left
                });
            }
        }
        let last = self.last_mark.load(Ordering::Relaxed);
        if last == NEVER || now_us.saturating_sub(last) >= MARK_GRAIN.as_micros() as u64 {
            self.marks(|m| {
                m.push_back((sent, now_us));
                match m.len() {
                    1 => self.oldest.store(now_us, Ordering::Relaxed),
                    2 => self.next_start.store(sent, Ordering::Relaxed),
                    _ => {}
                }
            });
            self.last_mark.store(now_us, Ordering::Relaxed);
        }
        self.sent.fetch_add(len, Ordering::Release);
        Ok(())
    }

    pub(super) fn unconfirmed(&self) -> u64 {
        let acked = self.acked.load(Ordering::Acquire);
        self.sent.load(Ordering::Acquire).saturating_sub(acked)
    }

    /// How long the oldest unconfirmed byte has waited, when one does (for the metrics: the
    /// worker drops confirmed marks on its next frame, so until then this can be up to that
    /// long older than the truth).
    pub(super) fn lag(&self, now: Instant) -> Option<Duration> {
        (self.unconfirmed() > 0).then(|| {
            Duration::from_micros(
                self.micros(now)
                    .saturating_sub(self.oldest.load(Ordering::Relaxed)),
            )
        })
    }

    #[cfg(test)]
    fn mark_count(&self) -> usize {
        self.marks(|m| m.len())
    }
}

/// Counts a paused session down again however its wait ends.
pub(super) struct Resume<'a>(pub(super) &'a AtomicU64);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_durable_window_fills_by_bytes_or_by_age_and_moves_on_acks() {
        let w = Window {
            bytes: 1000,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        };
        let d = Durable::default();
        let t0 = Instant::now();
        assert!(d.try_admit(600, w, t0).is_ok());
        assert!(d.try_admit(400, w, t0).is_ok(), "exactly the window");
        assert!(d.try_admit(1, w, t0).is_err(), "full by bytes");
        assert_eq!(d.unconfirmed(), 1000);
        d.ack(600);
        assert_eq!(d.unconfirmed(), 400);
        assert!(d.try_admit(600, w, t0).is_ok());
        // full by age: the oldest unconfirmed byte is a second old
        d.ack(1600);
        assert!(d.try_admit(10, w, t0).is_ok());
        let later = t0 + Duration::from_millis(1000);
        let wait = d.try_admit(10, w, later).expect_err("full by age");
        assert!(wait <= Duration::from_millis(50), "{wait:?}");
        d.ack(1610);
        assert!(d.try_admit(10, w, later).is_ok(), "acked: room again");
        // an empty window takes a chunk larger than itself, so nothing ever waits forever
        d.ack(1620);
        assert!(d.try_admit(5000, w, later).is_ok());
        // acks never run past what was sent
        d.ack(u64::MAX);
        assert_eq!(d.unconfirmed(), 0);
    }

    #[test]
    fn the_age_is_the_oldest_unconfirmed_grains_and_acks_take_no_lock_of_the_session() {
        let w = Window {
            bytes: 1 << 20,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        };
        let d = Arc::new(Durable::default());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert!(d.try_admit(100, w, ms(0)).is_ok());
        assert!(d.try_admit(100, w, ms(5)).is_ok(), "the same grain");
        assert!(d.try_admit(100, w, ms(20)).is_ok(), "a second grain");
        // the link acknowledges while the worker holds the marks: no wait on them
        let other = d.clone();
        let acker = d.marks(|_| std::thread::spawn(move || other.ack(200)).join());
        acker.expect("the ack went through");
        assert_eq!(d.unconfirmed(), 100);
        // the first grain is confirmed: the age counts from the second one (20 ms)
        assert!(d.try_admit(1, w, ms(1010)).is_ok(), "980 ms old");
        assert!(d.try_admit(1, w, ms(1020)).is_err(), "1 s old");
        assert_eq!(d.lag(ms(1020)), Some(Duration::from_secs(1)));
        d.ack(302);
        assert_eq!(d.lag(ms(1020)), None, "all confirmed");
    }

    #[test]
    fn marks_of_a_flood_of_tiny_writes_stay_few() {
        let w = Window {
            bytes: 1 << 20,
            time: Duration::from_secs(1),
            stall: Duration::from_secs(30),
        };
        let d = Durable::default();
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            assert!(d
                .try_admit(1, w, t0 + Duration::from_micros(i * 50))
                .is_ok());
        }
        // 10 000 writes over half a second: one mark per 10 ms
        assert!(d.mark_count() <= 51, "{}", d.mark_count());
    }
}
