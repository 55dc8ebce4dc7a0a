//! The standard world: sshd + psm + alice, and the ssh/scp/sftp command builders.

#[allow(unused_imports)]
use super::*;

/// An sshd, a psm and the standard policy: user `alice` (key [`World::alice_key`] and password
/// [`ALICE_PASSWORD`]), target `web01` pinned to the sshd's host key, account
/// `psmtarget@web01` with the password credential, and alice's grant on it.
pub struct World {
    /// The psm under test (dropped first).
    pub psm: Psm,
    /// The target.
    pub sshd: Sshd,
    /// alice's private key (public half at `….pub`).
    pub alice_key: PathBuf,
    askpass: PathBuf,
}

/// alice's standard login string.
pub fn alice_login() -> String {
    format!("alice@{TARGET_USER}@web01")
}

impl World {
    /// `psm up` with the standard policy; waits until alice can run a command (10 s at most).
    pub fn new() -> World {
        World::with_mode(PsmMode::Up)
    }

    /// Like [`World::new`], with a chosen [`PsmMode`].
    pub fn with_mode(mode: PsmMode) -> World {
        World::build(mode, Sshd::start())
    }

    /// The standard world around a given sshd.
    pub fn build(mode: PsmMode, sshd: Sshd) -> World {
        World::build_opts(mode, sshd, PsmOpts::default())
    }

    /// The standard world around a given sshd, with a configured psm.
    pub fn build_opts(mode: PsmMode, sshd: Sshd, opts: PsmOpts) -> World {
        let psm = Psm::start_opts(mode, opts);
        let w = psm.work_dir();
        let alice_key = w.join("alice_ed25519");
        gen_key(&alice_key);
        let askpass = w.join("askpass.sh");
        let world = World {
            psm,
            sshd,
            alice_key,
            askpass,
        };
        world.psm.psmctl_ok(
            &[
                "user",
                "add",
                "alice",
                "--password-stdin",
                "--ssh-key",
                &pub_path(&world.alice_key).display().to_string(),
            ],
            Some(&format!("{ALICE_PASSWORD}\n")),
        );
        world.psm.psmctl_ok(
            &[
                "target",
                "add",
                "web01",
                "--address",
                &world.sshd.address(),
                "--host-key",
                world.sshd.host_key(),
            ],
            None,
        );
        world.psm.psmctl_ok(
            &[
                "account",
                "add",
                &format!("{TARGET_USER}@web01"),
                "--password-stdin",
            ],
            Some(&format!("{TARGET_PASSWORD}\n")),
        );
        world.psm.psmctl_ok(
            &["grant", "add", "alice", &format!("{TARGET_USER}@web01")],
            None,
        );
        world.wait_session_works(&alice_login(), Duration::from_secs(10));
        world
    }

    /// Waits until `ssh LOGIN true` with alice's key succeeds; panics with the last try otherwise.
    pub fn wait_session_works(&self, login: &str, timeout: Duration) {
        let mut last = None;
        let ok = wait_for(timeout, || {
            let out = run_cmd(
                self.ssh_as(login, &self.alice_key).arg("echo psm-ready"),
                None,
                CMD_TIMEOUT,
            );
            let ok = out.success() && out.stdout_str().contains("psm-ready");
            last = Some(out);
            ok
        });
        if !ok {
            panic!(
                "a session as {login} did not work within {timeout:?}; last try:\n{}",
                last.map(|o| o.describe()).unwrap_or_default()
            );
        }
        // the tries' own session_end events are written once psm-recorder confirmed their
        // recordings: wait for them, so that a test's audit mark comes after them
        let ended = wait_for(timeout, || {
            self.psm.audit_of("session_end").len() >= self.psm.audit_of("session_start").len()
        });
        assert!(
            ended,
            "the readiness sessions did not end within {timeout:?}"
        );
    }

    /// Live sessions as `psmctl sessions list --json` shows them.
    pub fn sessions(&self) -> Vec<Value> {
        let out = self.psm.psmctl_ok(&["sessions", "list", "--json"], None);
        serde_json::from_str::<Vec<Value>>(&out).expect("sessions json")
    }

    /// Waits (20 s at most) until no session is listed and every `session_start` in the audit
    /// log has its `session_end`; panics otherwise.
    pub fn assert_all_sessions_ended(&self) {
        let t = Duration::from_secs(20);
        assert!(
            wait_for(t, || self.sessions().is_empty()),
            "sessions still listed: {:?}",
            self.sessions()
        );
        let mut missing = Vec::new();
        let ok = wait_for(t, || {
            let ends = self.psm.audit_of("session_end");
            missing = self
                .psm
                .audit_of("session_start")
                .iter()
                .map(|e| jstr(e, "session_id").to_string())
                .filter(|s| !ends.iter().any(|e| jstr(e, "session_id") == s))
                .collect();
            missing.is_empty()
        });
        assert!(ok, "session_start without session_end: {missing:?}");
    }

