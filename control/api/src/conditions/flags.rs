//! Parsing and formatting the values of the condition flags: durations, points in time, source
//! networks and forward destinations.

use std::net::IpAddr;

/// Parses a duration as psmctl takes it (`90s`, `15m`, `2h`, `1h30m`, `7d`).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration like 15m or 2h ({e})"))?;
    let ms = d.as_millis();
    if ms == 0 {
        return Err(format!("'{s}': the duration must be positive"));
    }
    u64::try_from(ms).map_err(|_| format!("'{s}' is too long"))
}

/// A duration in ms as people write it (`2h`, `15m`, `1h 30m`).
pub fn format_duration(ms: u64) -> String {
    let secs = ms / 1000;
    humantime::format_duration(std::time::Duration::from_secs(secs.max(if ms > 0 {
        1
    } else {
        0
    })))
    .to_string()
}

/// Parses a point in time: RFC 3339 (`2026-12-31T18:00:00Z`, `2026-12-31T18:00+01:00`) or a
/// date (`2026-12-31`, midnight UTC). Returns ms since the epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let ts: jiff::Timestamp = match s.parse() {
        Ok(ts) => ts,
        Err(_) => {
            let date: jiff::civil::Date = s.parse().map_err(|_| {
                format!("'{s}' is not a time (RFC 3339, like 2026-12-31T18:00:00Z, or a date)")
            })?;
            date.to_zoned(jiff::tz::TimeZone::UTC)
                .map_err(|e| format!("'{s}': {e}"))?
                .timestamp()
        }
    };
    u64::try_from(ts.as_millisecond()).map_err(|_| format!("'{s}' is before 1970"))
}

/// A time in ms since the epoch as RFC 3339, UTC.
pub fn format_time(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Parses a source network: `10.0.0.0/8`, `2001:db8::/32`, or one address.
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<ipnet::IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("--from '{s}': not a network like 10.0.0.0/8 or an address"))
}

/// Parses a forward destination pattern, `HOST:PORT`, either part a glob (`db*.corp:5432`,
/// `10.0.0.7:*`).
pub fn parse_forward_to(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("--forward-to '{s}': expected HOST:PORT"))?;
    if host.is_empty() || port.is_empty() {
        return Err(format!("--forward-to '{s}': expected HOST:PORT"));
    }
    glob::Pattern::new(host).map_err(|e| format!("--forward-to '{s}': {e}"))?;
    glob::Pattern::new(port).map_err(|e| format!("--forward-to '{s}': {e}"))?;
    if !port.contains(['*', '?', '[']) && port.parse::<u16>().is_err() {
        return Err(format!("--forward-to '{s}': '{port}' is not a port"));
    }
    Ok(s.to_string())
}
