//! The second factor (RFC 6238 TOTP) and the brute-force guard of the login dialogue.
//!
//! Pure bookkeeping with `now` passed in: which time steps were used (a code is accepted once,
//! relay-wide, and psm-control keeps the last step per user across restarts), which
//! (user, address) pairs passed MFA recently (the per-grant MFA cache), and how many logins
//! failed per source address and per user in the last minute (the rate limit; the lockout
//! itself is psm-control's, from the audit events).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

use psm_control_api::User;

/// The prompt users answer.
pub const PROMPT: &str = "psm verification code: ";
/// TOTP time step, seconds.
const STEP_SECS: u64 = 30;
/// Failed logins per source address, or per user, within [`THROTTLE_WINDOW_MS`] after which
/// more attempts are refused without being checked.
pub const THROTTLE_FAILURES: usize = 10;
/// The rate limit's window.
pub const THROTTLE_WINDOW_MS: u64 = 60_000;
/// Entries kept in each table before the oldest are forgotten (bounded memory).
const MAX_ENTRIES: usize = 65_536;

/// Why a verification code was refused (the audit log's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MfaFailure {
    /// The user has no TOTP enrolment.
    NotEnrolled,
    /// Not six digits.
    Malformed,
    /// Not the code of this or an adjacent time step.
    Wrong,
    /// A code that was already accepted once.
    Replayed,
}

impl MfaFailure {
    /// The audit log's reason.
    pub fn reason(self) -> &'static str {
        match self {
            MfaFailure::NotEnrolled => "second factor required but the user has no TOTP enrolment",
            MfaFailure::Malformed => "malformed verification code",
            MfaFailure::Wrong => "wrong verification code",
            MfaFailure::Replayed => "verification code already used",
        }
    }
}

/// The relay-wide MFA state.
#[derive(Default)]
pub struct Mfa {
    used: Mutex<HashMap<String, u64>>,
    cache: Mutex<HashMap<(String, IpAddr), u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The 6-digit code of time step `step` for `secret` (base32).
fn code_at(secret: &[u8], step: u64) -> String {
    totp_rs::TOTP::new_unchecked(
        totp_rs::Algorithm::SHA1,
        6,
        0,
        STEP_SECS,
        secret.to_vec(),
        None,
        String::new(),
    )
    .generate(step * STEP_SECS)
}

/// Equality that takes the same time wherever the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Mfa {
    /// Checks `code` for `user` at `now_ms` (±1 step). On success returns the step, which is
    /// then used: the same code is never accepted again.
    pub fn verify(&self, user: &User, code: &str, now_ms: u64) -> Result<u64, MfaFailure> {
        let totp = user.totp.as_ref().ok_or(MfaFailure::NotEnrolled)?;
        let code = code.trim();
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MfaFailure::Malformed);
        }
        let secret = zeroize::Zeroizing::new(
            totp_rs::Secret::Encoded(totp.secret.expose().to_string())
                .to_bytes()
                .map_err(|_| MfaFailure::NotEnrolled)?,
        );
        let now_step = now_ms / 1000 / STEP_SECS;
        let mut used = lock(&self.used);
        let last = used
            .get(&user.name)
            .copied()
            .unwrap_or(0)
            .max(totp.last_step);
        let mut replayed = false;
        for step in [now_step.saturating_sub(1), now_step, now_step + 1] {
            let expected = code_at(&secret, step);
            if same(expected.as_bytes(), code.as_bytes()) {
                if step <= last {
                    replayed = true;
                    continue;
                }
                if used.len() >= MAX_ENTRIES {
                    used.clear();
                }
                used.insert(user.name.clone(), step);
                return Ok(step);
            }
        }
        Err(if replayed {
            MfaFailure::Replayed
        } else {
            MfaFailure::Wrong
        })
    }

    /// Whether `user` passed MFA from `ip` within `within_ms` before `now_ms`.
    pub fn cached(&self, user: &str, ip: IpAddr, within_ms: u64, now_ms: u64) -> bool {
        lock(&self.cache)
            .get(&(user.to_string(), ip))
            .is_some_and(|t| now_ms.saturating_sub(*t) < within_ms)
    }

    /// `user` passed MFA from `ip` at `now_ms`.
    pub fn remember(&self, user: &str, ip: IpAddr, now_ms: u64) {
        let mut c = lock(&self.cache);
        if c.len() >= MAX_ENTRIES {
            c.clear();
        }
        c.insert((user.to_string(), ip), now_ms);
    }
}

/// Failed logins in the last minute, per source address and per user.
#[derive(Default)]
pub struct Throttle {
    by_source: Mutex<HashMap<IpAddr, VecDeque<u64>>>,
    by_user: Mutex<HashMap<String, VecDeque<u64>>>,
}

fn recent(q: &mut VecDeque<u64>, now_ms: u64) -> usize {
    while q
        .front()
        .is_some_and(|t| now_ms.saturating_sub(*t) >= THROTTLE_WINDOW_MS)
    {
        q.pop_front();
    }
    q.len()
}

