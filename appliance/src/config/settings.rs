//! From the file and the command line to the [`Settings`] `psm up` runs with: [`resolve`] merges
//! them (the command line wins), fills in defaults, checks every value and turns the file's
//! tables into the daemons' flags.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::file::{place, ControlConfig, LoadedConfig, PolicyConfig, RelayConfig};
use super::{ConfigError, DEFAULT_LISTEN, DEFAULT_RDP_LISTEN, MAX_WORKERS};

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
