//! The bench's world: the keys, the light target, psm under test (its users, grants and tcp
//! target), the OpenSSH jump host when there is an sshd, the routes through them, and the CPU
//! accounting of each route's processes.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;

use super::client::Dest;
use super::procs::{cpu_seconds, Proc};
use super::{openssh, procs, Opts};

fn write_key(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    use std::io::Write as _;
    let pem = key.to_openssh(LineEnding::LF)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(pem.as_bytes())?;
    std::fs::write(
        path.with_extension("pub"),
        format!("{}\n", key.public_key().to_openssh()?),
    )?;
    Ok(())
}

fn new_key() -> anyhow::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| anyhow::anyhow!("system random source failed"))?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

/// The bench's processes and addresses.
pub(super) struct World {
    pub(super) dir: PathBuf,
    pub(super) key: Arc<PrivateKey>,
    pub(super) direct: Dest,
    pub(super) psm: Dest,
    /// The same psm, under an `--unrecorded` grant.
    psm_norec: Dest,
    jump: Option<Dest>,
    pub(super) psm_pids: Vec<(u32, String)>,
    target_pid: u32,
    jump_pid: Option<u32>,
    /// The OpenSSH client straight to the jump host's sshd (bulk only).
    pub(super) openssh: Option<openssh::OpenSsh>,
    pub(super) tcp_sink: SocketAddr,
    pub(super) psm_tcp: SocketAddr,
    _procs: Vec<Proc>,
    pub(super) notes: Vec<String>,
}

