//! psm-appliance: the single-machine launcher, `psm up`.
//!
//! What it does:
//! - reads the optional config (`--config FILE` or `<data-dir>/psm.toml`, see [`config`]), with
//!   command-line flags taking precedence;
//! - prepares the data directory (`psm_control::init_data_dir`) and the gateway's SSH host key
//!   (`psm_relay::host_key`), printing the key's fingerprint;
//! - starts `psm-control`, `psm-recorder` and `psm-relay` from the directory of its own
//!   executable, each once the previous one's socket accepts connections, and supervises them:
//!   a daemon that exits is restarted with backoff ([`supervisor`]);
//! - on SIGINT or SIGTERM stops them (relay, recorder, control), SIGKILLing any that takes more
//!   than 5 s.
//!
//! If `psm up` itself is killed hard its children get SIGTERM from the kernel: each is started
//! through the hidden `psm __exec-child` subcommand, which sets `PR_SET_PDEATHSIG` on itself and
//! then execs the daemon. That keeps this crate free of `unsafe` code (no `pre_exec` hook).
//!
//! What it does not do: serve SSH, hold policy or write recordings (the three daemons do), or
//! manage more than one machine.
#![warn(missing_docs)]

pub mod config;
pub mod supervisor;

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use config::{ConfigError, Overrides, Settings};
use supervisor::{ChildSpec, LaunchError, Readiness, Supervisor, POLL, READY_TIMEOUT, STOP_GRACE};

/// The control daemon's executable.
pub const CONTROL_BIN: &str = "psm-control";
/// The recorder daemon's executable.
pub const RECORDER_BIN: &str = "psm-recorder";
/// The relay's executable.
pub const RELAY_BIN: &str = "psm-relay";
/// File name of psm-recorder's socket inside the data directory.
pub const RECORDER_SOCKET: &str = "recorder.sock";

/// `psm`: the psm appliance launcher.
#[derive(Debug, Parser)]
#[command(name = "psm", version, about = "psm: privileged session manager")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `psm`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start psm-control, psm-recorder and psm-relay on this machine and keep them running.
    Up(UpArgs),
    /// Internal: exec a daemon with a parent-death signal (used by `psm up`).
    #[command(name = supervisor::EXEC_CHILD, hide = true)]
    ExecChild(ExecChildArgs),
}

/// Arguments of `psm up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory (created mode 0700 when missing).
    #[arg(long, env = "PSM_DATA_DIR", default_value = "./psm-data")]
    pub data_dir: PathBuf,
    /// Config file (default: `<data-dir>/psm.toml` when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address the relay listens on for SSH (overrides `[relay] listen`; default 0.0.0.0:2222).
    #[arg(long)]
    pub listen: Option<String>,
    /// Relay worker threads (overrides `[relay] workers`; default: one per CPU).
    #[arg(long)]
    pub workers: Option<i64>,
    /// Address the relay accepts RDP on, or `off` (overrides `[relay] rdp_listen`; default
    /// 0.0.0.0:3389).
    #[arg(long, value_name = "ADDR|off")]
    pub rdp_listen: Option<String>,
}

