//! `psm.toml` and the settings `psm up` runs with: file values, command-line overrides on top,
//! validated once ([`resolve`]).
//!
//! What it does not do: create the data directory or look at any other file in it.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// File name of the optional config file inside the data directory.
pub const CONFIG_FILE: &str = "psm.toml";
/// Where the relay listens when neither the file nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2222";
/// Where the relay accepts RDP when neither the file nor `--rdp-listen` says.
pub const DEFAULT_RDP_LISTEN: &str = "0.0.0.0:3389";
/// The most relay workers `psm up` accepts.
pub const MAX_WORKERS: i64 = 1024;

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

/// Values given on the command line; each one overrides the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--workers`.
    pub workers: Option<i64>,
    /// `--rdp-listen` (`ADDR` or `off`).
    pub rdp_listen: Option<String>,
}

/// The validated settings `psm up` runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where the relay listens.
    pub listen: SocketAddr,
    /// How many relay workers.
    pub workers: usize,
    /// Where the relay accepts RDP; None: RDP is off.
    pub rdp_listen: Option<SocketAddr>,
    /// Further psm-relay flags from the file (limits), validated.
    pub relay_args: Vec<String>,
    /// psm-control flags from the file, validated.
    pub control_args: Vec<String>,
    /// psm-recorder flags from the file, validated.
    pub recorder_args: Vec<String>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config {}: {source}", .path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The config file is not valid TOML or does not fit [`FileConfig`].
    #[error("config {}: {where_}{message}", .path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// `line L, column C: ` when toml knows the place, else empty.
        where_: String,
        /// What toml says is wrong.
        message: String,
    },
    /// A `[[siem.sink]]` is unusable (the message names the file, place and field).
    #[error("{0}")]
    Siem(String),
    /// A value is out of range or malformed.
    #[error("{origin}: {message}")]
    Invalid {
        /// `config <path>: line L, column C` or the command-line flag.
        origin: String,
        /// What is wrong.
        message: String,
    },
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

fn place(text: &str, span: Range<usize>) -> String {
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

/// Number of CPUs, the default worker count (at least 1, at most [`MAX_WORKERS`]).
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WORKERS as usize)
}

fn check_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "listen address {s:?} is not a socket address (want host:port, e.g. {DEFAULT_LISTEN})"
        )
    })
}

fn check_rdp_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        format!(
            "rdp listen address {s:?} is not a socket address (want host:port, e.g. {DEFAULT_RDP_LISTEN}, or \"off\")"
        )
    })
}

fn check_workers(n: i64) -> Result<usize, String> {
    if (1..=MAX_WORKERS).contains(&n) {
        usize::try_from(n).map_err(|_| format!("workers {n} is out of range"))
    } else {
        Err(format!(
            "workers must be between 1 and {MAX_WORKERS}, not {n}"
        ))
    }
}