pub(super) fn setup(o: &Opts, dir: &Path) -> anyhow::Result<World> {
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("psm-perf's folder")?
            .to_path_buf(),
    };
    for b in ["psm", "psmctl", "psm-relay", "psm-control", "psm-recorder"] {
        if !bin.join(b).exists() {
            bail!(
                "{} missing (build the workspace's binaries, or give --bin DIR)",
                bin.join(b).display()
            );
        }
    }
    let user_key = new_key()?;
    let key_path = dir.join("bench_key");
    write_key(&key_path, &user_key)?;
    let host_path = dir.join("target_host_key");
    let host_key = new_key()?;
    write_key(&host_path, &host_key)?;
    let pub_path = key_path.with_extension("pub");
    let (target, ssh_addr, tcp_sink) = procs::start_target(dir, &host_path, &pub_path)?;
    let mut procs_held = vec![target];
    let target_pid = procs_held[0].0.id();

    let data = dir.join("psm-data");
    let psm_addr: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    procs_held.push(procs::start_psm(&bin, &data, psm_addr, o.workers)?);
    let ctl = |args: &[&str]| procs::psmctl(&bin, &data, args);
    ctl(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        &pub_path.display().to_string(),
    ])?;
    let host_pub = host_key.public_key().to_openssh()?;
    ctl(&[
        "target",
        "add",
        "bench",
        "--address",
        &ssh_addr.to_string(),
        "--host-key",
        &host_pub,
    ])?;
    ctl(&[
        "account",
        "add",
        "bench@bench",
        "--private-key",
        &key_path.display().to_string(),
    ])?;
    ctl(&["grant", "add", "alice", "bench@bench"])?;
    // the same psm with recording off: a second user under a grant that says so
    ctl(&[
        "user",
        "add",
        "bob",
        "--ssh-key",
        &pub_path.display().to_string(),
    ])?;
    ctl(&["grant", "add", "bob", "bench@bench", "--unrecorded"])?;
    let psm_tcp: SocketAddr = format!("127.0.0.1:{}", procs::free_port()?).parse()?;
    ctl(&[
        "target",
        "add",
        "sink",
        "--protocol",
        "tcp",
        "--address",
        &tcp_sink.to_string(),
        "--listen",
        &psm_tcp.to_string(),
    ])?;
    ctl(&["grant", "add", "alice", "tcp@sink", "--unrecorded-tcp"])?;
    procs::wait_until("psm's tcp port", Duration::from_secs(20), || {
        std::net::TcpStream::connect_timeout(&psm_tcp, Duration::from_millis(300)).is_ok()
    })?;
    // psm up hands its daemons the canonical path of the data directory
    let data_path = std::fs::canonicalize(&data).unwrap_or(data.clone());
    let psm_pids: Vec<(u32, String)> = procs::pids_mentioning(&data_path.display().to_string())
        .into_iter()
        .filter(|(_, n)| n.starts_with("psm"))
        .collect();
    for d in ["psm-relay", "psm-control", "psm-recorder"] {
        if !psm_pids.iter().any(|(_, n)| n == d) {
            bail!("{d} of the psm under test not found among its processes: {psm_pids:?}");
        }
    }

    let mut notes = vec![
        "target: psm-perf's light SSH server (one process, no fork or shell per connection)".into(),
        "client: russh in psm-perf; psm: recording on (as every grant is by default); psm-norec: the same psm under a grant with --unrecorded (bulk and echo)".into(),
    ];
    let user = procs::user_name()?;
    let (jump, jump_pid, openssh) = match procs::sshd() {
        Some(sshd) => {
            let jump_key = dir.join("jump_host_key");
            write_key(&jump_key, &new_key()?)?;
            let port = procs::free_port()?;
            match procs::start_jump(&sshd, dir, port, &jump_key, &pub_path) {
                Ok(p) => {
                    let pid = p.0.id();
                    procs_held.push(p);
                    notes.push("openssh: the OpenSSH client and the jump host's sshd straight to each other, bulk up and down (`cat > /dev/null`, `head -c`; their CPU includes that command's)".into());
                    (
                        Some(Dest {
                            addr: ssh_addr,
                            user: "bench".into(),
                            jump: Some((format!("127.0.0.1:{port}").parse()?, user.clone())),
                        }),
                        Some(pid),
                        Some(openssh::OpenSsh {
                            port,
                            user,
                            key: key_path.clone(),
                            sshd_pid: pid,
                        }),
                    )
                }
                Err(e) => {
                    notes.push(format!(
                        "jump: the jump host did not start ({e:#}); the ProxyJump and OpenSSH routes are skipped"
                    ));
                    (None, None, None)
                }
            }
        }
        None => {
            notes.push(
                "jump: no sshd on this machine; the ProxyJump and OpenSSH routes are skipped"
                    .into(),
            );
            (None, None, None)
        }
    };
    Ok(World {
        dir: dir.to_path_buf(),
        key: Arc::new(user_key),
        direct: Dest {
            addr: ssh_addr,
            user: "bench".into(),
            jump: None,
        },
        psm: Dest {
            addr: psm_addr,
            user: "alice@bench@bench".into(),
            jump: None,
        },
        psm_norec: Dest {
            addr: psm_addr,
            user: "bob@bench@bench".into(),
            jump: None,
        },
        jump,
        psm_pids,
        target_pid,
        jump_pid,
        openssh,
        tcp_sink,
        psm_tcp,
        _procs: procs_held,
        notes,
    })
}

impl World {
    pub(super) fn routes(&self) -> Vec<(&'static str, &Dest)> {
        let mut r = vec![("direct", &self.direct), ("psm", &self.psm)];
        if let Some(j) = &self.jump {
            r.push(("jump", j));
        }
        r
    }

    /// [`routes`](Self::routes) and psm with recording off (bulk and echo).
    pub(super) fn with_norec(&self) -> Vec<(&'static str, &Dest)> {
        let mut r = self.routes();
        r.insert(2, ("psm-norec", &self.psm_norec));
        r
    }

    /// The CPU-seconds so far of the processes that do a route's work: the client and the
    /// target for direct, psm's daemons, the jump host's sshd (with its reaped children).
    pub(super) fn cpu(&self, route: &str) -> f64 {
        match route {
            "direct" => cpu_seconds(std::process::id()) + cpu_seconds(self.target_pid),
            "psm" | "psm-norec" => self.psm_pids.iter().map(|(p, _)| cpu_seconds(*p)).sum(),
            "jump" => self.jump_pid.map(procs::tree_cpu_seconds).unwrap_or(0.0),
            _ => 0.0,
        }
    }

    pub(super) fn relay_pid(&self) -> Option<u32> {
        self.psm_pids
            .iter()
            .find(|(_, n)| n == "psm-relay")
            .map(|(p, _)| *p)
    }
}