/// Arguments of the hidden `psm __exec-child`.
#[derive(Debug, Args)]
pub struct ExecChildArgs {
    /// Process id of the `psm up` that spawned this child.
    #[arg(long)]
    pub parent: u32,
    /// The daemon to exec.
    pub program: PathBuf,
    /// Its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Why `psm up` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory path cannot be made absolute.
    #[error("data directory {}: {source}", .path.display())]
    DataDirPath {
        /// The data directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data directory could not be prepared.
    #[error(transparent)]
    DataDir(#[from] psm_control::InitError),
    /// The host key could not be loaded or created.
    #[error(transparent)]
    HostKey(#[from] psm_relay::host_key::HostKeyError),
    /// A daemon could not be started.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The relay's address is taken (or cannot be bound) before anything started.
    #[error("cannot listen on {addr}: {source} (is another psm or an sshd listening there? choose another with --listen or [relay] listen)")]
    PortTaken {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The relay's RDP address is taken (or cannot be bound) before anything started.
    #[error("cannot listen for RDP on {addr}: {source} (is another psm or an RDP server listening there? choose another with --rdp-listen or [relay] rdp_listen, or turn RDP off with --rdp-listen off)")]
    RdpPortTaken {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory belongs to another user, whose daemons would refuse ours.
    #[error("data directory {} is owned by uid {owner}, but psm runs as uid {me}: run psm as its owner, or chown the directory", .path.display())]
    NotOwner {
        /// The data directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
    },
}

impl UpError {
    /// Exit code of `psm up` for this error: 2 for configuration and data directory problems,
    /// 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            UpError::Config(_)
            | UpError::DataDirPath { .. }
            | UpError::DataDir(_)
            | UpError::HostKey(_)
            | UpError::PortTaken { .. }
            | UpError::RdpPortTaken { .. }
            | UpError::NotOwner { .. } => 2,
            UpError::Launch(_) => 1,
        }
    }
}

/// Parses the command line and runs it; what `main` returns.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Up(args) => match up(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("psm: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::ExecChild(a) => {
            let e = supervisor::exec_child(a.parent, &a.program, &a.args);
            if !matches!(e, supervisor::ExecChildError::ParentGone(_)) {
                eprintln!("psm: {e}");
            }
            ExitCode::from(127)
        }
    }
}

/// The settings `psm up` runs with, from the config file and the flags.
pub fn settings(args: &UpArgs, data_dir: &Path) -> Result<Settings, ConfigError> {
    let loaded = config::load(args.config.as_deref(), data_dir)?;
    config::resolve(
        loaded.as_ref(),
        &Overrides {
            listen: args.listen.clone(),
            workers: args.workers,
            rdp_listen: args.rdp_listen.clone(),
        },
        config::default_workers(),
    )
}

/// The host name to show in the connect hint: the listen address when it is specific, else the
/// machine's host name.
pub fn connect_host(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "<this host>".into())
    } else {
        listen.ip().to_string()
    }
}

/// Where to probe the relay: the listen address, with an unspecified IP replaced by loopback.
pub fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

