//! The conditions a grant carries, their parsing from psmctl flags, and their evaluation at a
//! given instant. Pure functions of the condition and `now`: no clock is read here.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A kind of channel (or channel request) a grant may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelKind {
    /// An interactive shell (`shell` request).
    Shell,
    /// A command (`exec` request) other than legacy scp.
    Exec,
    /// The `sftp` subsystem (also what OpenSSH's `scp` uses since 9.0).
    Sftp,
    /// Legacy scp (`exec scp -t|-f …`, `scp -O`).
    Scp,
    /// Local port forwarding (`direct-tcpip` channels, `ssh -L`, `ssh -W`).
    ForwardLocal,
    /// Remote port forwarding (`tcpip-forward`, `ssh -R`).
    ForwardRemote,
    /// SSH agent forwarding (`ssh -A`).
    Agent,
}

impl ChannelKind {
    /// Every kind, in display order.
    pub const ALL: [ChannelKind; 7] = [
        ChannelKind::Shell,
        ChannelKind::Exec,
        ChannelKind::Sftp,
        ChannelKind::Scp,
        ChannelKind::ForwardLocal,
        ChannelKind::ForwardRemote,
        ChannelKind::Agent,
    ];
    /// What a grant allows when it does not say.
    pub const DEFAULT: [ChannelKind; 4] = [
        ChannelKind::Shell,
        ChannelKind::Exec,
        ChannelKind::Sftp,
        ChannelKind::Scp,
    ];

    /// The flag spelling (`forward-local`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Shell => "shell",
            ChannelKind::Exec => "exec",
            ChannelKind::Sftp => "sftp",
            ChannelKind::Scp => "scp",
            ChannelKind::ForwardLocal => "forward-local",
            ChannelKind::ForwardRemote => "forward-remote",
            ChannelKind::Agent => "agent",
        }
    }

    /// Parses [`ChannelKind::as_str`].
    pub fn parse(s: &str) -> Result<ChannelKind, String> {
        ChannelKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown channel kind '{s}' (expected one of: {})",
                    ChannelKind::ALL.map(|k| k.as_str()).join(", ")
                )
            })
    }

    /// The kind of an `exec` request: legacy scp when the command runs `scp` in server mode.
    pub fn of_exec(command: &str) -> ChannelKind {
        let mut words = command.split_ascii_whitespace();
        let prog = words.next().unwrap_or_default();
        let prog = prog.rsplit('/').next().unwrap_or(prog);
        if prog == "scp"
            && words.any(|w| w.starts_with('-') && (w.contains('t') || w.contains('f')))
        {
            ChannelKind::Scp
        } else {
            ChannelKind::Exec
        }
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// Dual control on a grant: the session waits until `count` members of `approvers` approve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRule {
    /// Approvals needed (other users than the requester).
    pub count: u32,
    /// The group whose members may approve.
    pub approvers: String,
    /// How long a request waits before it expires, ms.
    pub timeout_ms: u64,
    /// How long an approval also covers later sessions of the same user to the same account,
    /// ms (0: this session only).
    #[serde(default)]
    pub covers_ms: u64,
}