/// Merges file and command line (the command line wins), fills in defaults, and validates the
/// result once. Errors name where the bad value came from: the flag, or the file with line and
/// column.
pub fn resolve(
    file: Option<&LoadedConfig>,
    cli: &Overrides,
    default_workers: usize,
) -> Result<Settings, ConfigError> {
    let from_file = |span: Range<usize>| -> String {
        match file {
            Some(f) => format!("config {}: {}", f.path.display(), place(&f.text, span)),
            None => "config".to_string(),
        }
    };
    let relay = file.map(|f| &f.config.relay);

    let listen = pick(
        ("--listen", cli.listen.as_ref()),
        relay.and_then(|r| r.listen.as_ref()),
        DEFAULT_LISTEN,
        check_listen,
        &from_file,
    )?;
    let rdp_listen = pick(
        ("--rdp-listen", cli.rdp_listen.as_ref()),
        relay.and_then(|r| r.rdp_listen.as_ref()),
        DEFAULT_RDP_LISTEN,
        check_rdp_listen,
        &from_file,
    )?;
    if rdp_listen.is_some_and(|r| r.port() == listen.port() && overlaps(r, listen)) {
        return Err(ConfigError::Invalid {
            origin: if cli.rdp_listen.is_some() {
                "--rdp-listen".to_string()
            } else {
                match relay.and_then(|r| r.rdp_listen.as_ref()) {
                    Some(v) => from_file(v.span()),
                    None => "default".to_string(),
                }
            },
            message: format!(
                "the RDP listener cannot share the SSH listener's address {listen}: choose another rdp_listen port, or \"off\""
            ),
        });
    }

    let workers = match (cli.workers, relay.and_then(|r| r.workers.as_ref())) {
        (Some(n), _) => check_workers(n).map_err(|message| ConfigError::Invalid {
            origin: "--workers".into(),
            message,
        })?,
        (None, Some(v)) => check_workers(*v.get_ref()).map_err(|message| ConfigError::Invalid {
            origin: from_file(v.span()),
            message,
        })?,
        (None, None) => default_workers.clamp(1, MAX_WORKERS as usize),
    };

    let mut relay_args = match relay {
        Some(r) => relay_table_args(r, &from_file)?,
        None => Vec::new(),
    };
    let mut control_args = Vec::new();
    if let Some(c) = file.map(|f| &f.config.control) {
        control_table_args(c, &from_file, &mut control_args)?;
    }
    if let Some(p) = file.map(|f| &f.config.policy) {
        policy_table_args(p, &from_file, &mut control_args)?;
    }
    if let Some(f) = file.filter(|f| !f.config.siem.sink.is_empty()) {
        // Checked here (TLS files included) so that a bad sink stops `psm up` before anything
        // starts; psm-control reads the same table from the same file.
        psm_control::siem::config::parse(&f.path, &f.text).map_err(ConfigError::Siem)?;
        let path = std::path::absolute(&f.path).map_err(|source| ConfigError::Read {
            path: f.path.clone(),
            source,
        })?;
        control_args.extend(["--config".to_string(), path.display().to_string()]);
    }
    if let Some(v) = relay.and_then(|r| r.max_startups.as_ref()) {
        let m: psm_relay::MaxStartups =
            v.get_ref()
                .parse()
                .map_err(|message| ConfigError::Invalid {
                    origin: from_file(v.span()),
                    message,
                })?;
        relay_args.extend(["--max-startups".to_string(), m.to_string()]);
    }

    if let Some(f) = file {
        relay_args.extend(rdp_args(f, &from_file)?);
    }

    let recorder_args = match file {
        Some(f) => recorder_args(f, from_file)?,
        None => Vec::new(),
    };

    Ok(Settings {
        listen,
        workers,
        rdp_listen,
        relay_args,
        control_args,
        recorder_args,
    })
}

/// One listen setting: the flag's value, else the file's, else the default, checked by `check`;
/// an error names where the value came from.
fn pick<T>(
    (flag, given): (&str, Option<&String>),
    in_file: Option<&Spanned<String>>,
    default: &str,
    check: fn(&str) -> Result<T, String>,
    from_file: &impl Fn(Range<usize>) -> String,
) -> Result<T, ConfigError> {
    let (value, origin) = match (given, in_file) {
        (Some(v), _) => (v.as_str(), flag.to_string()),
        (None, Some(v)) => (v.get_ref().as_str(), from_file(v.span())),
        (None, None) => (default, "default".to_string()),
    };
    check(value).map_err(|message| ConfigError::Invalid { origin, message })
}

/// A whole-number key of the file within `range`, passed on as `--FLAG N`.
fn ranged(
    flag: &str,
    v: Option<&Spanned<i64>>,
    range: std::ops::RangeInclusive<i64>,
    from_file: &impl Fn(Range<usize>) -> String,
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let Some(v) = v else { return Ok(()) };
    let n = *v.get_ref();
    if !range.contains(&n) {
        return Err(ConfigError::Invalid {
            origin: from_file(v.span()),
            message: format!(
                "{} must be between {} and {}, not {n}",
                flag.replace('-', "_"),
                range.start(),
                range.end()
            ),
        });
    }
    out.extend([format!("--{flag}"), n.to_string()]);
    Ok(())
}

