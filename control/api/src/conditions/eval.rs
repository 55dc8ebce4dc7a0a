//! Evaluating a grant's conditions: what they allow (channel kinds, forwards, environment
//! variables, time windows at an instant), the checks made when a grant is created, and the
//! description `grant list` shows.

use std::net::IpAddr;

use super::{format_duration, format_time, parse_forward_to, ChannelKind, Conditions};

/// Whether a forward to `host:port` matches one of `patterns` (host compared case-insensitively).
pub fn forward_allowed(patterns: &[String], host: &str, port: u32) -> bool {
    let opts = glob::MatchOptions {
        case_sensitive: false,
        require_literal_separator: false,
        require_literal_leading_dot: false,
    };
    patterns.iter().any(|p| {
        let Some((h, pt)) = p.rsplit_once(':') else {
            return false;
        };
        let (Ok(h), Ok(pt)) = (glob::Pattern::new(h), glob::Pattern::new(pt)) else {
            return false;
        };
        h.matches_with(host, opts) && pt.matches(&port.to_string())
    })
}

/// A source address as policy sees it: an IPv4-mapped IPv6 address is its IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl Conditions {
    /// Whether `name` may reach the target: `LANG` and `LC_*` always (what Debian's sshd
    /// accepts by default), others only when the grant lists them.
    pub fn env_allowed(&self, name: &str) -> bool {
        name == "LANG"
            || name.starts_with("LC_")
            || self.allow_env.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            })
    }

    /// Checks what psmctl (or an imported document) set, so a grant the relay could not
    /// evaluate is refused when it is made, never at connect time.
    pub fn validate(&self) -> Result<(), String> {
        for w in &self.windows {
            if w.days == 0 || w.days > 0x7f {
                return Err(format!("time window {w}: no valid day"));
            }
            if w.start_min >= 24 * 60 || w.end_min >= 24 * 60 {
                return Err(format!("time window {w}: not a time of day"));
            }
            jiff::tz::TimeZone::get(&w.tz)
                .map_err(|_| format!("time window: unknown time zone '{}'", w.tz))?;
        }
        if let (Some(a), Some(b)) = (self.not_before_ms, self.expires_ms) {
            if a >= b {
                return Err(format!(
                    "--not-before {} is not before --expires {}",
                    format_time(a),
                    format_time(b)
                ));
            }
        }
        for p in &self.forward_to {
            parse_forward_to(p)?;
        }
        if !self.forward_to.is_empty() && !self.allows(ChannelKind::ForwardLocal) {
            return Err("--forward-to needs --allow forward-local".into());
        }
        for (what, v) in [
            ("--max-duration", self.max_duration_ms),
            ("--idle-timeout", self.idle_timeout_ms),
            ("--mfa-cache", self.mfa_cache_ms),
        ] {
            if v == Some(0) {
                return Err(format!("{what}: the duration must be positive"));
            }
        }
        self.rdp.validate()?;
        if let Some(a) = &self.approval {
            if a.count == 0 {
                return Err("--approval: at least one approval".into());
            }
            if a.approvers.is_empty() {
                return Err("--approval needs --approvers @group".into());
            }
            if a.timeout_ms == 0 {
                return Err("--approval-timeout: the duration must be positive".into());
            }
        }
        Ok(())
    }

    /// Whether channels of `kind` are allowed.
    pub fn allows(&self, kind: ChannelKind) -> bool {
        match &self.allow {
            Some(list) => list.contains(&kind),
            None => ChannelKind::DEFAULT.contains(&kind),
        }
    }

    /// Whether a local forward to `host:port` is allowed.
    pub fn forward_allowed(&self, host: &str, port: u32) -> bool {
        self.allows(ChannelKind::ForwardLocal)
            && (self.forward_to.is_empty() || forward_allowed(&self.forward_to, host, port))
    }

    /// The allowed channel kinds, for display.
    pub fn allowed_kinds(&self) -> Vec<ChannelKind> {
        match &self.allow {
            Some(list) => list.clone(),
            None => ChannelKind::DEFAULT.to_vec(),
        }
    }

    /// Whether these conditions restrict the session while it runs (beyond the start).
    pub fn in_window(&self, now_ms: u64) -> bool {
        self.windows.is_empty() || self.windows.iter().any(|w| w.contains(now_ms))
    }

    /// One line per condition, for `grant list` and `policy check`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.windows {
            out.push(format!("window {w}"));
        }
        if let Some(t) = self.not_before_ms {
            out.push(format!("not before {}", format_time(t)));
        }
        if let Some(t) = self.expires_ms {
            out.push(format!("expires {}", format_time(t)));
        }
        if !self.from.is_empty() {
            let nets: Vec<String> = self.from.iter().map(|n| n.to_string()).collect();
            out.push(format!("from {}", nets.join(", ")));
        }
        if let Some(d) = self.max_duration_ms {
            out.push(format!("max duration {}", format_duration(d)));
        }
        if let Some(d) = self.idle_timeout_ms {
            out.push(format!("idle timeout {}", format_duration(d)));
        }
        if self.allow.is_some() {
            let kinds: Vec<&str> = self.allowed_kinds().iter().map(|k| k.as_str()).collect();
            out.push(format!("allow {}", kinds.join(",")));
        }
        if !self.forward_to.is_empty() {
            out.push(format!("forward to {}", self.forward_to.join(", ")));
        }
        if !self.allow_env.is_empty() {
            out.push(format!("env {}", self.allow_env.join(",")));
        }
        if self.mfa {
            out.push("mfa".into());
        }
        if let Some(d) = self.mfa_cache_ms {
            out.push(format!("mfa cache {}", format_duration(d)));
        }
        if self.reason_required {
            out.push("reason required".into());
        }
        if self.unrecorded_tcp {
            out.push("unrecorded tcp".into());
        }
        if self.unrecorded {
            out.push("unrecorded".into());
        }
        if let Some(a) = self.command_default {
            out.push(format!("commands default {a}"));
        }
        out.extend(self.rdp.describe());
        if let Some(a) = &self.approval {
            out.push(format!(
                "approval {} of @{} (timeout {}{})",
                a.count,
                a.approvers,
                format_duration(a.timeout_ms),
                if a.covers_ms > 0 {
                    format!(", covers {}", format_duration(a.covers_ms))
                } else {
                    String::new()
                }
            ));
        }
        out
    }
}
