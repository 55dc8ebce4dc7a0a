//! A psm under test: `psm up` or three separate daemons, psmctl, the audit log.

#[allow(unused_imports)]
use super::*;

/// How a [`Psm`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsmMode {
    /// `psm up` (the launcher supervises the three daemons).
    Up,
    /// psm-control, psm-recorder and psm-relay started separately by the test.
    Separate,
}

struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running psm with a temporary data directory.
pub struct Psm {
    dir: TempDir,
    data: PathBuf,
    port: u16,
    rdp_port: u16,
    mode: PsmMode,
    up: Option<Daemon>,
    daemons: Vec<Daemon>,
    relay_args: Vec<String>,
    relay_wrapper: Vec<String>,
    control_args: Vec<String>,
}

/// How a test psm is configured beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct PsmOpts {
    /// `psm.toml` written into the data directory before the start ([`PsmMode::Up`]).
    pub config: Option<String>,
    /// Extra psm-relay flags ([`PsmMode::Separate`]).
    pub relay_args: Vec<String>,
    /// A command psm-relay is started through, its path appended ([`PsmMode::Separate`]; e.g.
    /// tests/py/no_io_uring.py, which execs it under a seccomp filter).
    pub relay_wrapper: Vec<String>,
    /// Extra psm-control flags ([`PsmMode::Separate`]; [`Psm::set_control_args`] changes them
    /// for the next [`Psm::start_control`]).
    pub control_args: Vec<String>,
}

/// `--rdp-listen 127.0.0.1:PORT` for psm up and psm-relay.
fn rdp_listen_args(port: u16) -> Vec<String> {
    vec!["--rdp-listen".into(), format!("127.0.0.1:{port}")]
}

/// Relay worker runtimes every test psm gets.
pub const WORKERS: &str = "2";

impl Psm {
    /// `psm up --data-dir D --listen 127.0.0.1:P --workers 2`.
    pub fn up() -> Psm {
        Psm::start(PsmMode::Up)
    }

    /// The three daemons started separately (so that psm-recorder can be stopped alone).
    pub fn separate() -> Psm {
        Psm::start(PsmMode::Separate)
    }

    /// Starts psm in `mode`; waits (30 s at most) until the relay port accepts and
    /// `psmctl user list` succeeds.
    pub fn start(mode: PsmMode) -> Psm {
        Psm::start_opts(mode, PsmOpts::default())
    }