/// A duration key of the file (`15m`, `30d`), checked and passed on as `--FLAG D`.
fn duration_arg(
    key: &str,
    v: Option<&Spanned<String>>,
    from_file: &impl Fn(Range<usize>) -> String,
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let Some(v) = v else { return Ok(()) };
    psm_control_api::conditions::parse_duration(v.get_ref()).map_err(|message| {
        ConfigError::Invalid {
            origin: from_file(v.span()),
            message: format!("{key}: {message}"),
        }
    })?;
    out.extend([format!("--{}", key.replace('_', "-")), v.get_ref().clone()]);
    Ok(())
}

/// The `[relay]` table's limits, metrics address, back end and pinning as psm-relay flags.
fn relay_table_args(
    r: &RelayConfig,
    from_file: &impl Fn(Range<usize>) -> String,
) -> Result<Vec<String>, ConfigError> {
    let mut args = Vec::new();
    for (flag, v, range) in [
        ("login-grace-secs", &r.login_grace_secs, 1..=3600),
        (
            "per-source-max-startups",
            &r.per_source_max_startups,
            1..=100_000,
        ),
        ("target-keepalive-secs", &r.target_keepalive_secs, 1..=3600),
        ("target-keepalive-max", &r.target_keepalive_max, 1..=100),
        (
            "max-connections-per-user",
            &r.max_connections_per_user,
            1..=100_000,
        ),
        ("max-connections", &r.max_connections, 1..=1_000_000),
        (
            "durable-window-bytes",
            &r.durable_window_bytes,
            4096..=(1 << 30),
        ),
        ("durable-window-ms", &r.durable_window_ms, 100..=60_000),
        ("recorder-stall-secs", &r.recorder_stall_secs, 1..=3600),
    ] {
        ranged(flag, v.as_ref(), range, from_file, &mut args)?;
    }
    metrics_arg(r.metrics_listen.as_ref(), from_file, &mut args)?;
    if let Some(v) = &r.io {
        let io = v.get_ref().trim();
        if !matches!(io, "auto" | "uring" | "epoll") {
            return Err(ConfigError::Invalid {
                origin: from_file(v.span()),
                message: format!(
                    "io {:?} is not \"auto\", \"uring\" or \"epoll\"",
                    v.get_ref()
                ),
            });
        }
        args.extend(["--io".to_string(), io.to_string()]);
    }
    if let Some(v) = &r.pin_workers {
        args.extend(["--pin-workers".to_string(), v.get_ref().to_string()]);
    }
    Ok(args)
}

/// The `[control]` table as psm-control flags.
fn control_table_args(
    c: &ControlConfig,
    from_file: &impl Fn(Range<usize>) -> String,
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    metrics_arg(c.metrics_listen.as_ref(), from_file, out)?;
    for (flag, v, range) in [
        ("min-password-length", &c.min_password_length, 8..=1024),
        (
            "audit-checkpoint-every",
            &c.audit_checkpoint_every,
            1..=1_000_000,
        ),
        ("retention-max-bytes", &c.retention_max_bytes, 1..=i64::MAX),
        ("audit-rotate-bytes", &c.audit_rotate_bytes, 1024..=i64::MAX),
        (
            "audit-retention-max-bytes",
            &c.audit_retention_max_bytes,
            1..=i64::MAX,
        ),
    ] {
        ranged(flag, v.as_ref(), range, from_file, out)?;
    }
    for (key, v) in [
        ("retention_max_age", &c.retention_max_age),
        ("retention_interval", &c.retention_interval),
        ("audit_rotate_interval", &c.audit_rotate_interval),
        ("audit_retention_max_age", &c.audit_retention_max_age),
    ] {
        duration_arg(key, v.as_ref(), from_file, out)?;
    }
    Ok(())
}

/// The `[policy]` table as psm-control flags.
fn policy_table_args(
    p: &PolicyConfig,
    from_file: &impl Fn(Range<usize>) -> String,
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    ranged(
        "lockout-failures",
        p.lockout_failures.as_ref(),
        1..=1000,
        from_file,
        out,
    )?;
    duration_arg("lockout_window", p.lockout_window.as_ref(), from_file, out)?;
    if let Some(v) = &p.mfa {
        match v.get_ref().as_str() {
            "required" => out.push("--mfa-required".to_string()),
            "per-grant" => {}
            other => {
                return Err(ConfigError::Invalid {
                    origin: from_file(v.span()),
                    message: format!(
                        "mfa = \"{}\": expected \"required\" or \"per-grant\"",
                        other.escape_debug()
                    ),
                })
            }
        }
    }
    Ok(())
}

