//! Starting, watching, restarting and stopping psm's daemons.
//!
//! A [`Supervisor`] owns the child processes. It must live on the main thread: children are
//! started through `psm __exec-child` ([`exec_child`]), which asks the kernel for SIGTERM when the
//! thread that forked it ends (`PR_SET_PDEATHSIG`), so that no daemon outlives a `psm up` that was
//! killed hard. Each child gets its own process group, so a Ctrl-C in the terminal reaches only
//! `psm up`, which then stops the children in order.
//!
//! What it does not do: decide what to start (see [`crate::up`]) or parse any configuration.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Name of the hidden subcommand that execs a child with a parent-death signal set.
pub const EXEC_CHILD: &str = "__exec-child";
/// How long each daemon may take to get ready at start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each daemon may take to stop after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often children and readiness are polled.
pub const POLL: Duration = Duration::from_millis(50);

/// Why a daemon could not be found, started or made ready.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The directory of the running executable is unknown.
    #[error("cannot find the directory of the psm executable: {0}")]
    ExeDir(io::Error),
    /// A daemon's executable is not next to `psm`.
    #[error(
        "{name} not found in {} (it must sit next to psm); build the workspace first: \
         cargo build --workspace",
        .dir.display()
    )]
    MissingBinary {
        /// The executable's name.
        name: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// The process could not be spawned.
    #[error("cannot start {name} ({}): {source}", .program.display())]
    Spawn {
        /// The daemon.
        name: String,
        /// Its executable.
        program: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The daemon exited while `psm up` waited for it.
    #[error("{name} exited ({status}) before {what}")]
    ExitedDuringStart {
        /// The daemon.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// What was awaited.
        what: String,
    },
    /// The daemon did not get ready in time.
    #[error("{name} did not get ready within {}s: waited until {what}", .timeout.as_secs())]
    NotReady {
        /// The daemon.
        name: String,
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// Something already serves a socket that the daemon is about to create.
    #[error(
        "{what} already accepts connections: is another psm up running on this data directory?"
    )]
    AlreadyRunning {
        /// The socket.
        what: String,
    },
    /// SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot watch for signals: {0}")]
    Signals(io::Error),
}

/// The directory that holds the running executable (and so the other psm binaries).
pub fn exe_dir() -> Result<PathBuf, LaunchError> {
    let exe = std::env::current_exe().map_err(LaunchError::ExeDir)?;
    exe.parent().map(Path::to_path_buf).ok_or_else(|| {
        LaunchError::ExeDir(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} has no parent directory", exe.display()),
        ))
    })
}

/// `dir/name` when it is an executable file.
pub fn find_binary(dir: &Path, name: &str) -> Result<PathBuf, LaunchError> {
    let path = dir.join(name);
    match fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(path),
        _ => Err(LaunchError::MissingBinary {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        }),
    }
}

/// Restart delays: `initial`, doubling up to `max`, back to `initial` after a child ran for
/// `reset_after`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff with the given bounds.
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Backoff {
            initial,
            max,
            reset_after,
            current: initial,
        }
    }

    /// `psm up`'s policy: 1 s doubling to 10 s, reset after 30 s of uptime.
    pub fn standard() -> Self {
        Self::new(
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    }

    /// The delay before restarting a child that exited after running for `uptime`.
    pub fn next(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.reset_after {
            self.current = self.initial;
        }
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        delay
    }
}

/// Receives the supervisor's messages (restarts, kills); `psm up` prints them to stderr.
pub type Report = Box<dyn FnMut(String)>;

/// What to run for one daemon.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    /// Name used in messages (`psm-recorder`).
    pub name: String,
    /// Absolute path of the executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

enum State {
    Running { child: Child, since: Instant },
    Restarting { at: Instant },
}

struct Slot {
    spec: ChildSpec,
    state: State,
    backoff: Backoff,
}

/// Whether the awaited daemon got ready or `psm up` was asked to stop first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The probe succeeded.
    Ready,
    /// SIGINT or SIGTERM arrived while waiting.
    Interrupted,
}

/// The set of supervised daemons, in start order.
pub struct Supervisor {
    wrapper: Option<PathBuf>,
    backoff: Backoff,
    report: Report,
    slots: Vec<Slot>,
}

