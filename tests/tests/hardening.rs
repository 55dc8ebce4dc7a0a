//! psm probed as an attacker and an unlucky operator would (issue #5): forged log lines, one
//! recording that cannot be written, a relay killed hard, a flood of stalled connections, and
//! targets that freeze or die under a session.

use psm_tests::*;
use serde_json::Value;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn is(e: &Value, event: &str) -> bool {
    jstr(e, "event") == event
}

/// Starts `ssh … CMD` as alice (stdout and stderr piped) and returns it with the session id once
/// psm has started the session.
fn session(w: &World, cmd: &str) -> (std::process::Child, String) {
    let mark = w.psm.audit_mark();
    let child = w
        .ssh()
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let start = w
        .psm
        .wait_audit_after(mark, "session_start", T, |e| is(e, "session_start"));
    (child, jstr(&start, "session_id").to_string())
}

/// Reads the child's stdout until `needle` appeared (the command runs on the target).
fn read_until(child: &mut std::process::Child, needle: &str) {
    let out = child.stdout.as_mut().expect("stdout piped");
    let mut seen = String::new();
    let mut b = [0u8; 1];
    while !seen.contains(needle) {
        match out.read(&mut b) {
            Ok(1) => seen.push(b[0] as char),
            _ => panic!("output ended before {needle:?}: {seen:?}"),
        }
    }
}

fn ended(w: &World, sid: &str, within: Duration) -> Value {
    w.psm
        .wait_audit(&format!("session_end of {sid}"), within, |e| {
            is(e, "session_end") && jstr(e, "session_id") == sid
        })
}

/// Waits for the child and returns (exit code, stdout, stderr).
fn finish(mut child: std::process::Child, within: Duration) -> (Option<i32>, String, String) {
    let status = wait_child(&mut child, within);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.and_then(|s| s.code()), out, err)
}

/// The relay's log in a `psm up` world (the children share psm up's stderr).
fn all_logs(w: &World) -> String {
    let mut s = String::new();
    for entry in std::fs::read_dir(w.psm.data_dir().parent().expect("temp dir")).expect("dir") {
        let p = entry.expect("entry").path();
        if p.extension().is_some_and(|e| e == "log") {
            s.push_str(&String::from_utf8_lossy(
                &std::fs::read(&p).unwrap_or_default(),
            ));
        }
    }
    s
}

fn sessions(w: &World) -> Vec<Value> {
    w.sessions()
}

fn assert_no_sessions_left(w: &World) {
    w.assert_all_sessions_ended()
}

#[test]
fn a_forged_login_name_forges_no_log_line_and_drives_no_terminal() {
    let w = World::new();
    let forged = "2026-12-03T00:00:00.000000Z  INFO psm_relay::session: authenticated peer=10.0.0.1:1 login=root user=root method=publickey";
    let login = format!("mallory\n{forged}\u{1b}]0;owned\u{7}\u{1b}[2J\0\u{202e}gpj.exe");
    let hex: String = login.bytes().map(|b| format!("{b:02x}")).collect();
    let out = run_cmd(
        Command::new(python3())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/forged_login.py"))
            .arg(w.psm.port().to_string())
            .arg(&hex),
        None,
        CMD_TIMEOUT,
    );
    assert!(
        out.stdout_str().contains("DENIED"),
        "the forged login must be refused\n{}",
        out.describe()
    );
    let failure = w
        .psm
        .wait_audit("auth_failure of the forged login", T, |e| {
            is(e, "auth_failure") && jstr(e, "login").starts_with("mallory\n")
        });
    // the audit log keeps exactly what was sent (JSON escapes it)
    assert_eq!(jstr(&failure, "login"), login);

    let logs = all_logs(&w);
    assert!(
        logs.contains("mallory\\n2026-12-03T00:00:00"),
        "the attempt is logged, escaped:\n{logs}"
    );
    for line in logs.lines() {
        assert!(
            !line.starts_with("2026-12-03T00:00:00.000000Z"),
            "a forged line reached the log: {line:?}"
        );
    }
    for bad in ['\u{1b}', '\0', '\u{7}', '\u{202e}'] {
        assert!(
            !logs.contains(bad),
            "{bad:?} reached the logs (ANSI colours included: logs are not a terminal)"
        );
    }
    let tail = w.psm.psmctl_ok(&["audit", "tail", "-n", "50"], None);
    for bad in ['\u{1b}', '\0', '\u{7}', '\u{202e}'] {
        assert!(!tail.contains(bad), "{bad:?} in audit tail:\n{tail:?}");
    }
    assert!(
        !tail.lines().any(|l| l.starts_with("2026-12-03T00:00:00")),
        "a forged line in audit tail:\n{tail}"
    );
    assert!(tail.contains(r"login="), "{tail}");
}

