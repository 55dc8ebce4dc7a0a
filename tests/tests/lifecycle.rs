//! How sessions end and what happens when a piece of psm goes away: Ctrl-D, the client vanishing,
//! the recorder dying mid-session (fail closed), psm-control down (the relay serves on its last
//! snapshot and resyncs), and slow readers on either side (throttled, bounded, nothing lost).

use psm_tests::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(15);

fn is(e: &Value, event: &str) -> bool {
    jstr(e, "event") == event
}

/// Waits for the `session_start` after `mark` and returns its session id. (Events of sessions
/// that ended just before `mark` may still arrive after it, so later checks match on the id.)
fn started_session(w: &World, mark: usize) -> String {
    let start = w
        .psm
        .wait_audit_after(mark, "session_start", T, |e| is(e, "session_start"));
    jstr(&start, "session_id").to_string()
}

/// Starts a 20 s exec session that prints `MUST-NOT-APPEAR` only if nothing cuts it short;
/// returns the ssh child (stdout and stderr piped) once psm has started the session.
fn long_session(w: &World) -> (std::process::Child, String) {
    let mark = w.psm.audit_mark();
    let child = w
        .ssh()
        .args(["echo STARTED; sleep 20; echo MUST-NOT-APPEAR"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    (child, started_session(w, mark))
}

/// Waits for the `session_end` of session `sid`.
fn ended_session(w: &World, sid: &str) -> Value {
    w.psm.wait_audit(&format!("session_end of {sid}"), T, |e| {
        is(e, "session_end") && jstr(e, "session_id") == sid
    })
}

#[test]
fn ctrl_d_ends_a_pty_session_and_it_is_audited() {
    let w = World::new();
    let mark = w.psm.audit_mark();
    let mut cmd = w.ssh();
    cmd.arg("-tt");
    let mut pty = PtySession::spawn(&cmd, &[("TERM", "xterm")], 24, 80);
    pty.send_line("echo \"AL\"\"IVE\"");
    pty.expect("ALIVE", T);
    let sid = started_session(&w, mark);
    pty.send("\x04");
    assert_eq!(
        pty.wait(T),
        Some(0),
        "Ctrl-D at the prompt ends the shell with status 0"
    );
    let end = ended_session(&w, &sid);
    assert_eq!(end["exit_status"], 0, "{end}");
}

/// A world whose sshd logs at DEBUG1 (a failure shows whether it learnt that psm's connection
/// ended), and an `ssh -tt` session running `command` there, its stdin and stdout piped; returns
/// them once psm has started the session.
fn terminal_session(command: &str) -> (World, std::process::Child, String) {
    let w = World::build(PsmMode::Up, Sshd::start_opts(false, "DEBUG1"));
    let mark = w.psm.audit_mark();
    let child = w
        .ssh()
        .args(["-tt", command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let sid = started_session(&w, mark);
    (w, child, sid)
}

#[test]
fn a_vanished_client_ends_the_session_and_the_target_side() {
    // a command line of this test's own: another `sleep 300` on the machine (a concurrent
    // test, an operator's shell waiting on the suite) must not count as the target side
    let marker = format!("sleep 300.{:07}", std::process::id());
    let (w, mut child, sid) = terminal_session(&format!("echo START; exec {marker}"));
    // the command's first output has come back through psm: the session is fully up on both
    // sides before the client vanishes
    let mut out = child.stdout.take().expect("stdout");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut buf = [0u8; 64];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("lock").extend_from_slice(&buf[..n]);
        }
    });
    assert!(
        wait_for(T, || String::from_utf8_lossy(&seen.lock().expect("lock"))
            .contains("START")),
        "no START from the target"
    );
    let sleeping = || !pids_matching(&marker, Some("sleep")).is_empty();
    assert!(wait_for(T, sleeping), "the remote command did not start");
    child.kill().expect("kill ssh");
    let _ = child.wait();
    let end = ended_session(&w, &sid);
    assert!(jstr(&end, "reason").contains("client"), "{end}");
    if !wait_for(T, || !sleeping()) {
        panic!(
            "the target-side command outlived the client by more than {T:?}\n{}",
            target_side_report(&w)
        );
    }
}

/// What a target side that outlived its session leaves to look at: whether psm still holds its
/// connection to sshd, what sshd's processes are doing, and sshd's own log.
fn target_side_report(w: &World) -> String {
    let port = w.sshd.port();
    // (`ss` is iproute2's, which the suite does not install: a missing tool is said, not a
    // panic that would hide the failure)
    let show = |cmd: &mut std::process::Command| match cmd.stdin(Stdio::null()).output() {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("({cmd:?} did not run: {e})\n"),
    };
    let sockets = show(std::process::Command::new("ss").args([
        "-tnpoie",
        "state",
        "all",
        &format!("( sport = :{port} or dport = :{port} )"),
    ]));
    let procs = show(std::process::Command::new("ps").args([
        "-eo",
        "pid,ppid,pgid,sid,tty,stat,wchan:24,args",
        "--forest",
    ]));
    let procs: String = procs
        .lines()
        .filter(|l| {
            l.contains("sshd")
                || l.contains("sleep 300")
                || l.contains("PSMFLOOD")
                || l.contains("psm-relay")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "sockets on sshd's port {port}:\n{sockets}\nprocesses:\n{procs}\n\
         sshd's log (the end):\n{}",
        w.sshd.log()
    )
}

/// The state letter of process `pid` (`R`, `S`, `D`…), from /proc.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the state follows the command name, which is in parentheses and may hold spaces
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn a_vanished_client_ends_the_target_side_even_while_the_target_floods_it() {
    // The user's client stops reading while the target floods a terminal, so psm stops reading
    // the target (its windows are full), then the client dies. psm's side of the target
    // connection may be parked inside its SSH task waiting for room; ending the session must
    // still end the target's command.
    // (the client's stdout is never read)
    let (w, mut child, sid) = terminal_session("exec yes PSMFLOOD");
    let flood = || pids_matching("yes PSMFLOOD", Some("yes"));
    assert!(
        wait_for(T, || !flood().is_empty()),
        "the flood did not start"
    );
    // the flood is held back all the way to the target: `yes` sleeps in its write, each time
    // it is looked at, for a while
    let stalled = || {
        flood().first().is_some_and(|pid| {
            (0..5).all(|_| {
                std::thread::sleep(Duration::from_millis(100));
                proc_state(*pid) == Some('S')
            })
        })
    };
    assert!(
        wait_for(T, stalled),
        "the target's flood was never held back"
    );
    child.kill().expect("kill ssh");
    let _ = child.wait();
    let end = ended_session(&w, &sid);
    assert!(jstr(&end, "reason").contains("client"), "{end}");
    if !wait_for(T, || flood().is_empty()) {
        panic!(
            "the target-side command outlived the client by more than {T:?}\n{}",
            target_side_report(&w)
        );
    }
    // and psm keeps nothing of it: its SSH task toward the target ended and let the socket go
    let relay = w.psm.relay_pids()[0];
    assert!(
        wait_for(T, || connections_to(relay, w.sshd.port()) == 0),
        "psm still holds its connection to the target {T:?} after the session ended\n{}",
        target_side_report(&w)
    );
}

#[test]
fn a_recorder_dying_mid_session_closes_the_session() {
    let mut w = World::with_mode(PsmMode::Separate);
    let (child, sid) = long_session(&w);
    let started = Instant::now();
    w.psm.kill_recorder();
    let out = child.wait_with_output().expect("ssh output");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the session outlived its recording by {:?}",
        started.elapsed()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("MUST-NOT-APPEAR"), "{stdout}");
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("session recording was lost"),
        "stderr: {stderr}"
    );
    let end = ended_session(&w, &sid);
    assert_eq!(jstr(&end, "reason"), "session recording was lost", "{end}");
}