    /// Replaces alice's grant on `TARGET_USER@web01` with one carrying `flags`.
    pub fn regrant(&self, flags: &[&str]) {
        let acct = format!("{TARGET_USER}@web01");
        self.psm
            .psmctl_ok(&["grant", "remove", "alice", &acct], None);
        let mut args = vec!["grant", "add", "alice", &acct];
        args.extend_from_slice(flags);
        self.psm.psmctl_ok(&args, None);
    }

    /// `ssh` as alice (publickey) with the standard login; append the remote command.
    pub fn ssh(&self) -> Command {
        self.ssh_as(&alice_login(), &self.alice_key)
    }

    /// `ssh -p PORT … -i KEY LOGIN@127.0.0.1` (publickey, batch mode).
    pub fn ssh_as(&self, login: &str, key: &Path) -> Command {
        self.ssh_with(&[], login, key)
    }

    /// Like [`World::ssh_as`] with `first` placed before the common options, so that its `-o`
    /// settings win (ssh keeps the first value it sees), e.g. `["-o", "LogLevel=INFO"]`.
    pub fn ssh_with(&self, first: &[&str], login: &str, key: &Path) -> Command {
        self.psm.ssh_with_key(first, login, key)
    }

    /// `ssh` with password authentication only, the password given through `SSH_ASKPASS`
    /// (`SSH_ASKPASS_REQUIRE=force`); run it with stdin not a terminal.
    pub fn ssh_password(&self, login: &str, password: &str) -> Command {
        password_ssh(self.psm.port(), login, password, &self.askpass)
    }

    /// `scp -P PORT …` as alice (login set with `-o User=`); append the file arguments, using
    /// `127.0.0.1:PATH` for remote ones.
    pub fn scp(&self) -> Command {
        let mut c = Command::new("scp");
        c.args(common_ssh_opts())
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "PreferredAuthentications=publickey",
            ])
            .arg("-o")
            .arg(format!("User={}", alice_login()))
            .arg("-i")
            .arg(&self.alice_key)
            .arg("-P")
            .arg(self.psm.port().to_string());
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `sftp -b BATCH -P PORT … alice@…@127.0.0.1`.
    pub fn sftp(&self, batch: &Path) -> Command {
        let mut c = Command::new("sftp");
        c.args(common_ssh_opts())
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "PreferredAuthentications=publickey",
            ])
            .arg("-i")
            .arg(&self.alice_key)
            .arg("-P")
            .arg(self.psm.port().to_string())
            .arg("-b")
            .arg(batch)
            .arg(format!("{}@127.0.0.1", alice_login()));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// Adds psm user `name` with a fresh key (no grant); returns the private key path.
    pub fn add_user_with_key(&self, name: &str) -> PathBuf {
        let key = self.psm.work_dir().join(format!("{name}_ed25519"));
        gen_key(&key);
        self.psm.psmctl_ok(
            &[
                "user",
                "add",
                name,
                "--ssh-key",
                &pub_path(&key).display().to_string(),
            ],
            None,
        );
        key
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// `ssh -p PORT LOGIN@127.0.0.1` with password authentication only; the password comes from an
/// `SSH_ASKPASS` script written at `askpass` (`SSH_ASKPASS_REQUIRE=force`, no terminal needed).
pub fn password_ssh(port: u16, login: &str, password: &str, askpass: &Path) -> Command {
    fs::write(askpass, format!("#!/bin/sh\nprintf '%s\\n' '{password}'\n")).expect("askpass");
    fs::set_permissions(askpass, fs::Permissions::from_mode(0o755)).expect("chmod askpass");
    let mut c = Command::new("ssh");
    c.args(common_ssh_opts())
        .args([
            "-o",
            "BatchMode=no",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "NumberOfPasswordPrompts=1",
        ])
        .arg("-p")
        .arg(port.to_string())
        .arg(format!("{login}@127.0.0.1"))
        .env("SSH_ASKPASS", askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .env_remove("SSH_AUTH_SOCK");
    c
}

/// Runs `ssh` and returns its output (bounded by [`CMD_TIMEOUT`]).
pub fn run_ssh(cmd: &mut Command) -> CmdOut {
    run_cmd(cmd, None, CMD_TIMEOUT)
}

/// Asserts a refused ssh session: exit 255 and a stderr line starting with `prefix`.
pub fn assert_refused(out: &CmdOut, prefix: &str) -> String {
    let err = out.stderr_str();
    assert_eq!(
        out.code(),
        Some(255),
        "expected ssh exit 255 for a refused session\n{}",
        out.describe()
    );
    let line = err
        .lines()
        .map(|l| l.trim_start_matches('\r').trim_end())
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "expected a stderr line starting {prefix:?}\n{}",
                out.describe()
            )
        });
    line.to_string()
}
