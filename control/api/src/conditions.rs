//! The conditions a grant carries, their parsing from psmctl flags, and their evaluation at a
//! given instant. Pure functions of the condition and `now`: no clock is read here.

use std::fmt;

use serde::{Deserialize, Serialize};

mod eval;
mod flags;
mod rdp;
mod window;

pub use eval::{canonical_ip, forward_allowed};
pub use flags::{
    format_duration, format_time, parse_cidr, parse_duration, parse_forward_to, parse_time,
};
pub use rdp::{ClipboardRule, RdpChannels};
pub use window::TimeWindow;

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

    /// The kind of an `exec` request: legacy scp when the command runs `scp` in server mode
    /// ([`ScpCommand::parse`](crate::scp::ScpCommand::parse), which the relay's transfer tap
    /// reads too).
    pub fn of_exec(command: &str) -> ChannelKind {
        if crate::scp::ScpCommand::parse(command).is_some() {
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
        assert_eq!(ChannelKind::of_exec("'scp' -t /tmp/x"), ChannelKind::Scp);
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
