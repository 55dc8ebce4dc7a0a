//! `psm` as a process: exit codes of broken configs, the parent-death wrapper, and (when the
//! other daemons are built next to it) a full `psm up` start, restart and stop.

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const PSM: &str = env!("CARGO_BIN_EXE_psm");

fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_dead(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

fn children_of(pid: u32) -> Vec<(u32, String)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            let comm = head.split_once('(')?.1.to_string();
            (ppid == pid).then_some((p, comm))
        })
        .collect()
}

fn run_up(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(PSM)
        .arg("up")
        .args(args)
        .env_remove("PSM_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run psm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn broken_config_exits_2_naming_file_and_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let cfg = dir.path().join("psm.toml");
    fs::write(&cfg, "[relay]\nlisten = \"0.0.0.0:2222\"\nthreads = 4\n").expect("write");
    let (code, _, err) = run_up(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--config",
        cfg.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "psm: config {}: line 3, column 1: unknown field `threads`, expected one of `listen`, `workers`, `login_grace_secs`, `max_startups`, `per_source_max_startups`, `target_keepalive_secs`, `target_keepalive_max`, `max_connections_per_user`, `max_connections`, `durable_window_bytes`, `durable_window_ms`, `recorder_stall_secs`, `rdp_listen`, `rdp_public_address`, `rdp_cert`, `rdp_key`, `metrics_listen`, `pin_workers`, `io`",
            cfg.display()
        )
    );
    assert!(
        !data.exists(),
        "a bad config must not create the data directory"
    );

    let (code, _, err) = run_up(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        "nowhere",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("psm: --listen: "), "{err}");
}

#[test]
fn data_dir_that_is_a_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "").expect("write");
    // Without the daemons next to psm the launcher stops earlier, at the binary check (exit 1).
    let (code, _, err) = run_up(&["--data-dir", file.to_str().expect("utf-8")]);
    assert!(
        daemons_built().is_some(),
        "the daemons must be built next to psm: cargo build --workspace --bins"
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("psm: "), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
}

#[test]
fn exec_child_dies_with_its_parent() {
    // sh starts the wrapper in the background and exits at once: the wrapped sleep must get
    // SIGTERM from the kernel (or never start, when sh was gone before prctl).
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "\"{PSM}\" __exec-child --parent $$ -- /bin/sleep 30 </dev/null >/dev/null 2>&1 & echo $!; sleep 0.3"
        ))
        .output()
        .expect("sh");
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("pid");
    assert!(
        wait_dead(pid, Duration::from_secs(5)),
        "pid {pid} outlived its parent"
    );
}

#[test]
fn exec_child_runs_the_program_with_its_arguments() {
    let parent = std::process::id().to_string();
    let out = Command::new(PSM)
        .args([
            "__exec-child",
            "--parent",
            &parent,
            "--",
            "/bin/echo",
            "--data-dir",
            "x y",
        ])
        .output()
        .expect("psm");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "--data-dir x y\n");
    let out = Command::new(PSM)
        .args([
            "__exec-child",
            "--parent",
            &parent,
            "--",
            "/nonexistent/psm-relay",
        ])
        .output()
        .expect("psm");
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run /nonexistent/psm-relay"));
}