impl Supervisor {
    /// A supervisor that starts each child through `wrapper __exec-child` (the psm executable)
    /// or, with `None`, directly. `report` gets the restart and kill messages.
    pub fn new(wrapper: Option<PathBuf>, backoff: Backoff, report: Report) -> Self {
        Supervisor {
            wrapper,
            backoff,
            report,
            slots: Vec::new(),
        }
    }

    fn spawn(wrapper: Option<&Path>, spec: &ChildSpec) -> Result<Child, LaunchError> {
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w);
                c.arg(EXEC_CHILD)
                    .arg("--parent")
                    .arg(std::process::id().to_string())
                    .arg("--")
                    .arg(&spec.program);
                c
            }
            None => Command::new(&spec.program),
        };
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                name: spec.name.clone(),
                program: spec.program.clone(),
                source,
            })
    }

    /// Starts a child; returns its index for [`Supervisor::wait_ready`].
    pub fn start(&mut self, spec: ChildSpec) -> Result<usize, LaunchError> {
        let child = Self::spawn(self.wrapper.as_deref(), &spec)?;
        self.slots.push(Slot {
            spec,
            state: State::Running {
                child,
                since: Instant::now(),
            },
            backoff: self.backoff.clone(),
        });
        Ok(self.slots.len() - 1)
    }

    /// Process id of child `idx` while it runs.
    pub fn pid(&self, idx: usize) -> Option<u32> {
        match self.slots.get(idx).map(|s| &s.state) {
            Some(State::Running { child, .. }) => Some(child.id()),
            _ => None,
        }
    }

    /// Polls `probe` until it succeeds, child `idx` exits (an error), `timeout` passes (an
    /// error) or `stop` is set. The other children are supervised meanwhile.
    pub fn wait_ready(
        &mut self,
        idx: usize,
        what: &str,
        mut probe: impl FnMut() -> bool,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Result<Readiness, LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(Readiness::Interrupted);
            }
            let slot = self
                .slots
                .get_mut(idx)
                .ok_or_else(|| LaunchError::NotReady {
                    name: format!("child #{idx}"),
                    what: what.to_string(),
                    timeout,
                })?;
            let name = slot.spec.name.clone();
            match &mut slot.state {
                State::Running { child, .. } => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(LaunchError::ExitedDuringStart {
                            name,
                            status,
                            what: what.to_string(),
                        });
                    }
                }
                State::Restarting { .. } => {
                    return Err(LaunchError::NotReady {
                        name,
                        what: what.to_string(),
                        timeout,
                    })
                }
            }
            if probe() {
                return Ok(Readiness::Ready);
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::NotReady {
                    name,
                    what: what.to_string(),
                    timeout,
                });
            }
            self.tick_except(Some(idx));
            thread::sleep(POLL);
        }
    }

    /// Notices children that exited (reporting `psm: NAME exited (STATUS); restarting in Ns`)
    /// and restarts those whose delay has passed.
    pub fn tick(&mut self) {
        self.tick_except(None);
    }

    fn tick_except(&mut self, skip: Option<usize>) {
        let now = Instant::now();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if Some(i) == skip {
                continue;
            }
            match &mut slot.state {
                State::Running { child, since } => {
                    let status = match child.try_wait() {
                        Ok(Some(status)) => status.to_string(),
                        Ok(None) => continue,
                        Err(e) => format!("cannot be waited for: {e}"),
                    };
                    let delay = slot.backoff.next(now.saturating_duration_since(*since));
                    (self.report)(format!(
                        "psm: {} exited ({status}); restarting in {}s",
                        slot.spec.name,
                        delay.as_secs_f64()
                    ));
                    slot.state = State::Restarting { at: now + delay };
                }
                State::Restarting { at } if now >= *at => {
                    match Self::spawn(self.wrapper.as_deref(), &slot.spec) {
                        Ok(child) => {
                            slot.state = State::Running {
                                child,
                                since: Instant::now(),
                            }
                        }
                        Err(e) => {
                            let delay = slot.backoff.next(Duration::ZERO);
                            (self.report)(format!(
                                "psm: {e}; retrying in {}s",
                                delay.as_secs_f64()
                            ));
                            slot.state = State::Restarting { at: now + delay };
                        }
                    }
                }
                State::Restarting { .. } => {}
            }
        }
    }

    /// Stops every child, the last started first: SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn shutdown(&mut self, grace: Duration) {
        while let Some(slot) = self.slots.pop() {
            if let State::Running { mut child, .. } = slot.state {
                stop_child(&mut child, &slot.spec.name, grace, &mut self.report);
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown(STOP_GRACE);
    }
}

