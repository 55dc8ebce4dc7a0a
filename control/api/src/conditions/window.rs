//! Recurring time windows: their parsing from `--days`, `--hours` and `--tz`, and whether an
//! instant falls inside one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Days of the week as a bit set, Monday = bit 0 … Sunday = bit 6.
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A recurring time window: some days of the week, a span of the day, in a time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeWindow {
    /// Days as a bit set (Monday = 1, Tuesday = 2, … Sunday = 64).
    pub days: u8,
    /// Start, minutes after midnight (inclusive).
    pub start_min: u16,
    /// End, minutes after midnight (exclusive); at or before the start, the window runs past
    /// midnight into the next day.
    pub end_min: u16,
    /// IANA time zone (`Europe/Paris`, `UTC`).
    pub tz: String,
}

impl TimeWindow {
    /// Parses the psmctl flags: `--days mon-fri` (or `mon,wed,fri`, `all`), `--hours
    /// 08:00-18:00` and `--tz Europe/Paris`. The time zone must be one this machine knows.
    pub fn parse(days: &str, hours: &str, tz: &str) -> Result<TimeWindow, String> {
        let days = parse_days(days)?;
        let (start, end) = hours
            .split_once('-')
            .ok_or_else(|| format!("--hours '{hours}': expected HH:MM-HH:MM"))?;
        let start_min = parse_hhmm(start).map_err(|e| format!("--hours '{hours}': {e}"))?;
        let end_min = parse_hhmm(end).map_err(|e| format!("--hours '{hours}': {e}"))?;
        if start_min == end_min && start_min != 0 {
            return Err(format!("--hours '{hours}': the window is empty"));
        }
        jiff::tz::TimeZone::get(tz).map_err(|e| format!("--tz '{tz}': unknown time zone ({e})"))?;
        Ok(TimeWindow {
            days,
            start_min,
            end_min,
            tz: tz.to_string(),
        })
    }

    /// Whether `now_ms` (ms since the epoch) falls inside the window. An unknown time zone
    /// (a snapshot from a machine with another tz database) is never inside: fail closed.
    pub fn contains(&self, now_ms: u64) -> bool {
        let Ok(tz) = jiff::tz::TimeZone::get(&self.tz) else {
            return false;
        };
        let Ok(ts) = jiff::Timestamp::from_millisecond(now_ms as i64) else {
            return false;
        };
        let z = ts.to_zoned(tz);
        let day = z.weekday().to_monday_zero_offset() as u8;
        let prev = (day + 6) % 7;
        let minute = z.hour() as u16 * 60 + z.minute() as u16;
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.end_min > self.start_min {
            on(day) && minute >= self.start_min && minute < self.end_min
        } else if self.start_min == 0 && self.end_min == 0 {
            on(day)
        } else {
            (on(day) && minute >= self.start_min) || (on(prev) && minute < self.end_min)
        }
    }
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<&str> = (0..7)
            .filter(|d| self.days & (1 << d) != 0)
            .map(|d| DAY_NAMES[d as usize])
            .collect();
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(
            f,
            "{} {}-{} {}",
            days.join(","),
            hm(self.start_min),
            hm(self.end_min),
            self.tz
        )
    }
}

fn parse_days(s: &str) -> Result<u8, String> {
    let day = |d: &str| {
        DAY_NAMES
            .iter()
            .position(|n| *n == d.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("--days '{s}': unknown day '{d}' (mon … sun)"))
    };
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => mask |= 1 << day(part)?,
        }
    }
    Ok(mask)
}

fn parse_hhmm(s: &str) -> Result<u16, String> {
    let (h, m) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not HH:MM"))?;
    let h: u16 = h.parse().map_err(|_| format!("'{s}' is not HH:MM"))?;
    let m: u16 = m.parse().map_err(|_| format!("'{s}' is not HH:MM"))?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(format!("'{s}' is not a time of day"));
    }
    Ok((h * 60 + m) % (24 * 60))
}