fn daemons_built() -> Option<PathBuf> {
    let dir = Path::new(PSM).parent()?.to_path_buf();
    ["psm-control", "psm-recorder", "psm-relay"]
        .iter()
        .all(|b| dir.join(b).is_file())
        .then_some(dir)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn up_restarts_a_dead_daemon_and_stops_cleanly() {
    assert!(
        daemons_built().is_some(),
        "psm-control, psm-recorder, psm-relay are not built next to psm: cargo build --workspace --bins (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let rdp_listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(PSM)
        .args([
            "up",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen",
            &listen,
            "--workers",
            "1",
            "--rdp-listen",
            &rdp_listen,
        ])
        .env_remove("PSM_DATA_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psm up");
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    let tx2 = tx.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx2.send(line);
        }
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let _ = tx;

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|l: &String| l.starts_with("psm is up: ")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "psm up did not come up: {seen:?}\n{}",
                    err_reader.join().unwrap_or_default()
                );
            }
        }
    }
    assert!(
        seen[0].starts_with("gateway host key: ssh-ed25519 SHA256:")
            && seen[0].ends_with("(created)"),
        "{seen:?}"
    );
    assert!(seen[1].starts_with("ssh-ed25519 AAAA"), "{seen:?}");
    assert_eq!(
        seen[2],
        format!(
            "psm is up: relay on {listen}; connect with: ssh -p {} <user>@<account>@<target>@127.0.0.1",
            listen.rsplit(':').next().unwrap_or_default()
        )
    );

    let kids = children_of(pid);
    let names: Vec<&str> = kids.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(kids.len(), 3, "{kids:?}");
    for want in ["psm-control", "psm-recorder", "psm-relay"] {
        assert!(names.contains(&want), "{kids:?}");
    }
    let recorder = kids
        .iter()
        .find(|(_, n)| n == "psm-recorder")
        .map(|(p, _)| *p)
        .expect("recorder");
    Command::new("kill")
        .args(["-KILL", &recorder.to_string()])
        .status()
        .expect("kill");
    // Restarted after 1 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let restarted = loop {
        if let Some((p, _)) = children_of(pid)
            .into_iter()
            .find(|(p, n)| n == "psm-recorder" && *p != recorder)
        {
            break Some(p);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        restarted.is_some(),
        "recorder was not restarted: {:?}",
        children_of(pid)
    );

    let all: Vec<u32> = children_of(pid).iter().map(|(p, _)| *p).collect();
    // Ctrl-C: the terminal sends SIGINT to psm up (the daemons run in their own process groups)
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    let err = err_reader.join().unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        err.contains("psm: psm-recorder exited (signal: 9 (SIGKILL)); restarting in 1s"),
        "{err}"
    );
    assert!(err.trim_end().ends_with("psm: stopped"), "{err}");
    for p in all {
        assert!(
            wait_dead(p, Duration::from_secs(2)),
            "child {p} left running"
        );
    }
}

#[test]
fn a_taken_port_makes_psm_up_exit_non_zero_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (code, out, err) = run_up(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        &addr.to_string(),
        "--rdp-listen",
        "off",
    ]);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
        "{err}"
    );
    assert!(!out.contains("psm is up"), "{out}");
    // nothing was started, and nothing is left behind listening
    assert!(!data.join("policy.sock").exists());
    // the same for the RDP listener
    let (code, out, err) = run_up(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--rdp-listen",
        &addr.to_string(),
    ]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains(&format!("cannot listen for RDP on {addr}"))
            && err.contains("--rdp-listen off"),
        "{err}"
    );
    assert!(!data.join("policy.sock").exists());
}

#[test]
fn a_data_dir_of_another_user_makes_psm_up_exit_non_zero() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    fs::create_dir(&data).expect("mkdir");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("chmod");
    let me = fs::metadata(dir.path()).expect("meta").uid();
    let other = if me == 4242 { 4343 } else { 4242 };
    if std::os::unix::fs::chown(&data, Some(other), None).is_err() {
        panic!("this test must run as root: it chowns a directory to uid {other}");
    }
    let (code, out, err) = run_up(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--rdp-listen",
        "off",
    ]);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains(&format!("owned by uid {other}")), "{err}");
    assert!(!out.contains("psm is up"), "{out}");
    // nothing was written into the other user's directory
    assert_eq!(fs::read_dir(&data).expect("read_dir").count(), 0);
}

#[test]
fn a_data_dir_that_others_may_read_makes_psm_up_exit_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    fs::create_dir(&data).expect("mkdir");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (code, out, err) = run_up(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--rdp-listen",
        "off",
    ]);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("accessible by group or others (mode 0755); run chmod 700 on it"),
        "{err}"
    );
    assert!(!out.contains("psm is up"), "{out}");
    // nothing was created in it
    assert_eq!(fs::read_dir(&data).expect("read_dir").count(), 0);
}
