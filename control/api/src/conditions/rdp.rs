//! The RDP rules of a grant: which virtual channels a session may use, and which way the
//! clipboard may carry data.

use serde::{Deserialize, Serialize};

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
