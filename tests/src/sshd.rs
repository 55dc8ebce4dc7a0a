//! The target: a real OpenSSH sshd and its local account.

#[allow(unused_imports)]
use super::*;

/// Creates the local account [`TARGET_USER`] if missing and (re)sets its password, so it is not
/// locked. Serialized across test processes with flock.
pub fn ensure_target_user() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let script = format!(
            "id -u {u} >/dev/null 2>&1 || useradd -m -s /bin/bash {u} || id -u {u} >/dev/null; \
             echo '{u}:{p}' | chpasswd && usermod -U {u} >/dev/null 2>&1; \
             usermod -s /bin/bash {u}; true",
            u = TARGET_USER,
            p = TARGET_PASSWORD
        );
        let out = run_cmd(
            Command::new("flock").args(["/tmp/psm-tests-user.lock", "sh", "-c", &script]),
            None,
            Duration::from_secs(60),
        );
        assert!(
            out.success(),
            "creating the target account {TARGET_USER}: {}",
            out.describe()
        );
        let check = run_cmd(
            Command::new("id").arg("-u").arg(TARGET_USER),
            None,
            Duration::from_secs(10),
        );
        assert!(
            check.success(),
            "account {TARGET_USER} missing after useradd: {}",
            out.describe()
        );
    });
}

pub(crate) fn sshd_path() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/bin/sshd", "/usr/local/sbin/sshd"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("sshd not found: install openssh-server (apt-get install -y openssh-server)");
}

pub(crate) fn openssh_version() -> (u32, u32) {
    let out = run_cmd(Command::new("ssh").arg("-V"), None, Duration::from_secs(10));
    let text = out.stderr_str() + &out.stdout_str();
    // "OpenSSH_9.2p1 Debian-2+deb12u6, …"
    let v = text
        .split("OpenSSH_")
        .nth(1)
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// A real OpenSSH sshd on 127.0.0.1 with its own host key, letting [`TARGET_USER`] log in with
/// [`TARGET_PASSWORD`] or with [`Sshd::target_key`].
pub struct Sshd {
    dir: TempDir,
    port: u16,
    host_key_line: String,
    target_key: PathBuf,
    child: Child,
    log: PathBuf,
}

impl Sshd {
    /// Starts it (`AllowTcpForwarding no`) and waits (10 s at most) until its port accepts.
    pub fn start() -> Sshd {
        Sshd::start_with(false)
    }

    /// Starts it, with TCP forwarding allowed or not (a forwarding test needs a target that would
    /// forward, to show that psm is the one refusing).
    pub fn start_with(allow_tcp_forwarding: bool) -> Sshd {
        Sshd::start_opts(allow_tcp_forwarding, "ERROR")
    }

    /// Starts it with sshd's `LogLevel` (`INFO` logs each login: `Accepted password for …`).
    pub fn start_opts(allow_tcp_forwarding: bool, log_level: &str) -> Sshd {
        Sshd::start_config(allow_tcp_forwarding, log_level, "")
    }

    /// Starts it with more lines of `sshd_config` (`RekeyLimit 256K`).
    pub fn start_config(allow_tcp_forwarding: bool, log_level: &str, extra: &str) -> Sshd {
        ensure_target_user();
        let _ = fs::create_dir_all("/run/sshd");
        let sshd = sshd_path();
        let dir = short_tempdir("sshd");
        let d = dir.path().to_path_buf();
        // sshd reads authorized_keys as the target user
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod sshd dir");
        let host_key = d.join("host_ed25519");
        let host_key_line = gen_key(&host_key);
        let target_key = d.join("target_ed25519");
        gen_key(&target_key);
        let ak = d.join("authorized_keys");
        fs::copy(pub_path(&target_key), &ak).expect("authorized_keys");
        fs::set_permissions(&ak, fs::Permissions::from_mode(0o644)).expect("chmod authorized_keys");
        let scratch = d.join("scratch");
        fs::create_dir_all(&scratch).expect("scratch dir");
        let out = run_cmd(
            Command::new("chown")
                .arg(format!("{TARGET_USER}:"))
                .arg(&scratch),
            None,
            Duration::from_secs(10),
        );
        assert!(out.success(), "chown scratch: {}", out.describe());
        fs::set_permissions(&scratch, fs::Permissions::from_mode(0o777)).expect("chmod scratch");

        let (major, minor) = openssh_version();
        let log = d.join("sshd.log");
        let cfg = d.join("sshd_config");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut text = format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {hk}\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PasswordAuthentication yes\n\
                 KbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\n\
                 AuthorizedKeysFile {ak}\n\
                 Subsystem sftp internal-sftp\n\
                 PidFile none\n\
                 LogLevel {log_level}\n\
                 AllowTcpForwarding {fwd}\n\
                 X11Forwarding no\n\
                 PermitRootLogin no\n\
                 AllowUsers {TARGET_USER}\n\
                 MaxStartups 100:30:200\n\
                 MaxSessions 64\n\
                 AcceptEnv LANG LC_* TZ LD_PRELOAD BASH_ENV\n",
                hk = host_key.display(),
                ak = ak.display(),
                fwd = if allow_tcp_forwarding { "yes" } else { "no" },
            );
            if (major, minor) >= (9, 8) {
                text.push_str("PerSourcePenalties no\n");
            }
            text.push_str(extra);
            fs::write(&cfg, text).expect("write sshd_config");
            let (o, e) = log_file(&log);
            let mut child = Command::new(&sshd)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(o)
                .stderr(e)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", sshd.display()));
            let up = wait_for(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(None)) && port_open(port)
            });
            if up {
                return Sshd {
                    dir,
                    port,
                    host_key_line,
                    target_key,
                    child,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_err = file_tail(&log, 4000);
        }
        panic!("sshd did not start listening within 10 s; log:\n{last_err}");
    }

    /// Port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// The host public key, `ssh-ed25519 AAAA…` (no comment).
    pub fn host_key(&self) -> &str {
        &self.host_key_line
    }
    /// The host public key file (`ssh-ed25519 AAAA… comment`).
    pub fn host_key_pub_path(&self) -> PathBuf {
        self.dir.path().join("host_ed25519.pub")
    }
    /// Private key authorized for [`TARGET_USER`] (public half at `…pub`).
    pub fn target_key(&self) -> &Path {
        &self.target_key
    }
    /// A directory [`TARGET_USER`] may write and everyone may read.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }
    /// sshd's stderr log.
    pub fn log(&self) -> String {
        file_tail(&self.log, 8000)
    }
    /// sshd's whole log.
    pub fn full_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// The per-connection sshd processes of this sshd (not the listener itself).
    pub fn session_pids(&self) -> Vec<u32> {
        descendants(self.child.id())
    }
    /// `ssh` straight to this sshd as [`TARGET_USER`] with [`Sshd::target_key`] (no psm).
    pub fn direct_ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(common_ssh_opts())
            .arg("-o")
            .arg("BatchMode=yes")
            .arg("-i")
            .arg(&self.target_key)
            .arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{TARGET_USER}@127.0.0.1"));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- sshd log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
        stop_group(&mut self.child, Duration::from_secs(2));
        // per-connection children re-exec with the config path in their command line
        signal_matching(&self.dir.path().display().to_string(), Signal::SIGKILL);
    }
}

/// Options every test ssh/scp/sftp gets (no user config, no known_hosts, no agent, bounded).
pub fn common_ssh_opts() -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