/// Whether two listen addresses would take the same port on some interface.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

/// `[relay] rdp_cert`/`rdp_key` (both or neither, files readable) as psm-relay flags, and
/// `rdp_public_address` checked (psmctl reads it from the file).
fn rdp_args(
    f: &LoadedConfig,
    from_file: &impl Fn(Range<usize>) -> String,
) -> Result<Vec<String>, ConfigError> {
    let r = &f.config.relay;
    if let Some(v) = &r.rdp_public_address {
        let a = v.get_ref().trim();
        let bad = a.is_empty()
            || a.chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@'));
        if bad {
            return Err(ConfigError::Invalid {
                origin: from_file(v.span()),
                message: format!(
                    "rdp_public_address {:?} is not a host or host:port",
                    v.get_ref()
                ),
            });
        }
    }
    let mut args = Vec::new();
    match (&r.rdp_cert, &r.rdp_key) {
        (None, None) => {}
        (Some(c), Some(k)) => {
            for (flag, key, v) in [("--rdp-cert", "rdp_cert", c), ("--rdp-key", "rdp_key", k)] {
                let path = key_file_path(&f.path, v.get_ref());
                let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                    origin: from_file(v.span()),
                    message: format!("{key}: cannot read {}: {e}", path.display()),
                })?;
                if !text.contains("-----BEGIN ") {
                    return Err(ConfigError::Invalid {
                        origin: from_file(v.span()),
                        message: format!("{key}: {} is not a PEM file", path.display()),
                    });
                }
                args.extend([flag.to_string(), path.display().to_string()]);
            }
        }
        (Some(v), None) | (None, Some(v)) => {
            return Err(ConfigError::Invalid {
                origin: from_file(v.span()),
                message: "give rdp_cert and rdp_key together".into(),
            })
        }
    }
    Ok(args)
}

/// The `[recorder]` table as psm-recorder flags; the key file is read here, so that a missing,
/// malformed or group-readable key stops `psm up` before anything starts.
fn recorder_args(
    f: &LoadedConfig,
    from_file: impl Fn(Range<usize>) -> String,
) -> Result<Vec<String>, ConfigError> {
    let r = &f.config.recorder;
    let mut args = Vec::new();
    if let Some(v) = &r.encryption_key_file {
        let path = key_file_path(&f.path, v.get_ref());
        psm_recorder_format::crypt::RecordingKey::read(&path).map_err(|e| {
            ConfigError::Invalid {
                origin: from_file(v.span()),
                message: format!("encryption_key_file: {e}"),
            }
        })?;
        args.extend([
            "--encryption-key-file".to_string(),
            path.display().to_string(),
        ]);
    }
    metrics_arg(r.metrics_listen.as_ref(), &from_file, &mut args)?;
    if let Some(v) = r.index_encrypted.as_ref().filter(|v| *v.get_ref()) {
        if r.encryption_key_file.is_none() {
            return Err(ConfigError::Invalid {
                origin: from_file(v.span()),
                message: "index_encrypted needs encryption_key_file".into(),
            });
        }
        args.push("--index-encrypted".to_string());
    }
    Ok(args)
}

/// A `metrics_listen` value checked (an address and port) and passed as `--metrics-listen`.
fn metrics_arg(
    v: Option<&Spanned<String>>,
    from_file: &impl Fn(Range<usize>) -> String,
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let Some(v) = v else { return Ok(()) };
    let addr: SocketAddr = v
        .get_ref()
        .trim()
        .parse()
        .map_err(|_| ConfigError::Invalid {
            origin: from_file(v.span()),
            message: format!(
                "metrics_listen {:?} is not an address and port (127.0.0.1:9464)",
                v.get_ref()
            ),
        })?;
    out.extend(["--metrics-listen".to_string(), addr.to_string()]);
    Ok(())
}

