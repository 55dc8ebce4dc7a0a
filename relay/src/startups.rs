//! Unauthenticated connections: how many the relay holds at once (OpenSSH's `MaxStartups` and
//! `PerSourceMaxStartups`), and how their failures are logged without letting a flood fill the
//! disk; and authenticated ones: how many one user, and all users, may hold ([`UserSlots`]).
//!
//! The decisions are sans-IO: [`decide`] takes the counts and a random roll, [`LogLimiter`]
//! takes `now`. [`Startups`] is the shared table the workers consult when they accept.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `start:rate:full`, as OpenSSH's `MaxStartups`: up to `start` unauthenticated connections are
/// admitted; beyond that a new one is refused with probability `rate`% rising linearly to 100% at
/// `full`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxStartups {
    /// Unauthenticated connections always admitted.
    pub start: u32,
    /// Refusal probability (percent) just above `start`.
    pub rate: u32,
    /// At this many, every new connection is refused.
    pub full: u32,
}

impl Default for MaxStartups {
    /// OpenSSH's default, `10:30:100`.
    fn default() -> Self {
        MaxStartups {
            start: 10,
            rate: 30,
            full: 100,
        }
    }
}

impl fmt::Display for MaxStartups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

impl FromStr for MaxStartups {
    type Err = String;

    /// `N` (refuse beyond N) or `start:rate:full` with `1 <= start <= full` and `rate <= 100`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |p: &str| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("max_startups '{s}': '{p}' is not a whole number"))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let m = match parts.as_slice() {
            [n] => {
                let n = num(n)?;
                MaxStartups {
                    start: n,
                    rate: 100,
                    full: n,
                }
            }
            [a, b, c] => MaxStartups {
                start: num(a)?,
                rate: num(b)?,
                full: num(c)?,
            },
            _ => return Err(format!("max_startups '{s}': expected N or start:rate:full")),
        };
        if m.start == 0 || m.start > m.full || m.rate > 100 {
            return Err(format!(
                "max_startups '{s}': need 1 <= start <= full and rate <= 100"
            ));
        }
        Ok(m)
    }
}

/// Why a new connection was refused before its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source address already holds its share of unauthenticated connections.
    PerSource,
    /// The relay is at `full`.
    Full,
    /// Random early drop between `start` and `full`.
    EarlyDrop,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::PerSource => "too many unauthenticated connections from this address",
            Refusal::Full => "too many unauthenticated connections",
            Refusal::EarlyDrop => "unauthenticated connections above max_startups' start",
        })
    }
}

/// Whether one more unauthenticated connection may start, given `total` already held by the
/// relay and `from_source` held by its address. `roll` is uniform in `0..100`.
pub fn decide(
    cfg: &MaxStartups,
    per_source: u32,
    total: u32,
    from_source: u32,
    roll: u32,
) -> Result<(), Refusal> {
    if from_source >= per_source {
        return Err(Refusal::PerSource);
    }
    if total >= cfg.full {
        return Err(Refusal::Full);
    }
    if total < cfg.start {
        return Ok(());
    }
    // linear from `rate` at `start` to 100 at `full`
    let span = (cfg.full - cfg.start).max(1);
    let p = cfg.rate + (100 - cfg.rate) * (total - cfg.start) / span;
    if roll < p {
        Err(Refusal::EarlyDrop)
    } else {
        Ok(())
    }
}

#[derive(Default)]
struct Held {
    total: u32,
    by_source: HashMap<IpAddr, u32>,
}

/// The relay-wide table of unauthenticated connections (all workers share it).
pub struct Startups {
    cfg: MaxStartups,
    per_source: u32,
    held: Mutex<Held>,
}

/// One admitted unauthenticated connection; dropping it (at authentication or at the end of
/// the connection) frees its place.
pub struct Permit {
    table: Arc<Startups>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut h = self.table.lock();
        h.total = h.total.saturating_sub(1);
        if let Some(n) = h.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                h.by_source.remove(&self.source);
            }
        }
    }
}

impl Startups {
    /// A table enforcing `cfg` for the relay and `per_source` for each address.
    pub fn new(cfg: MaxStartups, per_source: u32) -> Arc<Startups> {
        Arc::new(Startups {
            cfg,
            per_source,
            held: Mutex::new(Held::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `source` or says why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refusal> {
        let roll = random_percent();
        let mut h = self.lock();
        let from_source = h.by_source.get(&source).copied().unwrap_or(0);
        decide(&self.cfg, self.per_source, h.total, from_source, roll)?;
        h.total += 1;
        *h.by_source.entry(source).or_insert(0) += 1;
        Ok(Permit {
            table: self.clone(),
            source,
        })
    }

    /// Unauthenticated connections held now.
    pub fn held(&self) -> u32 {
        self.lock().total
    }
}

/// The relay-wide table of authenticated connections: at most `per_user` for one user and
/// `total` for all.
pub struct UserSlots {
    per_user: u32,
    total: u32,
    held: Mutex<(u32, HashMap<String, u32>)>,
}

/// Why an authenticated connection was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotRefusal {
    /// The user holds `per_user` connections already.
    User(u32),
    /// The relay holds `total` authenticated connections already.
    Total(u32),
}

impl fmt::Display for SlotRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotRefusal::User(n) => write!(
                f,
                "the user already has {n} connections (max_connections_per_user)"
            ),
            SlotRefusal::Total(n) => write!(
                f,
                "the relay already holds {n} authenticated connections (max_connections)"
            ),
        }
    }
}