fn socket_accepts(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Whether psm-control lists a relay whose id ends in `:PID`.
fn relay_registered(data_dir: &Path, pid: u32) -> bool {
    let suffix = format!(":{pid}");
    psm_control::client::Client::connect(data_dir)
        .and_then(|mut c| {
            c.call_as::<psm_control::protocol::StatusInfo>(&psm_control::protocol::Request::Status)
        })
        .map(|s| s.relays.iter().any(|r| r.relay_id.ends_with(&suffix)))
        .unwrap_or(false)
}

fn tcp_accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// `psm up`: prepare, start, supervise until SIGINT/SIGTERM, stop.
pub fn up(args: &UpArgs) -> Result<(), UpError> {
    let data_dir = std::path::absolute(&args.data_dir).map_err(|source| UpError::DataDirPath {
        path: args.data_dir.clone(),
        source,
    })?;
    let settings = settings(args, &data_dir)?;

    // Everything that can fail without side effects comes before the data directory is touched.
    let bin_dir = supervisor::exe_dir()?;
    let control = supervisor::find_binary(&bin_dir, CONTROL_BIN)?;
    let recorder = supervisor::find_binary(&bin_dir, RECORDER_BIN)?;
    let relay = supervisor::find_binary(&bin_dir, RELAY_BIN)?;
    let wrapper = std::env::current_exe().map_err(LaunchError::ExeDir)?;
    // A port already taken would only make the relay exit and restart forever: say so now.
    if let Err(source) = std::net::TcpListener::bind(settings.listen) {
        return Err(UpError::PortTaken {
            addr: settings.listen,
            source,
        });
    }
    if let Some(addr) = settings.rdp_listen {
        if let Err(source) = std::net::TcpListener::bind(addr) {
            return Err(UpError::RdpPortTaken { addr, source });
        }
    }
    for sock in [psm_control_api::POLICY_SOCKET, RECORDER_SOCKET] {
        let sock = data_dir.join(sock);
        if socket_accepts(&sock) {
            return Err(LaunchError::AlreadyRunning {
                what: sock.display().to_string(),
            }
            .into());
        }
    }

    // another user's directory is refused before anything is written into it
    {
        use std::os::unix::fs::MetadataExt as _;
        let me = nix::unistd::geteuid().as_raw();
        if let Ok(m) = std::fs::metadata(&data_dir) {
            if m.is_dir() && m.uid() != me {
                return Err(UpError::NotOwner {
                    path: data_dir,
                    owner: m.uid(),
                    me,
                });
            }
        }
    }
    psm_control::init_data_dir(&data_dir)?;
    let data_dir = std::fs::canonicalize(&data_dir).map_err(|source| UpError::DataDirPath {
        path: data_dir.clone(),
        source,
    })?;
    let (key, created) = psm_relay::host_key::load_or_create(&data_dir)?;
    println!(
        "gateway host key: {} {} ({})",
        key.algorithm(),
        psm_relay::host_key::fingerprint(&key),
        if created { "created" } else { "loaded" }
    );
    println!("{}", psm_relay::host_key::public_openssh(&key));

    let policy_sock = data_dir.join(psm_control_api::POLICY_SOCKET);
    let recorder_sock = data_dir.join(RECORDER_SOCKET);

    let stop = supervisor::stop_flag()?;
    let mut sup = Supervisor::new(
        Some(wrapper),
        supervisor::Backoff::standard(),
        Box::new(|m| eprintln!("{m}")),
    );
    let dd = || vec![OsString::from("--data-dir"), data_dir.clone().into()];

    // Each probe gets the child's pid. The relay is ready when it accepts on its port and has
    // announced itself (HOSTNAME:PID) to psm-control, so a port answered by someone else
    // never counts.
    type Probe = Box<dyn Fn(u32) -> bool>;
    let steps: [(ChildSpec, String, Probe); 3] = [
        (
            ChildSpec {
                name: CONTROL_BIN.into(),
                program: control,
                args: {
                    let mut a = dd();
                    a.extend(settings.control_args.iter().map(OsString::from));
                    a
                },
            },
            format!("{} accepted connections", policy_sock.display()),
            Box::new({
                let p = policy_sock.clone();
                move |_| socket_accepts(&p)
            }),
        ),
        (
            ChildSpec {
                name: RECORDER_BIN.into(),
                program: recorder,
                args: {
                    let mut a = dd();
                    a.extend(settings.recorder_args.iter().map(OsString::from));
                    a
                },
            },
            format!("{} accepted connections", recorder_sock.display()),
            Box::new({
                let p = recorder_sock.clone();
                move |_| socket_accepts(&p)
            }),
        ),
        (
            ChildSpec {
                name: RELAY_BIN.into(),
                program: relay,
                args: {
                    let mut a = dd();
                    a.extend([
                        "--listen".into(),
                        settings.listen.to_string().into(),
                        "--workers".into(),
                        settings.workers.to_string().into(),
                        "--rdp-listen".into(),
                        settings
                            .rdp_listen
                            .map_or_else(|| "off".to_string(), |a| a.to_string())
                            .into(),
                    ]);
                    a.extend(settings.relay_args.iter().map(OsString::from));
                    a
                },
            },
            format!(
                "the relay accepted connections on {} and reported to psm-control",
                settings.listen
            ),
            Box::new({
                let a = probe_addr(settings.listen);
                let dir = data_dir.clone();
                move |pid| tcp_accepts(a) && relay_registered(&dir, pid)
            }),
        ),
    ];

    for (spec, what, probe) in steps {
        let started = sup.start(spec).and_then(|idx| {
            let pid = sup.pid(idx).unwrap_or(0);
            sup.wait_ready(idx, &what, || probe(pid), READY_TIMEOUT, &stop)
        });
        match started {
            Ok(Readiness::Ready) => {}
            Ok(Readiness::Interrupted) => {
                sup.shutdown(STOP_GRACE);
                eprintln!("psm: stopped");
                return Ok(());
            }
            Err(e) => {
                sup.shutdown(STOP_GRACE);
                return Err(e.into());
            }
        }
    }

    println!(
        "psm is up: relay on {}; connect with: ssh -p {} <user>@<account>@<target>@{}",
        settings.listen,
        settings.listen.port(),
        connect_host(settings.listen)
    );
    if let Some(rdp) = settings.rdp_listen {
        println!(
            "RDP on {rdp}: psmctl rdp-file <user> <account>@<target> writes a .rdp file for {}:{}",
            connect_host(rdp),
            rdp.port()
        );
    }

    while !stop.load(Ordering::SeqCst) {
        sup.tick();
        std::thread::sleep(POLL);
    }
    sup.shutdown(STOP_GRACE);
    eprintln!("psm: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<UpArgs, String> {
        let cli = Cli::try_parse_from(args.iter().copied()).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Up(a) => Ok(a),
            Command::ExecChild(_) => Err("not up".into()),
        }
    }

    #[test]
    fn flags_override_the_file_in_the_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(config::CONFIG_FILE),
            "[relay]\nlisten = \"127.0.0.1:2022\"\nworkers = 3\n",
        )
        .expect("write");
        let d = dir.path().to_str().expect("utf-8 path");
        let a = parse(&["psm", "up", "--data-dir", d]).expect("args");
        let s = settings(&a, dir.path()).expect("settings");
        assert_eq!(
            (s.listen.to_string().as_str(), s.workers),
            ("127.0.0.1:2022", 3)
        );
        let a = parse(&["psm", "up", "--data-dir", d, "--workers", "5"]).expect("args");
        let s = settings(&a, dir.path()).expect("settings");
        assert_eq!(
            (s.listen.to_string().as_str(), s.workers),
            ("127.0.0.1:2022", 5)
        );
        let a = parse(&["psm", "up", "--data-dir", d, "--listen", "127.0.0.2:22"]).expect("args");
        let s = settings(&a, dir.path()).expect("settings");
        assert_eq!(
            (s.listen.to_string().as_str(), s.workers),
            ("127.0.0.2:22", 3)
        );
        let a = parse(&["psm", "up", "--data-dir", d, "--rdp-listen", "off"]).expect("args");
        assert_eq!(settings(&a, dir.path()).expect("settings").rdp_listen, None);
        let a = parse(&[
            "psm",
            "up",
            "--data-dir",
            d,
            "--rdp-listen",
            "127.0.0.1:13389",
        ])
        .expect("args");
        assert_eq!(
            settings(&a, dir.path()).expect("settings").rdp_listen,
            Some("127.0.0.1:13389".parse().expect("addr"))
        );
    }

    #[test]
    fn explicit_config_replaces_the_data_dir_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(config::CONFIG_FILE), "bogus = 1\n").expect("write");
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "[relay]\nworkers = 9\n").expect("write");
        let a = UpArgs {
            data_dir: dir.path().to_path_buf(),
            config: Some(other),
            listen: None,
            workers: None,
            rdp_listen: None,
        };
        assert_eq!(settings(&a, dir.path()).expect("settings").workers, 9);
        let a = UpArgs { config: None, ..a };
        let e = settings(&a, dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        assert_eq!(
            UpError::from(settings(&a, dir.path()).expect_err("err")).exit_code(),
            2
        );
    }

    #[test]
    fn defaults_and_exec_child_parsing() {
        let a = parse(&["psm", "up"]).expect("args");
        assert!(a.config.is_none() && a.listen.is_none() && a.workers.is_none());
        let cli = Cli::try_parse_from([
            "psm",
            supervisor::EXEC_CHILD,
            "--parent",
            "42",
            "--",
            "/bin/prog",
            "--data-dir",
            "/d",
        ])
        .expect("parse");
        match cli.command {
            Command::ExecChild(e) => {
                assert_eq!(e.parent, 42);
                assert_eq!(e.program, PathBuf::from("/bin/prog"));
                assert_eq!(e.args, [OsString::from("--data-dir"), OsString::from("/d")]);
            }
            Command::Up(_) => panic!("wrong subcommand"),
        }
    }

    #[test]
    fn probe_and_connect_hint_addresses() {
        let any: SocketAddr = "0.0.0.0:2222".parse().expect("addr");
        assert_eq!(probe_addr(any).to_string(), "127.0.0.1:2222");
        let any6: SocketAddr = "[::]:22".parse().expect("addr");
        assert_eq!(probe_addr(any6).to_string(), "[::1]:22");
        let one: SocketAddr = "10.0.0.5:2022".parse().expect("addr");
        assert_eq!(probe_addr(one), one);
        assert_eq!(connect_host(one), "10.0.0.5");
        assert!(!connect_host(any).is_empty());
    }
}
