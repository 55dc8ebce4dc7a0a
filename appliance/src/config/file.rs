//! The file: the schema of `psm.toml` ([`FileConfig`] and its tables), and reading and parsing
//! it, with errors that name the line and column.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, CONFIG_FILE};

/// The contents of `psm.toml`. Every table and key is optional; unknown ones are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[relay]`: the SSH and RDP listeners that users connect to.
    #[serde(default)]
    pub relay: RelayConfig,
    /// `[control]`: psm-control's settings.
    #[serde(default)]
    pub control: ControlConfig,
    /// `[policy]`: settings that apply to every grant.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// `[recorder]`: psm-recorder's settings.
    #[serde(default)]
    pub recorder: RecorderConfig,
    /// `[[siem.sink]]`: where psm-control exports the audit stream (syslog receivers).
    #[serde(default)]
    pub siem: psm_control::siem::config::SiemTable,
}

/// The `[policy]` table of `psm.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `"required"`: every session needs a second factor; `"per-grant"` (default): grants
    /// that say `--mfa`.
    pub mfa: Option<Spanned<String>>,
    /// Failed logins that lock a user (default 5; 1 to 1000).
    pub lockout_failures: Option<Spanned<i64>>,
    /// The window failed logins are counted in and the lock's length, as `15m` (default).
    pub lockout_window: Option<Spanned<String>>,
}

/// The `[control]` table of `psm.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Shortest password a psm user may have (default 12; 8 to 1024).
    pub min_password_length: Option<Spanned<i64>>,
    /// Audit events between two signed audit checkpoints (default 1000; 1 to 1000000); one is
    /// also written whenever psm-control stops.
    pub audit_checkpoint_every: Option<Spanned<i64>>,
    /// Recordings last written longer ago than this are deleted (`90d`; default: kept).
    pub retention_max_age: Option<Spanned<String>>,
    /// When the recordings take more bytes than this, the oldest are deleted.
    pub retention_max_bytes: Option<Spanned<i64>>,
    /// How often retention looks (default `1m`).
    pub retention_interval: Option<Spanned<String>>,
    /// The live audit segment is rotated once it holds this many bytes (default 64 MiB;
    /// at least 1024).
    pub audit_rotate_bytes: Option<Spanned<i64>>,
    /// The live audit segment is rotated once its first event is this old (default `1d`).
    pub audit_rotate_interval: Option<Spanned<String>>,
    /// Closed audit segments older than this are deleted (`365d`; default: kept).
    pub audit_retention_max_age: Option<Spanned<String>>,
    /// When the closed audit segments take more bytes than this, the oldest are deleted.
    pub audit_retention_max_bytes: Option<Spanned<i64>>,
    /// Serve psm-control's counters in the Prometheus text format on this `host:port` (off by
    /// default).
    pub metrics_listen: Option<Spanned<String>>,
}

/// The `[recorder]` table of `psm.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecorderConfig {
    /// The recording key (64 hex digits, mode 0600; `psmctl recordings keygen FILE` makes one):
    /// new recordings are encrypted at rest with it. Relative to the config file's directory.
    /// Default: recordings are not encrypted.
    pub encryption_key_file: Option<Spanned<String>>,
    /// Put the text of encrypted recordings into the search index anyway, where it is in the
    /// clear (default false: encrypted recordings are not searchable).
    pub index_encrypted: Option<Spanned<bool>>,
    /// Serve psm-recorder's counters in the Prometheus text format on this `host:port` (off
    /// by default).
    pub metrics_listen: Option<Spanned<String>>,
}