/// One authenticated connection's place; dropping it frees the place.
pub struct UserPermit {
    table: Arc<UserSlots>,
    user: String,
}

impl Drop for UserPermit {
    fn drop(&mut self) {
        let mut h = self.table.held.lock().unwrap_or_else(|p| p.into_inner());
        h.0 = h.0.saturating_sub(1);
        if let Some(n) = h.1.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                h.1.remove(&self.user);
            }
        }
    }
}

impl UserSlots {
    /// A table with the given caps.
    pub fn new(per_user: u32, total: u32) -> Arc<UserSlots> {
        Arc::new(UserSlots {
            per_user,
            total,
            held: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a place for `user` or says why not.
    pub fn admit(self: &Arc<Self>, user: &str) -> Result<UserPermit, SlotRefusal> {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if h.0 >= self.total {
            return Err(SlotRefusal::Total(self.total));
        }
        let n = h.1.get(user).copied().unwrap_or(0);
        if n >= self.per_user {
            return Err(SlotRefusal::User(self.per_user));
        }
        h.0 += 1;
        h.1.insert(user.to_string(), n + 1);
        Ok(UserPermit {
            table: self.clone(),
            user: user.to_string(),
        })
    }
}

fn random_percent() -> u32 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b) % 100
}

/// At most `per_window` log lines per `window`; the lines held back are counted and reported
/// with the next one that passes.
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    window_start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter letting `per_window` lines through every `window`.
    pub fn new(per_window: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            per_window,
            window,
            window_start: None,
            passed: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be written now (`n` lines were held back since the last one
    /// written), `None` when this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.window_start {
            Some(t) if now.saturating_duration_since(t) < self.window => {}
            _ => {
                self.window_start = Some(now);
                self.passed = 0;
            }
        }
        if self.passed < self.per_window {
            self.passed += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openssh_forms_and_rejects_nonsense() {
        assert_eq!(
            "10:30:100".parse::<MaxStartups>(),
            Ok(MaxStartups::default())
        );
        assert_eq!(
            "5".parse::<MaxStartups>(),
            Ok(MaxStartups {
                start: 5,
                rate: 100,
                full: 5
            })
        );
        for bad in [
            "",
            "0",
            "10:30",
            "20:30:10",
            "10:101:100",
            "a:b:c",
            "1:2:3:4",
        ] {
            assert!(bad.parse::<MaxStartups>().is_err(), "{bad}");
        }
        assert_eq!(MaxStartups::default().to_string(), "10:30:100");
    }

    #[test]
    fn early_drop_rises_from_rate_to_full() {
        let cfg = MaxStartups::default();
        assert_eq!(decide(&cfg, 1000, 9, 0, 0), Ok(()));
        // at start: 30% refused
        assert_eq!(decide(&cfg, 1000, 10, 0, 29), Err(Refusal::EarlyDrop));
        assert_eq!(decide(&cfg, 1000, 10, 0, 30), Ok(()));
        // half-way: 65%
        assert_eq!(decide(&cfg, 1000, 55, 0, 64), Err(Refusal::EarlyDrop));
        assert_eq!(decide(&cfg, 1000, 55, 0, 65), Ok(()));
        assert_eq!(decide(&cfg, 1000, 100, 0, 99), Err(Refusal::Full));
        assert_eq!(decide(&cfg, 3, 0, 3, 99), Err(Refusal::PerSource));
    }

    #[test]
    fn permits_free_their_place() {
        let t = Startups::new(
            MaxStartups {
                start: 3,
                rate: 100,
                full: 3,
            },
            2,
        );
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 1].into();
        let p1 = t.admit(a).expect("first");
        let p2 = t.admit(a).expect("second");
        assert_eq!(t.admit(a).err(), Some(Refusal::PerSource));
        let p3 = t.admit(b).expect("other address");
        assert_eq!(t.admit(b).err(), Some(Refusal::Full));
        drop(p1);
        assert_eq!(t.held(), 2);
        let _p4 = t.admit(b).expect("a freed place");
        drop((p2, p3));
        assert_eq!(t.held(), 1);
    }

    #[test]
    fn user_slots_cap_one_user_and_everyone() {
        let t = UserSlots::new(2, 3);
        let a1 = t.admit("alice").expect("1");
        let _a2 = t.admit("alice").expect("2");
        assert_eq!(t.admit("alice").err(), Some(SlotRefusal::User(2)));
        let _b1 = t.admit("bob").expect("bob");
        assert_eq!(t.admit("carol").err(), Some(SlotRefusal::Total(3)));
        drop(a1);
        let _c = t.admit("carol").expect("a freed place");
    }

    #[test]
    fn log_limiter_counts_what_it_holds_back() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(0));
    }
}