    /// Like [`Psm::start`], configured by `opts`.
    pub fn start_opts(mode: PsmMode, opts: PsmOpts) -> Psm {
        require_psm_binaries();
        let dir = short_tempdir("psm");
        let data = dir.path().join("d");
        fs::create_dir_all(&data).expect("data dir");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("chmod data dir");
        if let Some(cfg) = &opts.config {
            fs::write(data.join("psm.toml"), cfg).expect("psm.toml");
        }
        let port = free_port();
        let rdp_port = free_port();
        let mut psm = Psm {
            dir,
            data,
            port,
            rdp_port,
            mode,
            up: None,
            daemons: Vec::new(),
            relay_args: opts.relay_args,
            relay_wrapper: opts.relay_wrapper,
            control_args: opts.control_args,
        };
        match mode {
            PsmMode::Up => {
                let log = psm.dir.path().join("psm-up.log");
                let (o, e) = log_file(&log);
                let child = Command::new(bin("psm"))
                    .arg("up")
                    .arg("--data-dir")
                    .arg(&psm.data)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .args(rdp_listen_args(rdp_port))
                    .arg("--workers")
                    .arg(WORKERS)
                    .env(
                        "RUST_LOG",
                        std::env::var("PSM_TEST_LOG").unwrap_or_else(|_| "info".into()),
                    )
                    .stdin(Stdio::null())
                    .stdout(o)
                    .stderr(e)
                    .process_group(0)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start psm up: {e}"));
                psm.up = Some(Daemon {
                    name: "psm",
                    child,
                    log,
                });
            }
            PsmMode::Separate => {
                psm.spawn_daemon("psm-control");
                let sock = psm.data.join("control.sock");
                let ok = wait_for(Duration::from_secs(15), || sock.exists());
                psm.assert_alive(ok, "psm-control did not create control.sock within 15 s");
                psm.start_recorder();
                psm.spawn_daemon("psm-relay");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut port_ok = false;
        let mut ctl_ok = false;
        let mut last = String::new();
        while Instant::now() < deadline {
            psm.assert_alive(true, "");
            if !port_ok {
                port_ok = port_open(port);
            }
            if port_ok && !ctl_ok {
                let out = psm.psmctl_timeout(&["user", "list"], None, Duration::from_secs(10));
                ctl_ok = out.success();
                if !ctl_ok {
                    last = out.describe();
                }
            }
            if port_ok && ctl_ok {
                psm.assert_backend_asked();
                return psm;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "psm ({mode:?}) not ready within 30 s: relay port {port} open: {port_ok}, psmctl user list ok: {ctl_ok}\n{last}\n{}",
            psm.logs()
        );
    }

    fn spawn_daemon(&mut self, name: &'static str) {
        let log = self.dir.path().join(format!("{name}.log"));
        let (o, e) = log_file(&log);
        let mut c = match self.relay_wrapper.split_first() {
            Some((wrapper, args)) if name == "psm-relay" => {
                let mut c = Command::new(wrapper);
                c.args(args).arg(bin(name));
                c
            }
            _ => Command::new(bin(name)),
        };
        c.arg("--data-dir").arg(&self.data);
        if name == "psm-relay" {
            c.arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .args(rdp_listen_args(self.rdp_port))
                .arg("--workers")
                .arg(WORKERS)
                .args(&self.relay_args);
        }
        if name == "psm-control" {
            c.args(&self.control_args);
        }
        let child = c
            .env(
                "RUST_LOG",
                std::env::var("PSM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.push(Daemon { name, child, log });
    }

    /// Where the environment asks for a back end (`PSM_RELAY_IO`, scripts/test.sh's epoll run)
    /// and the test passes no `--io` of its own: the relay's log shows it runs on that one
    /// (within 10 s), so a rerun on epoll cannot quietly run on io_uring.
    fn assert_backend_asked(&mut self) {
        let Ok(io) = std::env::var("PSM_RELAY_IO") else {
            return;
        };
        if self.relay_args.iter().any(|a| a == "--io") {
            return;
        }
        let line = match io.as_str() {
            "epoll" => "worker running on tokio (epoll)",
            "uring" => "worker running on io_uring",
            _ => return,
        };
        // the whole files: a chatty start (PSM_TEST_LOG=debug) can push the line out of the
        // tails `logs` shows
        let said = || {
            self.up
                .iter()
                .chain(self.daemons.iter())
                .any(|d| fs::read_to_string(&d.log).is_ok_and(|t| t.contains(line)))
        };
        let ok = wait_for(Duration::from_secs(10), said);
        self.assert_alive(
            ok,
            &format!("PSM_RELAY_IO={io}, but the relay's log never said {line:?} within 10 s"),
        );
    }

    /// Whether the relay's workers run on io_uring, as its log says (within 10 s): `--io auto`
    /// falls back to epoll where io_uring is refused.
    pub fn relay_on_io_uring(&self) -> bool {
        let said = |line: &str| {
            self.up
                .iter()
                .chain(self.daemons.iter())
                .any(|d| fs::read_to_string(&d.log).is_ok_and(|t| t.contains(line)))
        };
        let mut uring = false;
        let told = wait_for(Duration::from_secs(10), || {
            uring = said("worker running on io_uring");
            uring || said("worker running on tokio (epoll)")
        });
        assert!(told, "the relay's log never said which back end it runs on");
        uring
    }

    fn assert_alive(&mut self, cond: bool, what: &str) {
        let mut dead = Vec::new();
        for d in self.up.iter_mut().chain(self.daemons.iter_mut()) {
            if let Ok(Some(st)) = d.child.try_wait() {
                dead.push(format!("{} exited early with {st}", d.name));
            }
        }
        if !dead.is_empty() || !cond {
            panic!("{what} {}\n{}", dead.join("; "), self.logs());
        }
    }

    /// Starts psm-recorder (separate mode only) and waits (10 s at most) for recorder.sock.
    pub fn start_recorder(&mut self) {
        self.start_daemon("psm-recorder", "recorder.sock");
    }

    /// Kills psm-recorder with SIGKILL (separate mode only) and waits for it to be gone.
    pub fn kill_recorder(&mut self) {
        self.kill_daemon("psm-recorder");
    }

    /// Sends `signal` to psm-recorder (separate mode only): SIGSTOP stalls it, SIGCONT resumes.
    pub fn signal_recorder(&self, signal: Signal) {
        assert_eq!(self.mode, PsmMode::Separate, "needs PsmMode::Separate");
        for d in self.daemons.iter().filter(|d| d.name == "psm-recorder") {
            let _ = nix::sys::signal::kill(Pid::from_raw(d.child.id() as i32), signal);
        }
    }

    /// Starts psm-control (separate mode only) and waits (10 s at most) for control.sock.
    pub fn start_control(&mut self) {
        self.start_daemon("psm-control", "control.sock");
    }

    /// The psm-control flags the next [`Psm::start_control`] passes (separate mode only).
    pub fn set_control_args(&mut self, args: &[&str]) {
        self.control_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// Kills psm-control with SIGKILL (separate mode only) and waits for it to be gone.
    pub fn kill_control(&mut self) {
        self.kill_daemon("psm-control");
    }

    fn start_daemon(&mut self, name: &'static str, socket: &str) {
        assert_eq!(
            self.mode,
            PsmMode::Separate,
            "starting {name} alone needs PsmMode::Separate"
        );
        self.daemons.retain(|d| d.name != name);
        self.spawn_daemon(name);
        let sock = self.data.join(socket);
        let ok = wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        self.assert_alive(
            ok,
            &format!("{name} does not accept on {socket} within 10 s"),
        );
    }

    fn kill_daemon(&mut self, name: &'static str) {
        assert_eq!(
            self.mode,
            PsmMode::Separate,
            "killing {name} alone needs PsmMode::Separate"
        );
        for d in self.daemons.iter_mut().filter(|d| d.name == name) {
            let _ = killpg(Pid::from_raw(d.child.id() as i32), Signal::SIGKILL);
            let _ = d.child.kill();
            assert!(
                wait_child(&mut d.child, Duration::from_secs(10)).is_some(),
                "{name} did not die"
            );
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The direction and size of every DATA record in recording `recording_id`, read up to
    /// where the file ends or stops reading (a recording cut by a killed recorder ends early),
    /// and the error it stopped on, if any.
    pub fn recorded_data(
        &self,
        recording_id: &str,
    ) -> (
        Vec<(psm_recorder_format::Direction, usize)>,
        Option<psm_recorder_format::FormatError>,
    ) {
        let path = self
            .data
            .join("recordings")
            .join(format!("{recording_id}.psmrec"));
        let file = fs::File::open(&path).expect("recording file");
        let mut r = psm_recorder_format::file::RecordingReader::open(std::io::BufReader::new(file))
            .expect("recording header");
        let mut out = Vec::new();
        loop {
            match r.next_record() {
                Ok(Some(psm_recorder_format::file::Record::Data {
                    direction, data, ..
                })) => out.push((direction, data.len())),
                Ok(Some(_)) => {}
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }
    /// A scratch directory for the test (keys, downloads), inside the temp dir.
    pub fn work_dir(&self) -> PathBuf {
        let w = self.dir.path().join("w");
        fs::create_dir_all(&w).expect("work dir");
        w
    }
    /// Relay port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The relay's RDP port.
    pub fn rdp_port(&self) -> u16 {
        self.rdp_port
    }

    /// `127.0.0.1:RDP_PORT`, what an RDP client connects to.
    pub fn rdp_address(&self) -> String {
        format!("127.0.0.1:{}", self.rdp_port)
    }
    /// How it runs.
    pub fn mode(&self) -> PsmMode {
        self.mode
    }

    /// Runs `psmctl --data-dir D ARGS` with `stdin` (30 s at most).
    pub fn psmctl(&self, args: &[&str], stdin: Option<&str>) -> CmdOut {
        self.psmctl_timeout(args, stdin, Duration::from_secs(30))
    }

    /// Like [`Psm::psmctl`] with a chosen bound.
    pub fn psmctl_timeout(&self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> CmdOut {
        run_cmd(
            Command::new(bin("psmctl"))
                .arg("--data-dir")
                .arg(&self.data)
                .args(args)
                .env_remove("PSM_DATA_DIR"),
            stdin.map(str::as_bytes),
            timeout,
        )
    }

    /// Runs psmctl and panics (with the logs) unless it exits 0; returns its stdout.
    pub fn psmctl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.psmctl(args, stdin);
        assert!(out.success(), "psmctl {args:?} failed:\n{}", out.describe());
        out.stdout_str()
    }

    /// The audit log.
    pub fn audit(&self) -> Vec<Value> {
        audit_events(&self.data)
    }

    /// Number of audit events so far: pass it to [`Psm::wait_audit_after`] to look only at what
    /// happens next.
    pub fn audit_mark(&self) -> usize {
        self.audit().len()
    }

    /// Waits (up to `timeout`) for an audit event matching `pred`; panics with the log if none.
    pub fn wait_audit(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_audit_after(0, what, timeout, pred)
    }

    /// Like [`Psm::wait_audit`], among the events after the first `mark` ones.
    pub fn wait_audit_after(
        &self,
        mark: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut found = None;
        wait_for(timeout, || {
            found = self.audit().into_iter().skip(mark).find(|e| pred(e));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no audit event {what} within {timeout:?} (after the first {mark}); audit.jsonl:\n{}",
                self.audit()
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    /// `psmctl status --json`.
    pub fn status(&self) -> Value {
        let out = self.psmctl_ok(&["status", "--json"], None);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    /// Waits until every relay reports it applies the current policy version (relays report
    /// every 2 s); panics with the status after 10 s.
    pub fn wait_policy_applied(&self) {
        let mut last = Value::Null;
        let ok = wait_for(Duration::from_secs(10), || {
            last = self.status();
            let v = last["version"].as_u64();
            let relays = last["relays"].as_array().cloned().unwrap_or_default();
            !relays.is_empty()
                && relays
                    .iter()
                    .all(|r| r["stats"]["policy_version"].as_u64() == v)
        });
        assert!(
            ok,
            "the relays did not report the current policy version: {last}"
        );
    }

    /// Waits until every relay reports its recorder link as `connected`.
    pub fn wait_recorder_link(&self, connected: bool) {
        let mut last = Value::Null;
        let ok = wait_for(Duration::from_secs(10), || {
            last = self.status();
            let relays = last["relays"].as_array().cloned().unwrap_or_default();
            !relays.is_empty()
                && relays
                    .iter()
                    .all(|r| r["stats"]["recorder_connected"].as_bool() == Some(connected))
        });
        assert!(
            ok,
            "the relays did not report the recorder link {connected}: {last}"
        );
    }

    /// All audit events of kind `event` (e.g. `session_end`).
    pub fn audit_of(&self, event: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|e| jstr(e, "event") == event)
            .collect()
    }

    /// The id of the first access request (dual control) after audit line `mark`; waits for
    /// its `approval … requested` event (30 s at most).
    pub fn approval_requested(&self, mark: usize) -> String {
        let e = self.wait_audit_after(mark, "approval requested", Duration::from_secs(30), |e| {
            jstr(e, "event") == "approval" && jstr(e, "action") == "requested"
        });
        e["request"].as_u64().expect("request id").to_string()
    }

    /// `ssh -p PORT LOGIN@127.0.0.1` to this psm with public-key authentication by `key` only
    /// (`first`: options placed before the common ones, so that they win).
    pub fn ssh_with_key(&self, first: &[&str], login: &str, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args(first)
            .args(common_ssh_opts())
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "PreferredAuthentications=publickey",
            ])
            .arg("-i")
            .arg(key)
            .arg("-p")
            .arg(self.port().to_string())
            .arg(format!("{login}@127.0.0.1"));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// Pids of the psm-relay processes of this instance.
    pub fn relay_pids(&self) -> Vec<u32> {
        if self.mode == PsmMode::Separate {
            return self
                .daemons
                .iter()
                .filter(|d| d.name == "psm-relay")
                .map(|d| d.child.id())
                .collect();
        }
        pids_matching(&self.data.display().to_string(), Some("psm-relay"))
    }

    /// The tails of all logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for d in self.up.iter().chain(self.daemons.iter()) {
            s.push_str(&format!(
                "---- {} log ({}) ----\n{}\n",
                d.name,
                d.log.display(),
                file_tail(&d.log, 6000)
            ));
        }
        s
    }
}

impl Drop for Psm {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if let Some(mut up) = self.up.take() {
            stop_group(&mut up.child, Duration::from_secs(5));
        }
        // relay first, so sessions end before the recorder and control go
        for name in ["psm-relay", "psm-recorder", "psm-control"] {
            for d in self.daemons.iter_mut().filter(|d| d.name == name) {
                stop_group(&mut d.child, Duration::from_secs(5));
            }
        }
        // anything that left the process group but still names our data dir
        let needle = self.data.display().to_string();
        signal_matching(&needle, Signal::SIGTERM);
        if !wait_for(Duration::from_secs(3), || {
            pids_matching(&needle, None).is_empty()
        }) {
            signal_matching(&needle, Signal::SIGKILL);
        }
    }
}