#[test]
fn the_relay_serves_on_its_last_snapshot_while_control_is_down_then_resyncs() {
    let mut w = World::with_mode(PsmMode::Separate);
    w.psm.kill_control();
    let out = w.psm.psmctl(&["user", "list"], None);
    assert!(!out.success());
    assert!(
        out.stderr_str().contains("psm-control is not running"),
        "{}",
        out.describe()
    );

    // sessions go on under the last snapshot, and their audit events are kept for later
    let out = run_ssh(w.ssh().arg("echo while-control-is-down"));
    assert_eq!(
        out.stdout_str(),
        "while-control-is-down\n",
        "{}",
        out.describe()
    );

    w.psm.start_control();
    let end = w
        .psm
        .wait_audit("the session_end buffered while control was down", T, |e| {
            is(e, "session_end") && e["bytes_down"].as_u64() == Some(22)
        });
    assert_eq!(end["exit_status"], 0, "{end}");

    // the relay is back on control's policy: a grant removed now takes effect
    w.psm.psmctl_ok(
        &["grant", "remove", "alice", &format!("{TARGET_USER}@web01")],
        None,
    );
    let denied = wait_for(Duration::from_secs(5), || {
        let out = run_ssh(w.ssh().arg("true"));
        out.stderr_str().contains("access denied")
    });
    assert!(
        denied,
        "the relay did not resync with psm-control\n{}",
        w.psm.logs()
    );
}

fn relay_hwm_kib(w: &World) -> u64 {
    w.psm
        .relay_pids()
        .into_iter()
        .filter_map(vm_hwm_kib)
        .max()
        .expect("relay pid")
}

/// A reader that takes 64 KiB every 5 ms (about 12 MiB/s) and hashes what it read.
const SLOW_SHA: &str = "import hashlib,sys,time\nh=hashlib.sha256()\nwhile True:\n b=sys.stdin.buffer.read(65536)\n if not b: break\n h.update(b)\n time.sleep(0.005)\nprint(h.hexdigest())";