/// The `[relay]` table of `psm.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Socket address the relay accepts SSH connections on, `host:port` (default `0.0.0.0:2222`).
    pub listen: Option<Spanned<String>>,
    /// Number of relay worker threads, one per core is best (default: the number of CPUs;
    /// 1 to 1024).
    pub workers: Option<Spanned<i64>>,
    /// Seconds a client has to authenticate, handshake included (default 60; 1 to 3600).
    pub login_grace_secs: Option<Spanned<i64>>,
    /// Unauthenticated connections the relay holds, `N` or `start:rate:full` as OpenSSH's
    /// MaxStartups (default `"10:30:100"`).
    pub max_startups: Option<Spanned<String>>,
    /// Unauthenticated connections one source address may hold (default 10; 1 to 100000).
    pub per_source_max_startups: Option<Spanned<i64>>,
    /// Seconds of silence from a target before a keepalive is sent (default 15; 1 to 3600).
    pub target_keepalive_secs: Option<Spanned<i64>>,
    /// Unanswered keepalives after which a target is given up (default 3; 1 to 100).
    pub target_keepalive_max: Option<Spanned<i64>>,
    /// Authenticated connections one psm user may hold (default 32; 1 to 100000).
    pub max_connections_per_user: Option<Spanned<i64>>,
    /// Authenticated connections the relay holds in all (default 4096; 1 to 1000000).
    pub max_connections: Option<Spanned<i64>>,
    /// Relayed bytes a session may have that psm-recorder has not confirmed durable (default
    /// 1048576; 4096 to 1073741824).
    pub durable_window_bytes: Option<Spanned<i64>>,
    /// Milliseconds the oldest unconfirmed byte may wait (default 1000; 100 to 60000).
    pub durable_window_ms: Option<Spanned<i64>>,
    /// Seconds a session may stay stopped on a full durable window before its recording counts
    /// as failed and the session ends (default 30; 1 to 3600).
    pub recorder_stall_secs: Option<Spanned<i64>>,
    /// Socket address the relay accepts RDP connections on, `host:port` (default
    /// `0.0.0.0:3389`), or `"off"`.
    pub rdp_listen: Option<Spanned<String>>,
    /// Where users' RDP clients reach psm, `host` or `host:port`, when that is not the listen
    /// address (NAT, a DNS name): `psmctl rdp-file` writes it into `.rdp` files.
    pub rdp_public_address: Option<Spanned<String>>,
    /// The relay's RDP TLS certificate (PEM), with `rdp_key`; relative to the config file's
    /// directory. Default: `<data-dir>/rdp-cert.pem`, generated on first start.
    pub rdp_cert: Option<Spanned<String>>,
    /// The private key of `rdp_cert` (PEM).
    pub rdp_key: Option<Spanned<String>>,
    /// Serve the relay's counters in the Prometheus text format on this `host:port` (off by
    /// default; keep it on a local or management address).
    pub metrics_listen: Option<Spanned<String>>,
    /// Pin each relay worker to one CPU (default true).
    pub pin_workers: Option<Spanned<bool>>,
    /// Worker socket back end: `auto` (the default: io_uring where the kernel allows it, else
    /// epoll), `uring` (fail without it) or `epoll`.
    pub io: Option<Spanned<String>>,
}

/// A config file as read from disk.
#[derive(Debug)]
pub struct LoadedConfig {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its text (to turn byte offsets into line and column).
    pub text: String,
    /// What it says.
    pub config: FileConfig,
}

/// 1-based line and column of byte offset `at` in `text`.
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

pub(super) fn place(text: &str, span: Range<usize>) -> String {
    let (line, col) = line_col(text, span.start);
    format!("line {line}, column {col}")
}

/// Parses the text of a config file; `path` is only used in errors.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        where_: e
            .span()
            .map(|s| format!("{}: ", place(text, s)))
            .unwrap_or_default(),
        message: e.message().trim_end().to_string(),
    })
}

/// Reads the config: `explicit` (`--config`) must exist; otherwise `<data_dir>/psm.toml` is
/// read when it exists. `Ok(None)`: no config file, defaults and flags only.
pub fn load(explicit: Option<&Path>, data_dir: &Path) -> Result<Option<LoadedConfig>, ConfigError> {
    let (path, must_exist) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (data_dir.join(CONFIG_FILE), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e)
            if !must_exist
                && matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
        {
            return Ok(None)
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let config = parse(&path, &text)?;
    Ok(Some(LoadedConfig { path, text, config }))
}