/// `[recorder] encryption_key_file` as a path: relative ones are taken from the directory of
/// the config file, and made absolute (the daemons run elsewhere).
pub fn key_file_path(config: &Path, value: &str) -> PathBuf {
    let dir = config.parent().unwrap_or(Path::new("."));
    let joined = dir.join(value);
    std::path::absolute(&joined).unwrap_or(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(text: &str) -> Result<LoadedConfig, ConfigError> {
        let path = PathBuf::from("/etc/psm/psm.toml");
        parse(&path, text).map(|config| LoadedConfig {
            path,
            text: text.to_string(),
            config,
        })
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_and_no_file_give_defaults() {
        let f = loaded("").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 6).expect("resolve");
        assert_eq!(s.listen, "0.0.0.0:2222".parse().expect("addr"));
        assert_eq!(s.workers, 6);
        assert_eq!(resolve(None, &Overrides::default(), 6).expect("resolve"), s);
        assert_eq!(
            resolve(None, &Overrides::default(), 5000)
                .expect("resolve")
                .workers,
            1024
        );
    }

    #[test]
    fn the_policy_table_reaches_psm_control() {
        let f = loaded(
            "[policy]\nmfa = \"required\"\nlockout_failures = 3\nlockout_window = \"30m\"\n",
        )
        .expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        for flag in [
            "--mfa-required",
            "--lockout-failures",
            "3",
            "--lockout-window",
            "30m",
        ] {
            assert!(
                s.control_args.iter().any(|a| a == flag),
                "{flag}: {:?}",
                s.control_args
            );
        }
        let per_grant = loaded("[policy]\nmfa = \"per-grant\"\n").expect("parse");
        let s = resolve(Some(&per_grant), &Overrides::default(), 2).expect("resolve");
        assert!(!s.control_args.iter().any(|a| a == "--mfa-required"));
        for (bad, needle) in [
            (
                "[policy]\nmfa = \"sometimes\"\n",
                "expected \"required\" or \"per-grant\"",
            ),
            ("[policy]\nlockout_window = \"soon\"\n", "lockout_window"),
            (
                "[policy]\nlockout_failures = 0\n",
                "lockout_failures must be between 1 and 1000",
            ),
            ("[policy]\nmfa_required = true\n", "unknown field"),
        ] {
            let e = match loaded(bad) {
                Ok(f) => err_text(resolve(Some(&f), &Overrides::default(), 2)),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn the_audit_checkpoint_interval_reaches_psm_control() {
        let f = loaded("[control]\naudit_checkpoint_every = 50\n").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        assert!(
            s.control_args
                .windows(2)
                .any(|w| w == ["--audit-checkpoint-every", "50"]),
            "{:?}",
            s.control_args
        );
        let f = loaded("[control]\naudit_checkpoint_every = 0\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.contains("audit_checkpoint_every must be between 1 and 1000000"),
            "{e}"
        );
    }

    #[test]
    fn audit_rotation_and_retention_reach_psm_control() {
        let f = loaded(
            "[control]\naudit_rotate_bytes = 4096\naudit_rotate_interval = \"12h\"\naudit_retention_max_age = \"400d\"\naudit_retention_max_bytes = 1000000\n",
        )
        .expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        for pair in [
            ["--audit-rotate-bytes", "4096"],
            ["--audit-rotate-interval", "12h"],
            ["--audit-retention-max-age", "400d"],
            ["--audit-retention-max-bytes", "1000000"],
        ] {
            assert!(
                s.control_args.windows(2).any(|w| w == pair),
                "{pair:?} in {:?}",
                s.control_args
            );
        }
        for (bad, needle) in [
            (
                "[control]\naudit_rotate_bytes = 10\n",
                "audit_rotate_bytes must be between 1024 and",
            ),
            (
                "[control]\naudit_rotate_interval = \"often\"\n",
                "audit_rotate_interval",
            ),
            (
                "[control]\naudit_retention_max_age = \"x\"\n",
                "audit_retention_max_age",
            ),
            (
                "[control]\naudit_retention_max_bytes = 0\n",
                "audit_retention_max_bytes must be between 1 and",
            ),
        ] {
            let f = loaded(bad).expect("parse");
            let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn siem_sinks_are_checked_and_reach_psm_control() {
        let f = loaded(
            "[[siem.sink]]\nname = \"soc\"\ntransport = \"udp\"\naddress = \"127.0.0.1:514\"\nformat = \"ocsf\"\n",
        )
        .expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        assert_eq!(
            s.control_args[s.control_args.len() - 2..],
            ["--config".to_string(), "/etc/psm/psm.toml".to_string()]
        );
        let none =
            resolve(Some(&loaded("").expect("parse")), &Overrides::default(), 2).expect("resolve");
        assert!(!none.control_args.iter().any(|a| a == "--config"));
        let bad = loaded("[[siem.sink]]\nname = \"soc\"\ntransport = \"tls\"\naddress = \"127.0.0.1:6514\"\nca = \"/nonexistent/ca.pem\"\n")
            .expect("parse");
        let e = err_text(resolve(Some(&bad), &Overrides::default(), 2));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 5, column 6: siem.sink[0].ca: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let e = err_text(loaded("[[siem.sink]]\nname = \"soc\"\nport = 1\n"));
        assert!(
            e.contains("line 3, column 1") && e.contains("unknown field `port`"),
            "{e}"
        );
    }

    #[test]
    fn the_recording_key_reaches_psm_recorder_once_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let cfg = dir.path().join("psm.toml");
        let load = |text: &str| LoadedConfig {
            path: cfg.clone(),
            text: text.to_string(),
            config: parse(&cfg, text).expect("parse"),
        };
        let text = "[recorder]\nencryption_key_file = \"rec.key\"\nindex_encrypted = true\n";
        let e = err_text(resolve(Some(&load(text)), &Overrides::default(), 2));
        assert!(
            e.contains("line 2, column 23") && e.contains("encryption_key_file: recording key"),
            "{e}"
        );
        let key = dir.path().join("rec.key");
        psm_recorder_format::crypt::RecordingKey::create(&key).expect("key");
        let s = resolve(Some(&load(text)), &Overrides::default(), 2).expect("resolve");
        assert_eq!(
            s.recorder_args,
            [
                "--encryption-key-file".to_string(),
                key.display().to_string(),
                "--index-encrypted".to_string()
            ]
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = err_text(resolve(Some(&load(text)), &Overrides::default(), 2));
        assert!(e.contains("mode 0644 lets others read it"), "{e}");
        let e = err_text(
            loaded("[recorder]\nindex_encrypted = true\n")
                .and_then(|f| resolve(Some(&f), &Overrides::default(), 2)),
        );
        assert!(
            e.contains("index_encrypted needs encryption_key_file"),
            "{e}"
        );
    }

    #[test]
    fn file_values_are_used() {
        let f = loaded("[relay]\nlisten = \"127.0.0.1:2022\"\nworkers = 3\n").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 8).expect("resolve");
        assert_eq!(s.listen, "127.0.0.1:2022".parse().expect("addr"));
        assert_eq!(s.workers, 3);
    }

    #[test]
    fn command_line_overrides_file() {
        let f = loaded("[relay]\nlisten = \"127.0.0.1:2022\"\nworkers = 3\n").expect("parse");
        let cli = Overrides {
            listen: Some("[::1]:2200".into()),
            workers: None,
            rdp_listen: None,
        };
        let s = resolve(Some(&f), &cli, 8).expect("resolve");
        assert_eq!(s.listen, "[::1]:2200".parse().expect("addr"));
        assert_eq!(s.workers, 3, "file value kept where no flag is given");
        let cli = Overrides {
            listen: None,
            workers: Some(16),
            rdp_listen: None,
        };
        let s = resolve(Some(&f), &cli, 8).expect("resolve");
        assert_eq!(s.listen, "127.0.0.1:2022".parse().expect("addr"));
        assert_eq!(s.workers, 16);
        // A flag overrides even a broken file value: only the value in use is validated.
        let bad = loaded("[relay]\nlisten = \"nowhere\"\n").expect("parse");
        let cli = Overrides {
            listen: Some("0.0.0.0:22".into()),
            workers: None,
            rdp_listen: None,
        };
        assert!(resolve(Some(&bad), &cli, 1).is_ok());
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name_and_place() {
        let e = err_text(loaded("[relay]\nlisten = \"0.0.0.0:2222\"\nthreads = 4\n"));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 3, column 1: "),
            "{e}"
        );
        assert!(e.contains("unknown field `threads`"), "{e}");
        let e = err_text(loaded("[recordings]\n"));
        assert!(e.contains("unknown field `recordings`"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn syntax_and_type_errors_have_line_and_column() {
        let e = err_text(loaded("[relay]\nlisten = \n"));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 2, column "),
            "{e}"
        );
        let e = err_text(loaded("[relay]\nworkers = \"four\"\n"));
        assert!(e.contains("line 2, column 11"), "{e}");
    }

    #[test]
    fn bad_listen_address_is_rejected() {
        let f = loaded("[relay]\n  listen = \"localhost\"\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.starts_with(
                "config /etc/psm/psm.toml: line 2, column 12: listen address \"localhost\""
            ),
            "{e}"
        );
        let cli = Overrides {
            listen: Some("1.2.3.4".into()),
            workers: None,
            rdp_listen: None,
        };
        let e = err_text(resolve(None, &cli, 2));
        assert!(
            e.starts_with("--listen: listen address \"1.2.3.4\" is not a socket address"),
            "{e}"
        );
    }

    #[test]
    fn workers_out_of_range_are_rejected() {
        let f = loaded("[relay]\nworkers = 0\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.contains("line 2, column 11: workers must be between 1 and 1024, not 0"),
            "{e}"
        );
        let cli = Overrides {
            listen: None,
            workers: Some(1025),
            rdp_listen: None,
        };
        let e = err_text(resolve(None, &cli, 2));
        assert_eq!(e, "--workers: workers must be between 1 and 1024, not 1025");
        let cli = Overrides {
            listen: None,
            workers: Some(1024),
            rdp_listen: None,
        };
        assert_eq!(resolve(None, &cli, 2).expect("max").workers, 1024);
    }

    #[test]
    fn load_reads_default_file_only_when_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(None, dir.path()).expect("absent").is_none());
        assert!(load(None, &dir.path().join("missing/dir"))
            .expect("absent")
            .is_none());
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").expect("write");
        assert!(load(None, &file).expect("data dir is a file").is_none());
        std::fs::write(dir.path().join(CONFIG_FILE), "[relay]\nworkers = 2\n").expect("write");
        let c = load(None, dir.path()).expect("load").expect("present");
        assert_eq!(c.config.relay.workers.map(|w| *w.get_ref()), Some(2));
        let missing = dir.path().join("other.toml");
        let e = err_text(load(Some(&missing), dir.path()));
        assert!(
            e.starts_with(&format!("config {}: ", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn rdp_listen_defaults_overrides_and_off() {
        let s = resolve(None, &Overrides::default(), 2).expect("resolve");
        assert_eq!(s.rdp_listen, Some("0.0.0.0:3389".parse().expect("addr")));
        let f = loaded("[relay]\nrdp_listen = \"127.0.0.1:13389\"\n").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        assert_eq!(s.rdp_listen, Some("127.0.0.1:13389".parse().expect("addr")));
        let off = Overrides {
            rdp_listen: Some("off".into()),
            ..Overrides::default()
        };
        assert_eq!(resolve(Some(&f), &off, 2).expect("off").rdp_listen, None);
        let f = loaded("[relay]\nrdp_listen = \"off\"\n").expect("parse");
        assert_eq!(
            resolve(Some(&f), &Overrides::default(), 2)
                .expect("off")
                .rdp_listen,
            None
        );
        let f = loaded("[relay]\nrdp_listen = \"3389\"\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 2, column 14: rdp listen address \"3389\" is not a socket address"),
            "{e}"
        );
        let bad = Overrides {
            rdp_listen: Some("nowhere".into()),
            ..Overrides::default()
        };
        let e = err_text(resolve(None, &bad, 2));
        assert!(e.starts_with("--rdp-listen: rdp listen address"), "{e}");
        // not on the SSH listener's port
        let same = Overrides {
            listen: Some("0.0.0.0:3389".into()),
            ..Overrides::default()
        };
        let e = err_text(resolve(None, &same, 2));
        assert!(e.contains("cannot share the SSH listener's address"), "{e}");
        let apart = Overrides {
            listen: Some("127.0.0.1:2222".into()),
            rdp_listen: Some("127.0.0.2:2222".into()),
            ..Overrides::default()
        };
        assert!(resolve(None, &apart, 2).is_ok());
    }

    #[test]
    fn rdp_certificate_files_are_checked_and_passed() {
        let dir = tempfile::tempdir().expect("dir");
        let cfg = dir.path().join("psm.toml");
        let load = |text: &str| LoadedConfig {
            path: cfg.clone(),
            text: text.to_string(),
            config: parse(&cfg, text).expect("parse"),
        };
        let e = err_text(resolve(
            Some(&load("[relay]\nrdp_cert = \"c.pem\"\n")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("give rdp_cert and rdp_key together"), "{e}");
        let both = "[relay]\nrdp_cert = \"c.pem\"\nrdp_key = \"k.pem\"\n";
        let e = err_text(resolve(Some(&load(both)), &Overrides::default(), 2));
        assert!(
            e.contains("line 2, column 12") && e.contains("rdp_cert: cannot read"),
            "{e}"
        );
        std::fs::write(dir.path().join("c.pem"), "-----BEGIN CERTIFICATE-----\n").expect("c");
        std::fs::write(dir.path().join("k.pem"), "not pem").expect("k");
        let e = err_text(resolve(Some(&load(both)), &Overrides::default(), 2));
        assert!(
            e.contains("rdp_key:") && e.contains("is not a PEM file"),
            "{e}"
        );
        std::fs::write(dir.path().join("k.pem"), "-----BEGIN PRIVATE KEY-----\n").expect("k");
        let s = resolve(Some(&load(both)), &Overrides::default(), 2).expect("resolve");
        let c = dir.path().join("c.pem").display().to_string();
        let k = dir.path().join("k.pem").display().to_string();
        assert!(
            s.relay_args
                .windows(4)
                .any(|w| w == ["--rdp-cert", c.as_str(), "--rdp-key", k.as_str()]),
            "{:?}",
            s.relay_args
        );
        let e = err_text(resolve(
            Some(&load("[relay]\nrdp_public_address = \"gw example\"\n")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("rdp_public_address"), "{e}");
        assert!(resolve(
            Some(&load(
                "[relay]\nrdp_public_address = \"gw.example.com:443\"\n"
            )),
            &Overrides::default(),
            2
        )
        .is_ok());
    }

    #[test]
    fn metrics_listen_and_pinning_reach_the_relay() {
        let s = resolve(
            Some(
                &loaded("[relay]\nmetrics_listen = \"127.0.0.1:9464\"\npin_workers = false\nio = \"epoll\"\n")
                    .expect("parse"),
            ),
            &Overrides::default(),
            2,
        )
        .expect("resolve");
        assert!(
            s.relay_args
                .windows(2)
                .any(|w| w == ["--metrics-listen", "127.0.0.1:9464"]),
            "{:?}",
            s.relay_args
        );
        assert!(
            s.relay_args
                .windows(2)
                .any(|w| w == ["--pin-workers", "false"]),
            "{:?}",
            s.relay_args
        );
        assert!(
            s.relay_args.windows(2).any(|w| w == ["--io", "epoll"]),
            "{:?}",
            s.relay_args
        );
        let e = err_text(resolve(
            Some(&loaded("[relay]\nio = \"kqueue\"\n").expect("parse")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("io \"kqueue\""), "{e}");
        let e = err_text(resolve(
            Some(&loaded("[relay]\nmetrics_listen = \"localhost\"\n").expect("parse")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("metrics_listen") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\nx", 2), (1, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