/// A tmpfs mounted over a directory for the length of a test.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, options: &str) -> Tmpfs {
        let out = run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", options, "psm-test"])
                .arg(dir),
            None,
            Duration::from_secs(10),
        );
        assert!(
            out.success(),
            "this test mounts a tmpfs and must run as root:\n{}",
            out.describe()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn one_unwritable_recording_refuses_only_its_session_before_the_target_login() {
    let w = World::build_opts(
        PsmMode::Up,
        Sshd::start_opts(false, "INFO"),
        PsmOpts::default(),
    );
    // Room for exactly one more file where recordings are written: session A gets it.
    let recordings = w.psm.data_dir().join("recordings");
    let _fs = Tmpfs::mount(&recordings, "size=64m,nr_inodes=2,mode=0700");
    let (a, a_sid) = session(&w, "echo A-STARTED; sleep 4; echo A-DONE");
    let logins = |log: &str| log.matches("Accepted password for").count();
    let before = logins(&w.sshd.full_log());

    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo B-MUST-NOT-RUN"));
    let line = assert_refused(&out, "psm: session recording is unavailable");
    assert_eq!(
        line,
        "psm: session recording is unavailable; try again later"
    );
    assert!(!out.stdout_str().contains("B-MUST-NOT-RUN"));
    let denied = w
        .psm
        .wait_audit_after(mark, "session_denied of B", T, |e| is(e, "session_denied"));
    assert!(
        jstr(&denied, "reason").contains("psm-recorder refused the recording"),
        "{denied}"
    );
    assert_eq!(
        logins(&w.sshd.full_log()),
        before,
        "B was refused before psm logged in to the target"
    );

    // psmctl status shows the exhausted file system and a healthy recorder link
    let status: Value =
        serde_json::from_str(&w.psm.psmctl_ok(&["status", "--json"], None)).expect("json");
    assert_eq!(status["recordings"]["free_inodes"], 0, "{status}");
    assert!(
        wait_for(T, || {
            let s: Value = serde_json::from_str(&w.psm.psmctl_ok(&["status", "--json"], None))
                .unwrap_or_default();
            s["relays"][0]["stats"]["recorder_connected"] == true
        }),
        "recorder reported connected"
    );
    let text = w.psm.psmctl_ok(&["status"], None);
    assert!(text.contains("0 files free"), "{text}");

    // A lives on and ends normally, recorded
    let (code, stdout, stderr) = finish(a, T);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("A-DONE"), "{stdout}");
    let end = ended(&w, &a_sid, T);
    assert_eq!(jstr(&end, "reason"), "target ended the session", "{end}");
    let rec = recordings.join(format!("{a_sid}.psmrec"));
    assert!(rec.exists(), "A's recording is on the tmpfs");
    assert_no_sessions_left(&w);
}