impl Throttle {
    /// Whether attempts from `ip` or for `user` are refused now.
    pub fn limited(&self, ip: IpAddr, user: &str, now_ms: u64) -> bool {
        let s = lock(&self.by_source)
            .get_mut(&ip)
            .map(|q| recent(q, now_ms))
            .unwrap_or(0);
        let u = lock(&self.by_user)
            .get_mut(user)
            .map(|q| recent(q, now_ms))
            .unwrap_or(0);
        s >= THROTTLE_FAILURES || u >= THROTTLE_FAILURES
    }

    /// Counts a failure.
    pub fn failed(&self, ip: IpAddr, user: &str, now_ms: u64) {
        count(&mut lock(&self.by_source), ip, now_ms);
        count(&mut lock(&self.by_user), user.to_string(), now_ms);
    }
}

/// Counts a failure of `key` in `table`. A full table makes room without wiping the counts
/// that matter: keys with no failure left in the window go first, then keys with a single one
/// (what a flood of made-up names or addresses leaves behind); a table still full of repeated
/// failures does not count the new key (the other table, and psm-control's lockout, still do).
fn count<K: Eq + std::hash::Hash>(table: &mut HashMap<K, VecDeque<u64>>, key: K, now_ms: u64) {
    if table.len() >= MAX_ENTRIES && !table.contains_key(&key) {
        table.retain(|_, q| recent(q, now_ms) > 0);
        if table.len() >= MAX_ENTRIES {
            table.retain(|_, q| q.len() > 1);
        }
        if table.len() >= MAX_ENTRIES {
            return;
        }
    }
    let q = table.entry(key).or_default();
    recent(q, now_ms);
    if q.len() < THROTTLE_FAILURES * 2 {
        q.push_back(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_control_api::{Secret, Totp};

    const SECRET: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"; // RFC 6238's "12345678901234567890"

    fn user(last_step: u64) -> User {
        User {
            name: "alice".into(),
            totp: Some(Totp {
                secret: Secret::new(SECRET.into()),
                last_step,
            }),
            ..User::default()
        }
    }

    #[test]
    fn rfc6238_vectors_and_one_use_per_code() {
        // RFC 6238 appendix B, SHA-1, T = 59 s: 94287082 (8 digits); 6 digits: 287082
        assert_eq!(code_at(b"12345678901234567890", 59 / 30), "287082");
        assert_eq!(
            code_at(b"12345678901234567890", 1_111_111_109 / 30),
            "081804"
        );
        let m = Mfa::default();
        let now = 1_111_111_109_000;
        let step = now / 1000 / 30;
        let code = code_at(b"12345678901234567890", step);
        assert_eq!(m.verify(&user(0), &code, now), Ok(step));
        assert_eq!(m.verify(&user(0), &code, now), Err(MfaFailure::Replayed));
        // ±1 step: the previous step's code is accepted 30 s later, not 60 s later
        let m = Mfa::default();
        assert_eq!(m.verify(&user(0), &code, now + 30_000), Ok(step));
        let m = Mfa::default();
        assert_eq!(
            m.verify(&user(0), &code, now + 60_000),
            Err(MfaFailure::Wrong)
        );
        // control's last step counts as used too (a relay restart does not reopen a code)
        assert_eq!(
            Mfa::default().verify(&user(step), &code, now),
            Err(MfaFailure::Replayed)
        );
        assert_eq!(m.verify(&user(0), "12345", now), Err(MfaFailure::Malformed));
        assert_eq!(
            m.verify(&User::default(), "123456", now),
            Err(MfaFailure::NotEnrolled)
        );
    }

    #[test]
    fn a_flood_of_made_up_names_does_not_wipe_a_users_failures() {
        let t = Throttle::default();
        let now = 1_000_000;
        for i in 0..THROTTLE_FAILURES as u64 {
            t.failed(
                format!("10.0.0.{i}").parse().expect("ip"),
                "victim",
                now + i,
            );
        }
        let fresh: IpAddr = "10.9.9.9".parse().expect("ip");
        assert!(t.limited(fresh, "victim", now + 100));
        // one failure each for more names than the table holds, from addresses of their own
        for i in 0..MAX_ENTRIES as u64 + 10 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i) + 1));
            t.failed(ip, &format!("made-up-{i}"), now + 200);
        }
        assert!(
            t.limited(fresh, "victim", now + 300),
            "the user's failures survive the flood"
        );
        assert!(lock(&t.by_user).len() <= MAX_ENTRIES);
        assert!(lock(&t.by_source).len() <= MAX_ENTRIES);
    }

    #[test]
    fn cache_and_throttle_are_bounded_in_time() {
        let m = Mfa::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        m.remember("alice", ip, 1000);
        assert!(m.cached("alice", ip, 5000, 5999));
        assert!(!m.cached("alice", ip, 5000, 6000));
        assert!(!m.cached("alice", "10.0.0.2".parse().expect("ip"), 5000, 2000));
        let t = Throttle::default();
        for i in 0..THROTTLE_FAILURES as u64 {
            assert!(!t.limited(ip, "bob", 1000 + i));
            t.failed(ip, "bob", 1000 + i);
        }
        assert!(t.limited(ip, "carol", 2000), "per source");
        assert!(
            t.limited("10.9.9.9".parse().expect("ip"), "bob", 2000),
            "per user"
        );
        assert!(!t.limited(ip, "carol", 1000 + THROTTLE_WINDOW_MS + 10));
    }
}