#[test]
fn slow_readers_slow_the_writer_without_loss_or_unbounded_memory() {
    const MIB: u64 = 96;
    // what the relay may grow by while the transfers run: its windows, queues, the durable
    // window, and what its workers set up on their first bytes (about 31 MiB, measured), well
    // under the 96 MiB a relay that buffered the file would take
    const GROWTH_LIMIT_KIB: u64 = 56 * 1024;
    let w = World::new();
    let before = relay_hwm_kib(&w);
    let file = w.psm.work_dir().join("slow.bin");
    random_file(&file, MIB << 20);
    let sha = sha256_file(&file);
    let limit = Duration::from_secs(120);

    // download to a slow local reader: the target is faster than the user
    let remote = w.sshd.scratch().join("slow.bin");
    std::fs::copy(&file, &remote).expect("stage the file on the target");
    make_world_readable(&remote);
    let mut ssh = w
        .ssh()
        .arg(format!("cat {}", remote.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let slow = Command::new("python3")
        .args(["-c", SLOW_SHA])
        .stdin(ssh.stdout.take().expect("stdout"))
        .output_with_timeout(limit);
    assert_eq!(wait_child(&mut ssh, T).map(|s| s.code()), Some(Some(0)));
    assert_eq!(
        slow.trim(),
        sha,
        "download through a slow reader lost or changed bytes"
    );

    // upload to a slow reader on the target: the user is faster than the target
    let out = run_cmd(
        w.ssh().arg(format!("python3 -c '{SLOW_SHA}'")),
        Some(&std::fs::read(&file).expect("read file")),
        limit,
    );
    assert_eq!(out.stdout_str().trim(), sha, "{}", out.describe());

    let hwm = relay_hwm_kib(&w);
    eprintln!("relay peak memory {before} KiB before, {hwm} KiB after");
    assert!(
        hwm < before + GROWTH_LIMIT_KIB,
        "relay peak memory {before} KiB before, {hwm} KiB after {MIB} MiB through slow readers: buffering is not bounded"
    );
}

fn make_world_readable(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

trait OutputWithTimeout {
    fn output_with_timeout(&mut self, limit: Duration) -> String;
}

impl OutputWithTimeout for Command {
    fn output_with_timeout(&mut self, limit: Duration) -> String {
        let mut child = self.stdout(Stdio::piped()).spawn().expect("spawn");
        let mut stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        if wait_child(&mut child, limit).is_none() {
            let _ = child.kill();
            panic!("command did not finish within {limit:?}");
        }
        reader.join().unwrap_or_default()
    }
}

#[test]
fn every_shell_command_and_subsystem_request_is_audited() {
    let w = World::new();
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo audited-$((40+2))"));
    assert_eq!(out.stdout_str(), "audited-42\n", "{}", out.describe());
    let req = w
        .psm
        .wait_audit_after(mark, "channel_request for the exec", T, |e| {
            is(e, "channel_request")
        });
    assert_eq!(jstr(&req, "request"), "exec", "{req}");
    assert_eq!(jstr(&req, "command"), "echo audited-$((40+2))", "{req}");
    assert_eq!(req["accepted"], true, "{req}");
    assert_eq!(jstr(&req, "user"), "alice", "{req}");
}

#[test]
fn stopping_the_relay_closes_sessions_with_a_message_and_accounts_for_them() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let w = World::with_mode(PsmMode::Separate);
    let (child, sid) = long_session(&w);
    for pid in w.psm.relay_pids() {
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM relay");
    }
    let out = child.wait_with_output().expect("ssh output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the gateway is shutting down"),
        "stderr: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("MUST-NOT-APPEAR"));
    let end = ended_session(&w, &sid);
    assert_eq!(jstr(&end, "reason"), "gateway shutting down", "{end}");
}

#[test]
fn a_second_relay_cannot_silently_share_the_port() {
    let w = World::new();
    let other = tempfile::tempdir().expect("tempdir");
    let out = run_cmd(
        Command::new(bin("psm-relay"))
            .arg("--data-dir")
            .arg(other.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", w.psm.port()))
            .env("RUST_LOG", "error"),
        None,
        T,
    );
    assert!(
        !out.success(),
        "a second relay started on a busy port\n{}",
        out.describe()
    );
    assert!(
        out.stderr_str().contains("cannot listen on"),
        "{}",
        out.describe()
    );
    w.wait_session_works(&alice_login(), T);
}

#[test]
fn a_restarted_control_still_lists_the_running_sessions() {
    let mut w = World::with_mode(PsmMode::Separate);
    let mark = w.psm.audit_mark();
    let mut child = w
        .ssh()
        .args(["sleep 30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let sid = started_session(&w, mark);
    w.psm.kill_control();
    w.psm.start_control();
    let listed = wait_for(Duration::from_secs(5), || {
        let out = w.psm.psmctl(&["sessions", "list", "--json"], None);
        json_objects(&out.stdout_str())
            .iter()
            .any(|s| jstr(s, "session_id") == sid)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        listed,
        "session {sid} missing from sessions list after control restarted"
    );
}