#[test]
fn a_relay_killed_hard_gets_its_sessions_ended_as_relay_lost() {
    let w = World::with_mode(PsmMode::Separate);
    let (child, sid) = session(&w, "echo STARTED; sleep 60");
    let start = w
        .psm
        .wait_audit("session_start", T, |e| jstr(e, "session_id") == sid);
    // wait until control has seen the session's progress (relays report it every 2 s)
    assert!(
        wait_for(T, || sessions(&w).iter().any(|s| jstr(s, "session_id")
            == sid
            && s["bytes_down"].as_u64() >= Some(8))),
        "progress reported: {:?}",
        sessions(&w)
    );
    let pids = w.psm.relay_pids();
    assert_eq!(pids.len(), 1);
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the relay");
    let end = ended(&w, &sid, Duration::from_secs(30));
    assert!(
        killed.elapsed() >= Duration::from_secs(9),
        "the relay had its grace to come back"
    );
    assert_eq!(jstr(&end, "reason"), "relay lost", "{end}");
    assert_eq!(jstr(&end, "reason_code"), "relay_lost", "{end}");
    assert_eq!(jstr(&end, "origin"), "control", "{end}");
    assert_eq!(end["start_ms"], start["start_ms"], "{end}");
    assert!(end["bytes_down"].as_u64() >= Some(8), "{end}");
    assert!(end["end_ms"].as_u64() >= end["start_ms"].as_u64(), "{end}");
    assert!(sessions(&w).is_empty(), "no longer listed");
    let _ = finish(child, Duration::from_secs(1));
}

/// Counts, over a bounded flood, what the relay did with each connection.
const FLOOD: &str = r#"
import socket, sys, time, select
port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"SSH-2.0-flood\r\n")
        socks.append(s)
    except OSError:
        s.close()
time.sleep(1.0)
refused = held = 0
for s in socks:
    s.setblocking(False)
    got, alive = b"", True
    try:
        while True:
            b = s.recv(65536)
            if not b:
                alive = False
                break
            got += b
    except BlockingIOError:
        pass
    except OSError:
        alive = False
    if alive:
        held += 1
    elif not got:
        refused += 1
print(f"connected={len(socks)} refused={refused} held={held}", flush=True)
# the held ones must be cut at the login grace time
deadline = time.time() + hold
open_ = [s for s in socks]
while open_ and time.time() < deadline:
    r, _, _ = select.select(open_, [], [], 0.2)
    for s in r:
        try:
            if not s.recv(65536):
                open_.remove(s)
        except BlockingIOError:
            pass
        except OSError:
            open_.remove(s)
print(f"still_open={len(open_)}", flush=True)
for s in socks:
    s.close()
"#;

fn field_of(text: &str, key: &str) -> u64 {
    text.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
}