/// Conditions a grant may carry; every one is optional, and the empty set means "always, from
/// anywhere, for shells, commands and file transfers".
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Conditions {
    /// Environment variables this grant lets the client pass to the target beyond `LANG` and
    /// `LC_*`: exact names, or a prefix ending in `*` (`GIT_*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_env: Vec<String>,
    /// Time windows; a session may start (and continue) only inside one of them. None: always.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<TimeWindow>,
    /// The grant is valid from this time on (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// The grant is valid until this time (ms since the epoch, exclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// Source networks the user may connect from. None: anywhere.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<ipnet::IpNet>,
    /// Longest a session may last, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration_ms: Option<u64>,
    /// Longest a session may go without input from the user, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Channel kinds allowed; None: [`ChannelKind::DEFAULT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<ChannelKind>>,
    /// Destinations local forwards may reach (`HOST:PORT` globs). Empty: any, when
    /// `forward-local` is allowed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forward_to: Vec<String>,
    /// The user must give a reason (or a ticket number) before the session starts.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reason_required: bool,
    /// A second factor (TOTP) is required.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mfa: bool,
    /// A successful second factor by the same user from the same address within this long is
    /// accepted again (ms); None: ask every time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfa_cache_ms: Option<u64>,
    /// Dual control.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRule>,
    /// What happens to a command no command rule matches (None: allow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_default: Option<crate::CommandAction>,
    /// Which RDP virtual channels an RDP session may use (ignored by SSH sessions).
    #[serde(skip_serializing_if = "RdpChannels::is_default")]
    pub rdp: RdpChannels,
    /// The grant allows a `tcp` target's payload to pass unrecorded (pass-through); without it
    /// a lease on a `tcp` target is refused.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unrecorded_tcp: bool,
    /// Sessions under this grant (SSH and RDP) are relayed without a recording: still decided,
    /// governed and audited (`session_start` says `recorded: false`), never recorded, and not
    /// refused while psm-recorder is down. Off unless a grant says so (`--unrecorded`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unrecorded: bool,
}

/// Which way the clipboard may carry data in an RDP session.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClipboardRule {
    /// No clipboard (the default: fail closed).
    #[default]
    None,
    /// Copy on the user's machine, paste on the target.
    ToTarget,
    /// Copy on the target, paste on the user's machine.
    FromTarget,
    /// Both ways.
    Both,
}

impl ClipboardRule {
    /// Whether data may flow from the user's machine to the target.
    pub fn to_target(self) -> bool {
        matches!(self, ClipboardRule::ToTarget | ClipboardRule::Both)
    }
    /// Whether data may flow from the target to the user's machine.
    pub fn from_target(self) -> bool {
        matches!(self, ClipboardRule::FromTarget | ClipboardRule::Both)
    }
}

impl std::str::FromStr for ClipboardRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ClipboardRule::None),
            "to-target" => Ok(ClipboardRule::ToTarget),
            "from-target" => Ok(ClipboardRule::FromTarget),
            "both" => Ok(ClipboardRule::Both),
            other => Err(format!(
                "unknown clipboard rule '{other}' (none, to-target, from-target or both)"
            )),
        }
    }
}

impl std::fmt::Display for ClipboardRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClipboardRule::None => "none",
            ClipboardRule::ToTarget => "to-target",
            ClipboardRule::FromTarget => "from-target",
            ClipboardRule::Both => "both",
        })
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The RDP virtual channels a grant lets a session use. Refused channels are removed or
/// answered by the relay so that the client keeps working, and each refusal is audited.
/// The default refuses everything that moves data between the user's machine and the target
/// (clipboard, drives, printers, smart cards) and allows audio output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RdpChannels {
    /// Clipboard (`cliprdr`).
    #[serde(skip_serializing_if = "is_none_clipboard")]
    pub clipboard: ClipboardRule,
    /// Drive redirection (`rdpdr` drives).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drive: bool,
    /// Printer redirection (`rdpdr` printers).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub printer: bool,
    /// Smart-card redirection (`rdpdr` smart cards).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub smartcard: bool,
    /// Audio output (`rdpsnd`) and input (`AUDIO_INPUT`).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub audio: bool,
    /// Other static or dynamic virtual channels allowed, by name (case-insensitive).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

fn is_none_clipboard(c: &ClipboardRule) -> bool {
    *c == ClipboardRule::None
}

impl Default for RdpChannels {
    fn default() -> Self {
        RdpChannels {
            clipboard: ClipboardRule::None,
            drive: false,
            printer: false,
            smartcard: false,
            audio: true,
            channels: Vec::new(),
        }
    }
}