fn stop_child(child: &mut Child, name: &str, grace: Duration, report: &mut dyn FnMut(String)) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // ESRCH: it exited meanwhile; try_wait below tells.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => break,
        }
    }
    report(format!(
        "psm: {name} did not stop within {}s of SIGTERM; killing it",
        grace.as_secs_f64()
    ));
    let _ = child.kill();
    let _ = child.wait();
}

/// A flag set once SIGINT or SIGTERM arrives; the signals no longer end the process.
pub fn stop_flag() -> Result<Arc<AtomicBool>, LaunchError> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(LaunchError::Signals)?;
    let (mut int, mut term) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::interrupt()).map_err(LaunchError::Signals)?,
            signal(SignalKind::terminate()).map_err(LaunchError::Signals)?,
        )
    };
    let flag = Arc::new(AtomicBool::new(false));
    let set = Arc::clone(&flag);
    thread::Builder::new()
        .name("psm-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            set.store(true, Ordering::SeqCst);
        })
        .map_err(LaunchError::Signals)?;
    Ok(flag)
}

/// Why [`exec_child`] did not turn into the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ExecChildError {
    /// `psm up` was already gone when the child was about to start.
    #[error("parent {0} is gone")]
    ParentGone(u32),
    /// `PR_SET_PDEATHSIG` failed.
    #[error("cannot set the parent-death signal: {0}")]
    Prctl(nix::Error),
    /// `execve` failed.
    #[error("cannot run {}: {source}", .program.display())]
    Exec {
        /// The executable.
        program: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// `psm __exec-child --parent PID -- PROGRAM ARGS…`: sets SIGTERM as this process's
/// parent-death signal, checks that `parent` (the `psm up` that spawned it) is still its parent,
/// then replaces itself with `program` (the signal survives `execve`). Returns only on failure.
///
/// This is how `psm up` keeps its children from outliving it without `unsafe` code: a
/// `pre_exec` hook would need it, a fresh process calling `prctl` on itself does not.
pub fn exec_child(parent: u32, program: &Path, args: &[OsString]) -> ExecChildError {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        return ExecChildError::Prctl(e);
    }
    // Parent died before prctl took effect: we were reparented and no signal will come.
    if i64::from(nix::unistd::getppid().as_raw()) != i64::from(parent) {
        return ExecChildError::ParentGone(parent);
    }
    let source = Command::new(program).args(args).exec();
    ExecChildError::Exec {
        program: program.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn sh(name: &str, script: &str) -> ChildSpec {
        ChildSpec {
            name: name.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    type Log = Arc<Mutex<Vec<String>>>;

    fn recorder() -> (Log, Report) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        (
            log,
            Box::new(move |m| {
                if let Ok(mut v) = l.lock() {
                    v.push(m)
                }
            }),
        )
    }

    fn lines(log: &Log) -> Vec<String> {
        log.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn alive(pid: u32) -> bool {
        // A zombie still answers kill(0); look at its state instead.
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::standard();
        let short = Duration::from_secs(2);
        let secs: Vec<u64> = (0..6).map(|_| b.next(short).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.next(Duration::from_secs(30)).as_secs(), 1);
        assert_eq!(b.next(short).as_secs(), 2);
    }

    #[test]
    fn missing_binary_names_it_and_says_to_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = find_binary(dir.path(), "psm-relay")
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.starts_with("psm-relay not found in "), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
        assert!(e.contains("cargo build --workspace"), "{e}");
        // Present but not executable is as good as missing.
        let p = dir.path().join("psm-relay");
        fs::write(&p, "#!/bin/sh\n").expect("write");
        assert!(find_binary(dir.path(), "psm-relay").is_err());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_binary(dir.path(), "psm-relay").expect("found"), p);
    }

    #[test]
    fn exited_child_is_restarted_and_others_keep_running() {
        let (log, report) = recorder();
        let fast = Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(400),
            Duration::from_secs(30),
        );
        let mut sup = Supervisor::new(None, fast, report);
        let steady = sup.start(sh("steady", "exec sleep 30")).expect("start");
        let flaky = sup.start(sh("flaky", "exit 3")).expect("start");
        let steady_pid = sup.pid(steady);
        let deadline = Instant::now() + Duration::from_secs(5);
        while lines(&log).len() < 3 && Instant::now() < deadline {
            sup.tick();
            thread::sleep(Duration::from_millis(10));
        }
        let l = lines(&log);
        assert!(l.len() >= 3, "{l:?}");
        assert_eq!(
            l[0],
            "psm: flaky exited (exit status: 3); restarting in 0.1s"
        );
        assert_eq!(
            l[1],
            "psm: flaky exited (exit status: 3); restarting in 0.2s"
        );
        assert_eq!(
            l[2],
            "psm: flaky exited (exit status: 3); restarting in 0.4s"
        );
        assert_eq!(
            sup.pid(steady),
            steady_pid,
            "the steady child was left alone"
        );
        let _ = flaky;
        sup.shutdown(Duration::from_secs(5));
        assert!(!steady_pid.is_some_and(alive));
    }

    #[test]
    fn shutdown_terms_in_reverse_order_then_kills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let order = dir.path().join("order");
        let o = order.display();
        let (log, report) = recorder();
        let mut sup = Supervisor::new(None, Backoff::standard(), report);
        let first = sup
            .start(sh(
                "first",
                &format!("trap 'echo first >> {o}; exit 0' TERM; while :; do sleep 0.05; done"),
            ))
            .expect("start");
        let stubborn = sup
            .start(sh(
                "stubborn",
                &format!("trap 'echo stubborn >> {o}' TERM; while :; do sleep 0.05; done"),
            ))
            .expect("start");
        let last = sup
            .start(sh(
                "last",
                &format!("trap 'echo last >> {o}; exit 0' TERM; while :; do sleep 0.05; done"),
            ))
            .expect("start");
        let pids: Vec<u32> = [first, stubborn, last]
            .iter()
            .filter_map(|&i| sup.pid(i))
            .collect();
        assert_eq!(pids.len(), 3);
        thread::sleep(Duration::from_millis(300)); // let the shells install their traps
        sup.shutdown(Duration::from_millis(500));
        let written = fs::read_to_string(&order).expect("order file");
        assert_eq!(written, "last\nstubborn\nfirst\n");
        assert_eq!(
            lines(&log),
            ["psm: stubborn did not stop within 0.5s of SIGTERM; killing it"]
        );
        assert!(pids.iter().all(|&p| !alive(p)));
    }

    #[test]
    fn wait_ready_reports_exit_timeout_and_interrupt() {
        let (_log, report) = recorder();
        let mut sup = Supervisor::new(None, Backoff::standard(), report);
        let stop = AtomicBool::new(false);
        let dies = sup.start(sh("psm-control", "exit 7")).expect("start");
        let e = sup
            .wait_ready(
                dies,
                "x.sock accepted connections",
                || false,
                Duration::from_secs(5),
                &stop,
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            e,
            "psm-control exited (exit status: 7) before x.sock accepted connections"
        );

        let sleeps = sup.start(sh("slow", "exec sleep 30")).expect("start");
        let e = sup
            .wait_ready(sleeps, "never", || false, Duration::from_millis(200), &stop)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(e, "slow did not get ready within 0s: waited until never");

        let mut calls = 0;
        let r = sup
            .wait_ready(
                sleeps,
                "third probe",
                || {
                    calls += 1;
                    calls == 3
                },
                Duration::from_secs(5),
                &stop,
            )
            .expect("ready");
        assert_eq!(r, Readiness::Ready);
        stop.store(true, Ordering::SeqCst);
        let r = sup
            .wait_ready(sleeps, "never", || false, Duration::from_secs(5), &stop)
            .expect("interrupted");
        assert_eq!(r, Readiness::Interrupted);
        sup.shutdown(Duration::from_secs(5));
    }
}
