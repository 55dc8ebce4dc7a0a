//! The conditions flags of `grant add` and the `USERNAME@TARGET` / `USERNAME@@TARGETGROUP`
//! side of a grant.

use clap::Args;
use psm_control_api::conditions::{
    parse_cidr, parse_duration, parse_forward_to, parse_time, ApprovalRule,
};
use psm_control_api::{ChannelKind, CommandAction, Conditions, TimeWindow};

use super::usage;
use crate::cli::CliError;
use crate::validate::{self, Invalid};

/// The conditions flags of `grant add`.
#[derive(Debug, Default, Args)]
pub struct ConditionFlags {
    /// Days of a time window (`mon-fri`, `sat,sun`, `all`); with --hours and --tz. Repeat the
    /// three for several windows.
    #[arg(long, value_name = "DAYS")]
    pub days: Vec<String>,
    /// Hours of a time window, `HH:MM-HH:MM` (past midnight when the end is before the start).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    pub hours: Vec<String>,
    /// Time zone of the windows (IANA name; default UTC).
    #[arg(long, value_name = "ZONE")]
    pub tz: Vec<String>,
    /// The grant is valid from this time (RFC 3339 or a date).
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// The grant expires at this time (RFC 3339 or a date).
    #[arg(long, value_name = "TIME")]
    pub expires: Option<String>,
    /// A source network the user may connect from (repeat for more).
    #[arg(long = "from", value_name = "CIDR")]
    pub from: Vec<String>,
    /// Longest a session may last (`2h`).
    #[arg(long, value_name = "DURATION")]
    pub max_duration: Option<String>,
    /// End a session after this long without input from the user (`15m`).
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Channel kinds allowed, comma separated (shell, exec, sftp, scp, forward-local,
    /// forward-remote, agent; default shell,exec,sftp,scp).
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// A destination local forwards may reach, HOST:PORT (globs allowed; repeat for more).
    #[arg(long = "forward-to", value_name = "HOST:PORT")]
    pub forward_to: Vec<String>,
    /// The user must give a reason before the session starts.
    #[arg(long)]
    pub reason_required: bool,
    /// Allow a `tcp` target's payload to pass through unrecorded (required for `tcp` targets).
    #[arg(long)]
    pub unrecorded_tcp: bool,
    /// Relay this grant's SSH and RDP sessions without recording them (audited as
    /// `recorded: false`; psm-recorder being down does not refuse them).
    #[arg(long)]
    pub unrecorded: bool,
    /// Require the TOTP second factor.
    #[arg(long)]
    pub mfa: bool,
    /// Accept an MFA success by the same user from the same address within this long (`8h`).
    #[arg(long, value_name = "DURATION")]
    pub mfa_cache: Option<String>,
    /// Approvals needed before a session starts (dual control); with --approvers.
    #[arg(long, value_name = "N")]
    pub approval: Option<u32>,
    /// The group whose members may approve (`@secops`).
    #[arg(long, value_name = "@GROUP")]
    pub approvers: Option<String>,
    /// How long a request waits for approval (default 10m).
    #[arg(long, value_name = "DURATION")]
    pub approval_timeout: Option<String>,
    /// How long an approval also covers later sessions of the same user to the same account
    /// (default: this session only).
    #[arg(long, value_name = "DURATION")]
    pub approval_covers: Option<String>,
    /// What happens to a command no command rule matches: allow (default) or deny (an
    /// allow-list grant).
    #[arg(long, value_name = "allow|deny")]
    pub commands_default: Option<String>,
    /// RDP: which way the clipboard may carry data (default none). SSH sessions ignore the
    /// RDP flags, and RDP sessions the SSH-only ones (--allow, --forward-to, --allow-env,
    /// command rules).
    #[arg(
        long,
        value_name = "none|to-target|from-target|both",
        help_heading = "RDP"
    )]
    pub clipboard: Option<psm_control_api::ClipboardRule>,
    /// RDP: allow drive redirection.
    #[arg(long, help_heading = "RDP")]
    pub drive: bool,
    /// RDP: allow printer redirection.
    #[arg(long, help_heading = "RDP")]
    pub printer: bool,
    /// RDP: allow smart-card redirection.
    #[arg(long, help_heading = "RDP")]
    pub smartcard: bool,
    /// RDP: no audio (sound output and microphone); audio is allowed by default.
    #[arg(long, help_heading = "RDP")]
    pub no_audio: bool,
    /// RDP: allow another static or dynamic virtual channel by name (repeat for more).
    #[arg(long = "rdp-channel", value_name = "NAME", help_heading = "RDP")]
    pub rdp_channel: Vec<String>,
}