impl RdpChannels {
    /// Whether these are the defaults (left out of the snapshot).
    pub fn is_default(&self) -> bool {
        *self == RdpChannels::default()
    }

    /// Whether a channel not covered by a named rule may be used.
    pub fn other_allowed(&self, name: &str) -> bool {
        self.channels.iter().any(|c| c.eq_ignore_ascii_case(name))
    }

    /// What differs from the defaults, one phrase each (`clipboard to-target`, `drive`,
    /// `no audio`, `rdp channel rail`), for `grant list` and the audit log.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.clipboard != ClipboardRule::None {
            out.push(format!("clipboard {}", self.clipboard));
        }
        for (on, what) in [
            (self.drive, "drive"),
            (self.printer, "printer"),
            (self.smartcard, "smartcard"),
        ] {
            if on {
                out.push(what.to_string());
            }
        }
        if !self.audio {
            out.push("no audio".into());
        }
        if !self.channels.is_empty() {
            out.push(format!("rdp channels {}", self.channels.join(",")));
        }
        out
    }

    /// Checks the channel names: 1 to 64 printable ASCII characters without spaces or commas
    /// (static channels have at most 7, dynamic ones are longer, `Microsoft::Windows::…`).
    pub fn validate(&self) -> Result<(), String> {
        for c in &self.channels {
            if c.is_empty()
                || c.len() > 64
                || !c.chars().all(|ch| ch.is_ascii_graphic() && ch != ',')
            {
                return Err(format!(
                    "--rdp-channel {}: a channel name is 1 to 64 printable characters without spaces or commas",
                    crate::escape(c)
                ));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    #[test]
    fn rdp_channel_rules_describe_and_validate() {
        let mut c = Conditions::default();
        assert!(c.describe().is_empty(), "defaults say nothing");
        c.rdp = RdpChannels {
            clipboard: ClipboardRule::FromTarget,
            drive: true,
            printer: false,
            smartcard: true,
            audio: false,
            channels: vec![
                "rail".into(),
                "Microsoft::Windows::RDS::DisplayControl".into(),
            ],
        };
        assert_eq!(
            c.describe(),
            [
                "clipboard from-target",
                "drive",
                "smartcard",
                "no audio",
                "rdp channels rail,Microsoft::Windows::RDS::DisplayControl"
            ]
        );
        assert!(c.validate().is_ok());
        c.rdp.channels.push("two words".into());
        assert!(c.validate().expect_err("space").contains("--rdp-channel"));
    }

    use super::*;

    fn at(s: &str) -> u64 {
        parse_time(s).expect("time")
    }

    #[test]
    fn windows_follow_the_time_zone_and_the_days() {
        let w = TimeWindow::parse("mon-fri", "08:00-18:00", "Europe/Paris").expect("window");
        assert_eq!(
            w.to_string(),
            "mon,tue,wed,thu,fri 08:00-18:00 Europe/Paris"
        );
        // Thursday 2026-12-03: Paris is UTC+1 in winter
        assert!(!w.contains(at("2026-12-03T06:59:59Z")));
        assert!(w.contains(at("2026-12-03T07:00:00Z")));
        assert!(w.contains(at("2026-12-03T16:59:59Z")));
        assert!(!w.contains(at("2026-12-03T17:00:00Z")));
        // Saturday
        assert!(!w.contains(at("2026-12-05T10:00:00Z")));
        // summer time: UTC+2
        assert!(w.contains(at("2026-07-01T06:00:00Z")));
        assert!(!w.contains(at("2026-07-01T05:59:00Z")));
        // overnight, Friday night into Saturday morning
        let n = TimeWindow::parse("fri", "22:00-02:00", "UTC").expect("window");
        assert!(n.contains(at("2026-12-04T23:00:00Z")));
        assert!(n.contains(at("2026-12-05T01:59:00Z")));
        assert!(!n.contains(at("2026-12-05T02:00:00Z")));
        assert!(!n.contains(at("2026-12-03T23:00:00Z")));
        // wrapping day range
        let we = TimeWindow::parse("sat-mon", "00:00-24:00", "UTC").expect("window");
        assert!(we.contains(at("2026-12-06T12:00:00Z")));
        assert!(we.contains(at("2026-12-07T12:00:00Z")));
        assert!(!we.contains(at("2026-12-08T12:00:00Z")));
        // a zone unknown to the machine that evaluates it never matches
        let bad = TimeWindow {
            tz: "Mars/Olympus".into(),
            ..w.clone()
        };
        assert!(!bad.contains(at("2026-12-03T10:00:00Z")));
    }

    #[test]
    fn bad_flags_name_the_problem() {
        for (d, h, tz, needle) in [
            ("mon-fry", "08:00-18:00", "UTC", "unknown day 'fry'"),
            ("mon", "8-18", "UTC", "HH:MM"),
            ("mon", "08:00-25:00", "UTC", "not a time of day"),
            ("mon", "08:00-18:00", "Europe/Pariss", "unknown time zone"),
            ("mon", "08:00-08:00", "UTC", "empty"),
        ] {
            let e = TimeWindow::parse(d, h, tz).expect_err(needle);
            assert!(e.contains(needle), "{e}");
        }
        assert!(parse_duration("2h").is_ok_and(|ms| ms == 7_200_000));
        assert!(parse_duration("1h30m").is_ok_and(|ms| ms == 5_400_000));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(format_duration(7_200_000), "2h");
        assert_eq!(format_duration(900_000), "15m");
        assert!(parse_time("2026-12-31").is_ok());
        assert!(parse_time("tomorrow").is_err());
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("2001:db8::/32").is_ok());
        assert!(parse_cidr("127.0.0.2").is_ok());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_forward_to("db*.corp:5432").is_ok());
        assert!(parse_forward_to("db:http").is_err());
        assert!(parse_forward_to("nocolon").is_err());
        assert!(ChannelKind::parse("forward-local").is_ok());
        assert!(ChannelKind::parse("x11").is_err());
    }

    #[test]
    fn channel_kinds_and_forwards() {
        let c = Conditions::default();
        for k in ChannelKind::DEFAULT {
            assert!(c.allows(k));
        }
        assert!(!c.allows(ChannelKind::ForwardLocal));
        assert!(!c.forward_allowed("db", 5432));
        let c = Conditions {
            allow: Some(vec![ChannelKind::ForwardLocal]),
            forward_to: vec!["db*.corp:5432".into(), "10.0.0.7:*".into()],
            ..Conditions::default()
        };
        assert!(!c.allows(ChannelKind::Shell));
        assert!(c.forward_allowed("DB1.corp", 5432));
        assert!(c.forward_allowed("10.0.0.7", 22));
        assert!(!c.forward_allowed("db1.corp", 5433));
        assert!(!c.forward_allowed("evil.example", 5432));
        assert_eq!(ChannelKind::of_exec("scp -t /tmp"), ChannelKind::Scp);
        assert_eq!(ChannelKind::of_exec("/usr/bin/scp -f x"), ChannelKind::Scp);
        assert_eq!(ChannelKind::of_exec("scpx -t"), ChannelKind::Exec);
        assert_eq!(ChannelKind::of_exec("ls -t"), ChannelKind::Exec);
    }

    #[test]
    fn conditions_written_before_they_existed_still_parse() {
        let old: Conditions = serde_json::from_str(r#"{"allow_env":["TZ"]}"#).expect("old");
        assert_eq!(old.allow_env, vec!["TZ".to_string()]);
        assert!(old.windows.is_empty() && !old.mfa);
        assert_eq!(
            serde_json::to_string(&Conditions::default()).expect("json"),
            "{}"
        );
        assert_eq!(
            canonical_ip("::ffff:10.1.2.3".parse().expect("ip")).to_string(),
            "10.1.2.3"
        );
    }
}