#[test]
fn a_flood_of_stalled_connections_is_capped_and_logins_still_work() {
    let w = World::build_opts(
        PsmMode::Up,
        Sshd::start(),
        PsmOpts {
            config: Some(
                "[relay]\nlogin_grace_secs = 4\nmax_startups = \"20:30:60\"\nper_source_max_startups = 10\n"
                    .into(),
            ),
            ..Default::default()
        },
    );
    let relay = w.psm.relay_pids()[0];
    let rss_before = vm_rss_kib(relay);
    let mut flood = Command::new(python3())
        .arg("-c")
        .arg(FLOOD)
        .arg(w.psm.port().to_string())
        .arg("400")
        .arg("10")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flood");
    // while the flood holds its connections, alice logs in from 127.0.0.1
    let mut out = flood.stdout.take().expect("stdout");
    let mut first = String::new();
    let mut b = [0u8; 1];
    while !first.ends_with('\n') {
        if out.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        first.push(b[0] as char);
    }
    let peak = vm_rss_kib(relay);
    let ok = run_ssh(w.ssh().arg("echo still-works"));
    assert!(
        ok.success() && ok.stdout_str().contains("still-works"),
        "a legitimate login during the flood:\n{}",
        ok.describe()
    );
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    let _ = wait_child(&mut flood, Duration::from_secs(30));
    assert_eq!(field_of(&first, "connected"), 400, "{first}");
    let held = field_of(&first, "held");
    assert!(held <= 10, "at most per_source_max_startups held: {first}");
    assert!(field_of(&first, "refused") >= 390, "{first}");
    assert_eq!(
        field_of(&rest, "still_open"),
        0,
        "the held ones are cut at the 4 s login grace: {rest}"
    );
    assert!(
        peak < rss_before + 32 * 1024,
        "relay RSS {rss_before} KiB before, {peak} KiB during the flood"
    );
    assert!(
        wait_for(T, || vm_rss_kib(relay) < rss_before + 16 * 1024),
        "relay RSS back near {rss_before} KiB: {} KiB",
        vm_rss_kib(relay)
    );
    let status: Value = {
        let mut s = Value::Null;
        wait_for(T, || {
            s = serde_json::from_str(&w.psm.psmctl_ok(&["status", "--json"], None))
                .unwrap_or_default();
            s["relays"][0]["stats"]["startups_refused"].as_u64() >= Some(390)
                && s["relays"][0]["stats"]["preauth_failures"].as_u64() >= Some(400)
        });
        s
    };
    let stats = &status["relays"][0]["stats"];
    assert!(stats["startups_refused"].as_u64() >= Some(390), "{status}");
    assert!(stats["preauth_failures"].as_u64() >= Some(400), "{status}");
    // every failure is counted, but the log holds only a rate-limited few
    let logs = all_logs(&w);
    let lines = logs
        .lines()
        .filter(|l| l.contains("connection failed before authentication"))
        .count();
    assert!(
        lines > 0 && lines < 200,
        "{lines} log lines for 400 failures"
    );
    assert!(logs.contains("peer=127.0.0.2:"), "source address logged");
    assert!(logs.contains("suppressed="), "suppressed lines are counted");
}

fn stop_or_kill_target(w: &World, sig: nix::sys::signal::Signal) -> Vec<u32> {
    let pids = w.sshd.session_pids();
    assert!(!pids.is_empty(), "the target has session processes");
    for &p in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), sig);
    }
    pids
}

#[test]
fn a_frozen_target_is_reported_as_not_responding() {
    let w = World::build_opts(
        PsmMode::Up,
        Sshd::start(),
        PsmOpts {
            config: Some("[relay]\ntarget_keepalive_secs = 1\ntarget_keepalive_max = 2\n".into()),
            ..Default::default()
        },
    );
    let (mut child, sid) = session(&w, "echo STARTED; sleep 60");
    read_until(&mut child, "STARTED\n");
    let stopped = stop_or_kill_target(&w, nix::sys::signal::Signal::SIGSTOP);
    let t0 = Instant::now();
    let (code, _, stderr) = finish(child, T);
    for &p in &stopped {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "noticed within a few keepalives, not minutes"
    );
    assert_eq!(code, Some(255), "{stderr}");
    assert!(
        stderr.contains("psm: the target stopped responding"),
        "{stderr}"
    );
    let end = ended(&w, &sid, T);
    assert_eq!(jstr(&end, "reason"), "target stopped responding", "{end}");
    assert_eq!(jstr(&end, "reason_code"), "target_unresponsive", "{end}");
    assert_eq!(jstr(&end, "side"), "target", "{end}");
    assert_no_sessions_left(&w);
}

#[test]
fn a_target_that_dies_is_reported_as_closing_the_connection() {
    let w = World::new();
    let (mut child, sid) = session(&w, "echo STARTED; sleep 60");
    read_until(&mut child, "STARTED\n");
    stop_or_kill_target(&w, nix::sys::signal::Signal::SIGKILL);
    let (code, _, stderr) = finish(child, T);
    assert_eq!(code, Some(255), "{stderr}");
    assert!(
        stderr.contains("psm: the target closed the connection"),
        "{stderr}"
    );
    let end = ended(&w, &sid, T);
    assert!(
        jstr(&end, "reason").starts_with("target closed the connection"),
        "{end}"
    );
    assert_eq!(jstr(&end, "reason_code"), "target_closed", "{end}");
    assert_no_sessions_left(&w);
}