impl ConditionFlags {
    /// The conditions these flags set, validated (a condition the relay could not evaluate is
    /// refused here).
    pub fn conditions(&self, allow_env: Vec<String>) -> Result<Conditions, CliError> {
        let mut c = Conditions {
            allow_env,
            ..Conditions::default()
        };
        if self.hours.len() != self.days.len() && !(self.days.is_empty() || self.hours.is_empty()) {
            return Err(usage(
                "give --days and --hours the same number of times".into(),
            ));
        }
        let n = self.days.len().max(self.hours.len());
        for i in 0..n {
            let days = self.days.get(i).map(String::as_str).unwrap_or("all");
            let hours = self
                .hours
                .get(i)
                .map(String::as_str)
                .unwrap_or("00:00-24:00");
            let tz = self
                .tz
                .get(i)
                .or(self.tz.last())
                .map(String::as_str)
                .unwrap_or("UTC");
            c.windows
                .push(TimeWindow::parse(days, hours, tz).map_err(usage)?);
        }
        if n == 0 && !self.tz.is_empty() {
            return Err(usage("--tz needs --days and/or --hours".into()));
        }
        c.not_before_ms = self
            .not_before
            .as_deref()
            .map(parse_time)
            .transpose()
            .map_err(|e| usage(format!("--not-before: {e}")))?;
        c.expires_ms = self
            .expires
            .as_deref()
            .map(parse_time)
            .transpose()
            .map_err(|e| usage(format!("--expires: {e}")))?;
        for f in &self.from {
            c.from.push(parse_cidr(f).map_err(usage)?);
        }
        let dur = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| usage(format!("{flag}: {e}")))
        };
        c.max_duration_ms = dur("--max-duration", &self.max_duration)?;
        c.idle_timeout_ms = dur("--idle-timeout", &self.idle_timeout)?;
        c.mfa_cache_ms = dur("--mfa-cache", &self.mfa_cache)?;
        if !self.allow.is_empty() {
            let mut kinds = Vec::new();
            for k in &self.allow {
                let k = ChannelKind::parse(k.trim()).map_err(|e| usage(format!("--allow: {e}")))?;
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
            c.allow = Some(kinds);
        }
        for f in &self.forward_to {
            c.forward_to.push(parse_forward_to(f).map_err(usage)?);
        }
        c.reason_required = self.reason_required;
        c.unrecorded_tcp = self.unrecorded_tcp;
        c.unrecorded = self.unrecorded;
        c.command_default = match self.commands_default.as_deref() {
            None => None,
            Some("allow") => Some(CommandAction::Allow),
            Some("deny") => Some(CommandAction::Deny),
            Some(other) => {
                return Err(usage(format!(
                    "--commands-default '{other}': expected allow or deny"
                )))
            }
        };
        c.mfa = self.mfa || c.mfa_cache_ms.is_some();
        c.rdp = psm_control_api::RdpChannels {
            clipboard: self.clipboard.unwrap_or_default(),
            drive: self.drive,
            printer: self.printer,
            smartcard: self.smartcard,
            audio: !self.no_audio,
            channels: self.rdp_channel.clone(),
        };
        match (self.approval, &self.approvers) {
            (Some(count), Some(group)) => {
                let group = group.strip_prefix('@').unwrap_or(group).to_string();
                c.approval = Some(ApprovalRule {
                    count,
                    approvers: group,
                    timeout_ms: dur("--approval-timeout", &self.approval_timeout)?
                        .unwrap_or(10 * 60 * 1000),
                    covers_ms: dur("--approval-covers", &self.approval_covers)?.unwrap_or(0),
                });
            }
            (None, None) => {}
            _ => {
                return Err(usage(
                    "give --approval N together with --approvers @GROUP".into(),
                ))
            }
        }
        c.validate().map_err(usage)?;
        Ok(c)
    }
}

/// `USERNAME@TARGET` or `USERNAME@@TARGETGROUP`: the account and the target side of a grant.
pub fn split_grant_target(spec: &str) -> Result<(String, String), Invalid> {
    match spec.split_once("@@") {
        Some((account, group)) => {
            validate::account_name(account)?;
            validate::target_name(group)?;
            Ok((account.to_string(), format!("@{group}")))
        }
        None => validate::split_account(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli_policy::qr;

    #[test]
    fn flags_make_validated_conditions() {
        let f = ConditionFlags {
            days: vec!["mon-fri".into()],
            hours: vec!["08:00-18:00".into()],
            tz: vec!["Europe/Paris".into()],
            from: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            max_duration: Some("2h".into()),
            idle_timeout: Some("15m".into()),
            allow: vec!["shell".into(), "forward-local".into()],
            forward_to: vec!["db*:5432".into()],
            mfa_cache: Some("8h".into()),
            ..ConditionFlags::default()
        };
        let c = f.conditions(vec![]).expect("valid");
        assert_eq!(c.windows.len(), 1);
        assert_eq!(c.from.len(), 2);
        assert_eq!(c.max_duration_ms, Some(7_200_000));
        assert!(c.mfa, "a cache implies mfa");
        assert!(c.forward_allowed("db1", 5432) && !c.allows(ChannelKind::Exec));
        for (bad, needle) in [
            (
                ConditionFlags {
                    tz: vec!["Nowhere/City".into()],
                    days: vec!["mon".into()],
                    ..ConditionFlags::default()
                },
                "unknown time zone",
            ),
            (
                ConditionFlags {
                    forward_to: vec!["db:5432".into()],
                    ..ConditionFlags::default()
                },
                "needs --allow forward-local",
            ),
            (
                ConditionFlags {
                    approval: Some(2),
                    ..ConditionFlags::default()
                },
                "--approvers",
            ),
            (
                ConditionFlags {
                    not_before: Some("2027-01-02".into()),
                    expires: Some("2027-01-01".into()),
                    ..ConditionFlags::default()
                },
                "is not before",
            ),
            (
                ConditionFlags {
                    allow: vec!["x11".into()],
                    ..ConditionFlags::default()
                },
                "unknown channel kind",
            ),
        ] {
            let e = bad.conditions(vec![]).expect_err(needle).to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert_eq!(
            split_grant_target("root@@prod").expect("group"),
            ("root".to_string(), "@prod".to_string())
        );
        assert_eq!(
            split_grant_target("root@web01").expect("target"),
            ("root".to_string(), "web01".to_string())
        );
        assert!(qr("otpauth://totp/psm:alice?secret=AAAA&issuer=psm")
            .is_ok_and(|q| q.lines().count() > 10));
    }
}
