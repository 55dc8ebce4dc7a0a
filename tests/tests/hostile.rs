//! psm between parties who may be compromised (issue #11): malicious targets written with
//! asyncssh's server API (`tests/py/hostile_target.py`), malicious clients written with asyncssh
//! (`tests/py/hostile_client.py`), and OpenSSH used the way Ansible uses it. Every flood is
//! bounded in count and time; after every test no session is listed and every `session_start`
//! has its `session_end`.

use psm_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn is(e: &Value, event: &str) -> bool {
    jstr(e, "event") == event
}

fn notices_of(w: &World, kind: &str) -> Vec<Value> {
    w.psm
        .audit_of("notice")
        .into_iter()
        .filter(|e| jstr(e, "kind") == kind)
        .collect()
}

fn py(script: &str) -> Command {
    let mut c = Command::new(python3());
    c.arg(format!("{}/py/{script}", env!("CARGO_MANIFEST_DIR")));
    c
}

/// The value of `key=` in a `result key=value …` line.
fn result_field(out: &str, key: &str) -> String {
    out.lines()
        .filter(|l| l.starts_with("result"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// OpenSSH as automation uses it
// ---------------------------------------------------------------------------------------------

/// An OpenSSH ControlMaster (`ssh -M -N -S SOCK`, as Ansible's ControlPersist keeps one),
/// once its socket is there.
fn control_master(w: &World, sock: &Path) -> Child {
    let master = w
        .ssh()
        .arg("-M")
        .arg("-N")
        .arg("-S")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh -M");
    assert!(
        wait_for(Duration::from_secs(15), || sock.exists()),
        "the master is up"
    );
    master
}

/// Ends a ControlMaster started by [`control_master`].
fn stop_master(w: &World, sock: &Path, master: &mut Child) {
    let mut stop = w.ssh();
    stop.arg("-S").arg(sock).arg("-O").arg("exit");
    let _ = run_ssh(&mut stop);
    let _ = wait_child(master, Duration::from_secs(10));
}

#[test]
fn control_master_runs_thirty_commands_on_one_connection() {
    let w = World::new();
    let sock = w.psm.work_dir().join("cm.sock");
    let mark = w.psm.audit_mark();
    // the master, as Ansible's ControlPersist keeps one: a long-lived `ssh -M -N`
    let mut master = control_master(&w, &sock);
    for i in 0..30 {
        let mut c = w.ssh();
        c.arg("-S").arg(&sock).arg("-o").arg("ControlMaster=no");
        let out = run_ssh(c.arg(format!("echo cmd-{i}; exit {}", i % 3)));
        assert!(
            out.code() == Some(i % 3) && out.stdout_str().contains(&format!("cmd-{i}")),
            "command {i} through the master:\n{}",
            out.describe()
        );
    }
    assert!(
        matches!(master.try_wait(), Ok(None)),
        "the master still runs"
    );
    let auths = w
        .psm
        .audit()
        .into_iter()
        .skip(mark)
        .filter(|e| is(e, "auth_success"))
        .count();
    assert_eq!(auths, 1, "all 30 commands shared one connection");
    stop_master(&w, &sock, &mut master);
    w.assert_all_sessions_ended();
}

/// A connection held open while its login was refused (alice had no grant) gets no step of the
/// login for free once a grant covers her: the grant that applies later wants a reason, so a
/// channel on the held connection is refused, naming the step, and audited; a new login is
/// asked for the reason.
#[test]
fn a_held_connection_gets_no_login_step_of_a_later_grant_for_free() {
    let w = World::new();
    let acct = format!("{TARGET_USER}@web01");
    w.psm.psmctl_ok(&["grant", "remove", "alice", &acct], None);
    w.psm.wait_policy_applied();
    let sock = w.psm.work_dir().join("held.sock");
    // accepted without a grant: told why on the first channel
    let mut master = control_master(&w, &sock);
    let mark = w.psm.audit_mark();
    w.psm
        .psmctl_ok(&["grant", "add", "alice", &acct, "--reason-required"], None);
    w.psm.wait_policy_applied();
    let mut c = w.ssh();
    c.arg("-S").arg(&sock).arg("-o").arg("ControlMaster=no");
    let out = run_ssh(c.arg("echo must-not-run"));
    assert!(!out.success(), "{}", out.describe());
    assert!(
        !out.stdout_str().contains("must-not-run"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr_str().contains("needs a reason at login"),
        "{}",
        out.describe()
    );
    let denied = w
        .psm
        .wait_audit_after(mark, "the channel refused", Duration::from_secs(5), |e| {
            is(e, "session_denied") && jstr(e, "reason_code") == "login_step_missing"
        });
    assert_eq!(jstr(&denied, "side"), "policy", "{denied}");
    stop_master(&w, &sock, &mut master);
}

#[test]
fn environment_variables_beyond_lang_and_lc_are_refused_and_their_names_audited() {
    let w = World::new();
    let out = run_ssh(
        w.ssh()
            .arg("-o")
            .arg("SetEnv=LD_PRELOAD=/tmp/evil.so BASH_ENV=/tmp/evil.sh LANG=C.UTF-8 LC_TIME=C")
            .arg("echo \"[$LD_PRELOAD|$BASH_ENV|$LANG|$LC_TIME]\""),
    );
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout_str().contains("[||C.UTF-8|C]"),
        "only LANG and LC_* reach the target:\n{}",
        out.describe()
    );
    w.assert_all_sessions_ended();
    let refused = notices_of(&w, "environment variable refused");
    let text: String = refused.iter().map(|e| jstr(e, "message")).collect();
    assert!(text.contains("LD_PRELOAD"), "{refused:?}");
    assert!(
        refused
            .iter()
            .any(|e| e["count"] == 2 && jstr(e, "message").contains("BASH_ENV")),
        "the summary counts both names: {refused:?}"
    );
    assert!(!text.contains("/tmp/evil"), "values are never audited");
}

#[test]
fn a_grant_may_let_more_environment_variables_through() {
    let w = World::new();
    let login = format!("alice@{TARGET_USER}@web01");
    let env = |w: &World| {
        run_ssh(
            w.ssh_as(&login, &w.alice_key)
                .arg("-o")
                .arg("SetEnv=TZ=UTC LD_PRELOAD=/tmp/evil.so")
                .arg("echo \"[$TZ|$LD_PRELOAD]\""),
        )
    };
    let out = env(&w);
    assert!(out.stdout_str().contains("[|]"), "{}", out.describe());
    w.psm.psmctl_ok(
        &["grant", "remove", "alice", &format!("{TARGET_USER}@web01")],
        None,
    );
    let bad = w.psm.psmctl(
        &[
            "grant",
            "add",
            "alice",
            &format!("{TARGET_USER}@web01"),
            "--allow-env",
            "TZ;rm",
        ],
        None,
    );
    assert!(
        !bad.success()
            && bad
                .stderr_str()
                .contains("invalid environment variable name")
    );
    w.psm.psmctl_ok(
        &[
            "grant",
            "add",
            "alice",
            &format!("{TARGET_USER}@web01"),
            "--allow-env",
            "TZ",
        ],
        None,
    );
    let list = w.psm.psmctl_ok(&["grant", "list"], None);
    assert!(
        list.contains("CONDITIONS") && list.contains("env TZ"),
        "{list}"
    );
    let out = env(&w);
    assert!(
        out.stdout_str().contains("[UTC|]"),
        "TZ is granted, LD_PRELOAD still refused:\n{}",
        out.describe()
    );
    w.assert_all_sessions_ended();
}

#[test]
fn repeated_forwarding_refusals_are_aggregated() {
    let w = World::new();
    let mut c = w.ssh();
    c.arg("-o").arg("ExitOnForwardFailure=no");
    for i in 0..50 {
        c.arg("-R").arg(format!("{}:127.0.0.1:9", 20000 + i));
    }
    let mark = w.psm.audit_mark();
    let out = run_ssh(c.arg("echo fwd-done"));
    assert!(out.stdout_str().contains("fwd-done"), "{}", out.describe());
    w.assert_all_sessions_ended();
    let fwd: Vec<Value> = w
        .psm
        .audit()
        .into_iter()
        .skip(mark)
        .filter(|e| is(e, "notice") && jstr(e, "kind") == "remote port forwarding refused")
        .collect();
    assert_eq!(fwd.len(), 2, "the first and one summary: {fwd:?}");
    assert_eq!(fwd[1]["count"], 50, "{fwd:?}");
}

// ---------------------------------------------------------------------------------------------
// malicious targets
// ---------------------------------------------------------------------------------------------

/// A hostile SSH server playing one misbehaviour, registered in psm as target `evil`.
struct HostileTarget {
    child: Child,
    port: u16,
    host_key: String,
}

impl HostileTarget {
    fn start(dir: &Path, mode: &str, extra: &[&str]) -> HostileTarget {
        let key = dir.join(format!("evil_{mode}_key"));
        let host_key = gen_key(&key);
        let port_file = dir.join(format!("evil_{mode}.port"));
        let _ = std::fs::remove_file(&port_file);
        let log = std::fs::File::create(dir.join(format!("evil_{mode}.log"))).expect("log");
        let child = py("hostile_target.py")
            .arg("--port-file")
            .arg(&port_file)
            .arg("--host-key")
            .arg(&key)
            .args(["--user", TARGET_USER, "--password", TARGET_PASSWORD])
            .args(["--mode", mode, "--max-seconds", "90"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("hostile target");
        let mut port = 0;
        assert!(
            wait_for(Duration::from_secs(20), || {
                port = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                port != 0
            }),
            "hostile target ({mode}) did not start"
        );
        HostileTarget {
            child,
            port,
            host_key,
        }
    }

    /// Adds it to psm as target `evil` with an account and alice's grant.
    fn register(&self, w: &World) {
        w.psm.psmctl_ok(
            &[
                "target",
                "add",
                "evil",
                "--address",
                &format!("127.0.0.1:{}", self.port),
                "--host-key",
                &self.host_key,
            ],
            None,
        );
        w.psm.psmctl_ok(
            &[
                "account",
                "add",
                &format!("{TARGET_USER}@evil"),
                "--password-stdin",
            ],
            Some(&format!("{TARGET_PASSWORD}\n")),
        );
        w.psm.psmctl_ok(
            &["grant", "add", "alice", &format!("{TARGET_USER}@evil")],
            None,
        );
    }

    fn stdout(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            use std::io::Read as _;
            let _ = o.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for HostileTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn evil_login() -> String {
    format!("alice@{TARGET_USER}@evil")
}

fn work(w: &World) -> PathBuf {
    w.psm.work_dir()
}

#[test]
fn a_target_flooding_exit_signals_cannot_grow_relay_memory() {
    let w = World::new();
    let evil = HostileTarget::start(&work(&w), "exit-signal-flood", &["--count", "8000"]);
    evil.register(&w);
    let relay = w.psm.relay_pids()[0];
    let before = vm_rss_kib(relay);
    // the user reads nothing for a while: the relay must hold the flood in bounded memory
    let mut ssh = w
        .ssh_as(&evil_login(), &w.alice_key)
        .arg("flood")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let mut peak = before;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        peak = peak.max(vm_rss_kib(relay));
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = wait_child(&mut ssh, T);
    assert!(status.is_some(), "the session ends");
    assert!(
        peak < before + 64 * 1024,
        "relay RSS {before} KiB before, peak {peak} KiB during 8000 exit-signals of 240 KB"
    );
    let repeated = notices_of(&w, "repeated exit status from the target");
    assert!(!repeated.is_empty(), "the repeats are noted");
    let ends = w.psm.audit_of("session_end");
    assert!(
        ends.iter()
            .any(|e| jstr(e, "target") == "evil" && jstr(e, "exit_signal") == "TERM"),
        "the first exit-signal is kept: {ends:?}"
    );
    w.assert_all_sessions_ended();
}

#[test]
fn channels_a_target_opens_unasked_are_refused_and_audited_with_counts() {
    let w = World::new();
    let mut evil = HostileTarget::start(&work(&w), "unasked-channels", &["--count", "200"]);
    evil.register(&w);
    let out = run_ssh(w.ssh_as(&evil_login(), &w.alice_key).arg("go"));
    assert!(out.stdout_str().contains("done"), "{}", out.describe());
    w.assert_all_sessions_ended();
    let _ = wait_child(&mut evil.child, Duration::from_secs(30));
    let report = evil.stdout();
    assert!(
        report.contains("accepted=0"),
        "no channel accepted: {report}"
    );
    for kind in [
        "session",
        "direct-tcpip",
        "forwarded-tcpip",
        "x11",
        "auth-agent",
    ] {
        let n = notices_of(&w, kind);
        assert!(
            n.iter().any(|e| e["count"].as_u64() == Some(200)),
            "{kind}: one summary with the count of 200: {n:?}"
        );
        assert!(n.len() <= 2, "{kind}: aggregated, not {} events", n.len());
    }
}

#[test]
fn a_target_that_resets_the_connection_is_reported_as_closing_it() {
    let w = World::new();
    let evil = HostileTarget::start(&work(&w), "rst-after-output", &[]);
    evil.register(&w);
    let out = run_ssh(w.ssh_as(&evil_login(), &w.alice_key).arg("go"));
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(
        out.stderr_str()
            .contains("psm: the target closed the connection"),
        "{}",
        out.describe()
    );
    let end = w
        .psm
        .wait_audit("session_end of the reset session", T, |e| {
            is(e, "session_end") && jstr(e, "target") == "evil"
        });
    assert!(
        jstr(&end, "reason").starts_with("target closed the connection"),
        "{end}"
    );
    w.assert_all_sessions_ended();
}

#[test]
fn a_target_that_sends_an_oversized_packet_is_reported_as_breaking_the_protocol() {
    let w = World::new();
    let evil = HostileTarget::start(&work(&w), "oversized-packet", &[]);
    evil.register(&w);
    let out = run_ssh(w.ssh_as(&evil_login(), &w.alice_key).arg("go"));
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    let end = w
        .psm
        .wait_audit("session_end of the oversized session", T, |e| {
            is(e, "session_end") && jstr(e, "target") == "evil"
        });
    assert_ne!(jstr(&end, "reason"), "target ended the session", "{end}");
    assert_eq!(jstr(&end, "side"), "target", "{end}");
    w.assert_all_sessions_ended();
}

// ---------------------------------------------------------------------------------------------
// malicious clients
// ---------------------------------------------------------------------------------------------

fn hostile_client(w: &World, mode: &str, extra: &[&str]) -> String {
    let out = run_cmd(
        py("hostile_client.py")
            .args(["--port", &w.psm.port().to_string()])
            .args(["--user", &alice_login(), "--key"])
            .arg(&w.alice_key)
            .args(["--mode", mode, "--max-seconds", "60"])
            .args(extra),
        None,
        Duration::from_secs(90),
    );
    assert!(
        out.success(),
        "hostile client ({mode}) failed:\n{}",
        out.describe()
    );
    out.stdout_str()
}

#[test]
fn requests_before_exec_are_answered_or_refused_within_a_second() {
    let w = World::new();
    // a handful more than OpenSSH sends: answered, and only LANG/LC_* reach the target
    let out = hostile_client(&w, "env-before-exec", &["--count", "50"]);
    assert_eq!(result_field(&out, "answered"), "1", "{out}");
    assert!(result_field(&out, "output").contains("env-ok"), "{out}");
    // 200 of them, or 200 data messages and 200 window changes: refused at once
    for (mode, what) in [
        ("env-before-exec", "env requests"),
        ("pre-start-data", "data and window-change messages"),
    ] {
        let out = hostile_client(&w, mode, &["--count", "200"]);
        let answered = result_field(&out, "answered") == "1";
        let refused = result_field(&out, "disconnected") == "1";
        assert!(answered || refused, "{what}: {out}");
        let secs: f64 = result_field(&out, "seconds").parse().expect("seconds");
        assert!(secs < 1.0, "{what}: answered or refused in {secs} s: {out}");
    }
    w.assert_all_sessions_ended();
    let violations: Vec<Value> = w
        .psm
        .audit_of("session_end")
        .into_iter()
        .filter(|e| jstr(e, "reason_code") == "client_violation")
        .collect();
    assert_eq!(
        violations.len(),
        2,
        "both floods end their sessions as violations"
    );
    assert!(
        jstr(&violations[0], "reason").contains("requests on channel"),
        "{violations:?}"
    );
    assert_eq!(
        notices_of(&w, "client protocol violation").len(),
        2,
        "and are audited"
    );
}

#[test]
fn channels_closed_before_their_request_leave_no_target_connection() {
    let w = World::new();
    // the readiness sessions' target logins are gone first
    let mut baseline = usize::MAX;
    wait_for(Duration::from_secs(10), || {
        let now = w.sshd.session_pids().len();
        let settled = now == baseline;
        baseline = now;
        settled
    });
    // each session channel gets its own target login when it opens; closed before any
    // request, the login must go with it, while the user's connection stays
    let mut client = py("hostile_client.py")
        .args(["--port", &w.psm.port().to_string()])
        .args(["--user", &alice_login(), "--key"])
        .arg(&w.alice_key)
        .args([
            "--mode",
            "open-close-channels",
            "--count",
            "12",
            "--max-seconds",
            "60",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("hostile client");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("result line");
    assert!(line.contains("opened=12 disconnected=0"), "{line}");
    let mut now = 0;
    let released = wait_for(Duration::from_secs(10), || {
        now = w.sshd.session_pids().len();
        now <= baseline
    });
    let _ = client.kill();
    let _ = client.wait();
    assert!(
        released,
        "{now} sshd processes for target logins, {baseline} before 12 channels came and went"
    );
    w.assert_all_sessions_ended();
}

#[test]
fn a_client_that_ignores_its_window_is_disconnected_and_memory_returns() {
    let w = World::new();
    let relay = w.psm.relay_pids()[0];
    let before = vm_rss_kib(relay);
    let out = hostile_client(&w, "window-ignore", &["--count", "64"]);
    assert_eq!(result_field(&out, "disconnected"), "1", "{out}");
    let end = w.psm.wait_audit("session_end of the violator", T, |e| {
        is(e, "session_end") && jstr(e, "reason_code") == "client_violation"
    });
    assert!(jstr(&end, "reason").contains("SSH window"), "{end}");
    assert!(
        wait_for(T, || vm_rss_kib(relay) < before + 32 * 1024),
        "relay RSS back near {before} KiB: {} KiB",
        vm_rss_kib(relay)
    );
    w.assert_all_sessions_ended();
}

/// The largest data message of each direction in a session's recording.
fn largest_recorded(data: &[(psm_recorder_format::Direction, usize)]) -> (usize, usize) {
    let largest = |input: bool| {
        data.iter()
            .filter(|(d, _)| (*d == psm_recorder_format::Direction::Input) == input)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    };
    (largest(true), largest(false))
}

/// The DATA records (direction, length) of the recording of the session that ended after
/// `mark`, which must read to its end.
fn recorded_after(
    w: &World,
    mark: usize,
    what: &str,
) -> Vec<(psm_recorder_format::Direction, usize)> {
    let end = w
        .psm
        .wait_audit_after(mark, what, T, |e| is(e, "session_end"));
    let (data, error) = w.psm.recorded_data(jstr(&end, "recording_id"));
    assert!(error.is_none(), "the recording reads: {error:?}");
    data
}

/// A key exchange on one leg never stalls the other: a user whose client holds a rekey open for
/// 5 s (its KEXINIT sent, its key exchange message kept back, so psm can send that leg nothing
/// but the key exchange) while the target streams 8 MiB. sshd drops a client that leaves its
/// keepalives, a second apart, unanswered past `ClientAliveCountMax 2`: psm's target leg stays
/// live through the hold (sshd never gives up on it), then every byte reaches the user, in
/// order, with the exit status.
#[test]
fn a_key_exchange_held_open_on_the_user_leg_does_not_stall_the_target_leg() {
    let w = World::build(
        PsmMode::Up,
        Sshd::start_config(
            false,
            "DEBUG",
            "ClientAliveInterval 1\nClientAliveCountMax 2\n",
        ),
    );
    let mark = w.psm.audit_mark();
    let out = hostile_client(&w, "stalled-rekey", &["--count", "8", "--hold", "5"]);
    assert_eq!(result_field(&out, "held"), "1", "{out}");
    let held: f64 = result_field(&out, "hold_seconds").parse().unwrap_or(0.0);
    assert!(
        held >= 4.5,
        "the rekey was held {held} s, not past sshd's 3 s: {out}"
    );
    assert_eq!(result_field(&out, "zeros_ok"), "1", "{out}");
    assert_eq!(result_field(&out, "ticks"), "6", "{out}");
    assert_eq!(result_field(&out, "exit"), "0", "{out}");
    assert_eq!(result_field(&out, "disconnected"), "0", "{out}");
    let log = w.sshd.full_log();
    assert!(
        !log.contains("Timeout, client not responding"),
        "sshd gave up on psm's target leg while the user leg rekeyed:\n{log}"
    );
    // (how many keepalives sshd asked depends on what psm sent it during the hold: one in a
    // clean-clone run on epoll, two here; a target leg that stalled would send nothing at all,
    // and be dropped after three unanswered)
    let end = w
        .psm
        .wait_audit_after(mark, "session_end of the held-rekey session", T, |e| {
            is(e, "session_end")
        });
    assert_eq!(end["exit_status"], 0, "{end}");
    w.assert_all_sessions_ended();
}

/// psm takes channel data in packets of up to 65535 bytes from the user (twice russh's
/// default): fewer packets to decrypt, relay and record per byte. They reach sshd, whose own
/// maximum is 32 KiB, intact, and each is recorded whole.
#[test]
fn a_client_may_send_packets_of_64_kib() {
    let w = World::new();
    let mark = w.psm.audit_mark();
    let out = hostile_client(&w, "large-packets", &["--count", "4"]);
    assert_eq!(result_field(&out, "send_pktsize"), "65535", "{out}");
    assert_eq!(
        result_field(&out, "remote_digest"),
        result_field(&out, "sent_digest"),
        "{out}"
    );
    let data = recorded_after(&w, mark, "session_end of the large-packet session");
    let (input, _) = largest_recorded(&data);
    assert_eq!(input, 65535, "the largest upload message recorded");
    w.assert_all_sessions_ended();
}

/// The same toward the target: psm allows it 65535-byte packets too, relays them to an OpenSSH
/// client (32 KiB at most) intact, and records each whole.
#[test]
fn a_target_may_send_packets_of_64_kib() {
    let w = World::new();
    let evil = HostileTarget::start(&work(&w), "large-packets", &["--count", "4"]);
    evil.register(&w);
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_as(&evil_login(), &w.alice_key).arg("go"));
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let expected = b"0123456789abcdef".repeat(1 << 18);
    assert!(
        out.stdout == expected,
        "{} bytes, not the 4 MiB the target sent",
        out.stdout.len()
    );
    let data = recorded_after(&w, mark, "session_end of the large-packet session");
    let (_, output) = largest_recorded(&data);
    assert_eq!(output, 65535, "the largest download message recorded");
    w.assert_all_sessions_ended();
}

/// A user who sends empty data messages, 100,000 among 64 KiB of real bytes: the target gets
/// the bytes intact (its digest matches), and the recording holds them and no empty message.
#[test]
fn empty_data_messages_from_a_user_carry_nothing_and_are_not_recorded() {
    let w = World::new();
    let mark = w.psm.audit_mark();
    let out = hostile_client(&w, "empty-data", &["--count", "100000"]);
    assert_eq!(result_field(&out, "empties"), "100000", "{out}");
    assert_eq!(
        result_field(&out, "remote_digest"),
        result_field(&out, "sent_digest"),
        "{out}"
    );
    let data = recorded_after(&w, mark, "session_end of the empty-data session");
    assert_eq!(
        data.iter().filter(|(_, n)| *n == 0).count(),
        0,
        "empty messages in the recording"
    );
    let input: usize = data
        .iter()
        .filter(|(d, _)| *d == psm_recorder_format::Direction::Input)
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(input, 64 * 1024, "recorded input bytes");
    w.assert_all_sessions_ended();
}

/// A target that sends empty data messages, 100,000 on stdout and as many on stderr among its
/// lines (they carry no byte and take no window, so nothing in SSH slows them): the user gets
/// every line intact with the exit status, and the recording holds the lines and no empty
/// message.
#[test]
fn empty_data_messages_from_a_target_carry_nothing_and_are_not_recorded() {
    let w = World::new();
    let evil = HostileTarget::start(&work(&w), "empty-data", &["--count", "100000"]);
    evil.register(&w);
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh_as(&evil_login(), &w.alice_key).arg("go"));
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let mut expected: String = (0..100_000)
        .step_by(1000)
        .map(|i| format!("line {i}\n"))
        .collect();
    expected.push_str("done\n");
    assert_eq!(out.stdout_str(), expected, "{}", out.describe());
    let data = recorded_after(&w, mark, "session_end of the empty-data session");
    let empty = data.iter().filter(|(_, n)| *n == 0).count();
    assert_eq!(empty, 0, "empty messages in the recording");
    let output: usize = data
        .iter()
        .filter(|(d, _)| *d != psm_recorder_format::Direction::Input)
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(output, expected.len(), "recorded output bytes");
    w.assert_all_sessions_ended();
}

#[test]
fn pty_sizes_are_clamped_in_the_recording() {
    let w = World::new();
    let out = hostile_client(&w, "pty-extremes", &[]);
    assert!(out.contains("pty-ok"), "{out}");
    w.assert_all_sessions_ended();
    let data = w.psm.data_dir().join("recordings");
    let mut casts = String::new();
    let mut recordings = 0;
    for e in std::fs::read_dir(&data).expect("recordings") {
        let path = e.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("psmrec") {
            continue; // the search index
        }
        recordings += 1;
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .unwrap_or_default();
        let c = w.psm.psmctl_ok(
            &["recordings", "export", &id, "--format", "asciicast"],
            None,
        );
        casts.push_str(&c);
    }
    let header_sizes: Vec<(u64, u64)> = casts
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.is_object())
        .map(|v| {
            (
                v["width"].as_u64().unwrap_or(0),
                v["height"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    // every recording exported, each with its header: the three extreme sizes among them
    assert!(recordings >= 4, "{recordings} recordings");
    assert_eq!(header_sizes.len(), recordings, "{casts}");
    for (wd, ht) in &header_sizes {
        assert!(
            (1..=4096).contains(wd) && (1..=4096).contains(ht),
            "sizes in recordings are clamped: {header_sizes:?}"
        );
    }
}

#[test]
fn a_huge_login_name_is_audited_cut_and_marked() {
    let w = World::new();
    let out = run_cmd(
        py("hostile_client.py")
            .args(["--port", &w.psm.port().to_string()])
            .args(["--user", "x", "--password", "nope"])
            .args([
                "--mode",
                "long-login",
                "--count",
                "200000",
                "--max-seconds",
                "60",
            ]),
        None,
        Duration::from_secs(90),
    );
    assert!(out.success(), "{}", out.describe());
    let f = w.psm.wait_audit("auth_failure of the long login", T, |e| {
        is(e, "auth_failure") && jstr(e, "login").starts_with("aaaa")
    });
    let login = jstr(&f, "login");
    assert!(login.len() < 400, "cut: {} bytes", login.len());
    assert!(login.contains("[truncated, 200000 bytes]"), "{login}");
}

#[test]
fn thousands_of_refused_forwards_make_a_handful_of_audit_events() {
    let w = World::new();
    let mark = w.psm.audit_mark();
    let out = hostile_client(&w, "many-forwards", &["--count", "5000"]);
    assert_eq!(result_field(&out, "direct_refused"), "5000", "{out}");
    assert_eq!(result_field(&out, "tcpip_refused"), "5000", "{out}");
    assert_eq!(result_field(&out, "streamlocal_refused"), "20", "{out}");
    w.assert_all_sessions_ended();
    let notices: Vec<Value> = w
        .psm
        .audit()
        .into_iter()
        .skip(mark)
        // the audit log's own signed checkpoints (every 1000 events) are not about refusals
        .filter(|e| is(e, "notice") && jstr(e, "kind") != "audit checkpoint")
        .collect();
    assert!(
        notices.len() <= 8,
        "{} notices for 10,020 refusals: {notices:?}",
        notices.len()
    );
    let total = |kind: &str| {
        notices
            .iter()
            .filter(|e| jstr(e, "kind") == kind)
            .filter_map(|e| e["count"].as_u64())
            .max()
            .unwrap_or(0)
    };
    assert_eq!(total("port forwarding refused"), 5000, "{notices:?}");
    assert_eq!(total("remote port forwarding refused"), 5000, "{notices:?}");
    assert_eq!(
        total("unix socket forwarding refused"),
        20,
        "streamlocal is audited too"
    );
}

#[test]
fn one_user_cannot_hold_more_than_max_connections_per_user() {
    let w = World::build_opts(
        PsmMode::Up,
        Sshd::start(),
        PsmOpts {
            config: Some("[relay]\nmax_connections_per_user = 2\n".into()),
            ..Default::default()
        },
    );
    let hold = |w: &World| {
        let mark = w.psm.audit_mark();
        let c = w
            .ssh()
            .arg("sleep 20")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh");
        w.psm
            .wait_audit_after(mark, "session_start", T, |e| is(e, "session_start"));
        c
    };
    let mut held = vec![hold(&w), hold(&w)];
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo third"));
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(!out.stdout_str().contains("third"));
    let f = w
        .psm
        .wait_audit_after(mark, "auth_failure of the third", T, |e| {
            is(e, "auth_failure")
        });
    assert!(
        jstr(&f, "reason").contains("max_connections_per_user"),
        "{f}"
    );
    for c in &mut held {
        let _ = c.kill();
        let _ = c.wait();
    }
    // the places are freed: alice gets in again
    w.wait_session_works(&alice_login(), T);
    w.assert_all_sessions_ended();
}

/// Two channels on one connection: a channel whose reader stops (the user's client does not
/// read its output, so its window closes) does not stall the other; once read again it
/// delivers every byte.
#[test]
fn a_stalled_channel_does_not_stall_another_on_the_same_connection() {
    let w = World::new();
    let sock = w.psm.work_dir().join("stall.sock");
    let mut master = control_master(&w, &sock);
    const SIZE: u64 = 64 << 20;
    // channel A: 64 MiB that nobody reads yet
    let mut a = w.ssh();
    a.arg("-S")
        .arg(&sock)
        .arg("-o")
        .arg("ControlMaster=no")
        .arg(format!("head -c {SIZE} /dev/zero"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut a = a.spawn().expect("ssh A");
    // A fills every buffer on its way (pipe, mux, windows) and stops: its session's byte
    // count, as the relay reports it, flows and then stands still
    let down = || {
        w.sessions()
            .iter()
            .filter_map(|s| s["bytes_down"].as_u64())
            .max()
            .unwrap_or(0)
    };
    // (the relay reports every 2 s: unchanged over two reports is standing still)
    let (mut last, mut since) = (0, Instant::now());
    let stalled = wait_for(Duration::from_secs(30), || {
        let now = down();
        if now != last {
            (last, since) = (now, Instant::now());
        }
        now > (1 << 20) && since.elapsed() > Duration::from_millis(4500)
    });
    assert!(stalled, "channel A did not stall (bytes down {last})");
    assert!(
        last < SIZE,
        "channel A finished without a reader ({last} bytes)"
    );
    // channel B: commands answer promptly while A is stalled
    for i in 0..5 {
        let t = Instant::now();
        let mut b = w.ssh();
        b.arg("-S").arg(&sock).arg("-o").arg("ControlMaster=no");
        let out = run_cmd(
            b.arg(format!("echo channel-b-{i}")),
            None,
            Duration::from_secs(10),
        );
        assert!(
            out.success() && out.stdout_str().contains(&format!("channel-b-{i}")),
            "command {i} beside the stalled channel:\n{}",
            out.describe()
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "command {i} took {:?} beside the stalled channel",
            t.elapsed()
        );
    }
    assert!(
        matches!(a.try_wait(), Ok(None)),
        "channel A should still be waiting for its reader"
    );
    // A, read now, delivers all of it
    let mut got = 0u64;
    let mut out = a.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match std::io::Read::read(&mut out, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                assert!(buf[..n].iter().all(|&b| b == 0), "bytes changed");
                got += n as u64;
            }
        }
    }
    let st = wait_child(&mut a, Duration::from_secs(60)).expect("A ends");
    assert!(st.success(), "A: {st:?}");
    assert_eq!(got, SIZE);
    stop_master(&w, &sock, &mut master);
}

/// A session toward a hostile target that writes "stalled" and then reads nothing, with a
/// window far larger than the socket buffers (psm fills them, and its SSH task toward the
/// target blocks writing): the target, the user's ssh (stdin piped, the first line read) and
/// the audit mark before it.
fn stalled_session(w: &World) -> (HostileTarget, Child, usize) {
    let evil = HostileTarget::start(&work(w), "stall", &["--window", "67108864"]);
    evil.register(w);
    let mark = w.psm.audit_mark();
    let mut ssh = w
        .ssh_as(&evil_login(), &w.alice_key)
        .arg("stall")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let mut out = ssh.stdout.take().expect("stdout");
    let mut line = [0u8; 8];
    std::io::Read::read_exact(&mut out, &mut line).expect("the target's first line");
    assert_eq!(&line, b"stalled\n");
    (evil, ssh, mark)
}

#[test]
fn a_target_that_stops_reading_loses_its_connection_when_the_session_ends() {
    let w = World::new();
    // psm's SSH task toward the target blocks writing, where no DISCONNECT can get out
    let (evil, mut ssh, mark) = stalled_session(&w);
    let relay = w.psm.relay_pids()[0];
    // (ssh holds at most psm's window of 2 MiB, so 16 MiB written means psm took 14 of them:
    // at most 4 in its up queue (`UP_LIMIT`), and the socket toward the target holds at most 4
    // to send and a receive buffer that does not grow while the target reads nothing, so about
    // 6 wait in psm's SSH writer, which the full socket blocks. How much more psm's buffers take
    // varies from run to run, 23 to 33 MiB: a bound of 24 failed now and then)
    let mut stdin = ssh.stdin.take().expect("stdin");
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = written.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let chunk = vec![b'x'; 64 * 1024];
        while progress.load(std::sync::atomic::Ordering::Relaxed) < 40 << 20
            && stdin.write_all(&chunk).is_ok()
        {
            progress.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    let sid = w
        .psm
        .wait_audit_after(mark, "session_start toward evil", T, |e| {
            is(e, "session_start") && jstr(e, "target") == "evil"
        })["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        wait_for(T, || written.load(std::sync::atomic::Ordering::Relaxed)
            >= 16 << 20),
        "psm did not take 16 MiB from the user"
    );
    assert_eq!(connections_to(relay, evil.port), 1, "one leg to the target");
    let _ = ssh.kill();
    let _ = ssh.wait();
    let _ = writer.join();
    let end = w.psm.wait_audit("session_end toward evil", T, |e| {
        is(e, "session_end") && jstr(e, "session_id") == sid
    });
    assert!(jstr(&end, "reason").contains("client"), "{end}");
    let ended = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || connections_to(relay, evil.port)
            == 0),
        "psm still holds its connection to the stalled target {:?} after the session ended",
        ended.elapsed()
    );
    eprintln!(
        "the connection was gone {:?} after the session's end",
        ended.elapsed()
    );
    w.assert_all_sessions_ended();
}

/// A target that stops reading its socket while the user still sends: psm's SSH task toward it
/// blocks in a write, where its keepalives never run. The write's stall is watched instead: at
/// the keepalives' own time (here 1 s, one miss: 2 s) the leg is cut and the session ends,
/// blamed on the target, with the user still connected.
#[test]
fn a_target_that_stops_reading_mid_session_ends_it_as_unresponsive() {
    let w = World::build_opts(
        PsmMode::Up,
        Sshd::start(),
        PsmOpts {
            config: Some("[relay]\ntarget_keepalive_secs = 1\ntarget_keepalive_max = 1\n".into()),
            ..Default::default()
        },
    );
    let (evil, mut ssh, mark) = stalled_session(&w);
    let relay = w.psm.relay_pids()[0];
    let mut stdin = ssh.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 40 << 20 && stdin.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        // stdin stays open: the user does not leave
        stdin
    });
    let end = w.psm.wait_audit_after(
        mark,
        "session_end toward evil",
        Duration::from_secs(30),
        |e| is(e, "session_end") && jstr(e, "target") == "evil",
    );
    assert_eq!(jstr(&end, "reason_code"), "target_unresponsive", "{end}");
    assert_eq!(jstr(&end, "side"), "target", "{end}");
    assert!(
        wait_for(Duration::from_secs(10), || connections_to(relay, evil.port)
            == 0),
        "psm still holds its connection to the stalled target"
    );
    let _ = ssh.kill();
    let _ = ssh.wait();
    drop(writer.join());
    w.assert_all_sessions_ended();
}
