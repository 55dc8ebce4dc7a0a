//! Recording is mandatory: with psm-recorder gone, new sessions are refused with a clear message
//! while the relay keeps serving, and they work again once the recorder is back; only a grant
//! that says `--unrecorded` runs without it. Under `psm up`
//! the launcher brings a killed recorder back by itself.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use psm_tests::*;
use std::io::Read;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const UNAVAILABLE: &str = "psm: session recording is unavailable; try again later";

#[test]
fn sessions_fail_closed_while_the_recorder_is_down() {
    let mut w = World::with_mode(PsmMode::Separate);
    w.psm.kill_recorder();
    w.psm.wait_recorder_link(false);

    for attempt in 0..2 {
        let mark = w.psm.audit_mark();
        let out = run_ssh(w.ssh().arg("echo must-not-run"));
        let line = assert_refused(&out, UNAVAILABLE);
        assert_eq!(line, UNAVAILABLE, "attempt {attempt}: {}", out.describe());
        assert!(
            out.stdout.is_empty(),
            "attempt {attempt}: an unrecorded session ran\n{}",
            out.describe()
        );
        let started: Vec<_> = w
            .psm
            .audit()
            .into_iter()
            .skip(mark)
            .filter(|e| jstr(e, "event") == "session_start")
            .collect();
        assert!(
            started.is_empty(),
            "a session started without the recorder: {started:?}"
        );
    }
    w.psm.wait_audit(
        "session_denied while the recorder is down",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_denied" && !jstr(e, "reason").is_empty(),
    );
    // the relay is still up and still authenticates
    assert!(port_open(w.psm.port()), "relay stopped listening");
    let out = run_ssh(
        w.ssh_as(&alice_login(), &w.psm.work_dir().join("nokey"))
            .arg("true"),
    );
    assert_eq!(out.code(), Some(255), "{}", out.describe());

    w.psm.start_recorder();
    w.wait_session_works(&alice_login(), Duration::from_secs(10));
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo recorded-again"));
    assert_eq!(out.stdout_str(), "recorded-again\n", "{}", out.describe());
    let end = w.psm.wait_audit_after(
        mark,
        "session_end after the recorder came back",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_end",
    );
    let rec = jstr(&end, "recording_id").to_string();
    let out = w.psm.psmctl_ok(&["recordings", "list", "--json"], None);
    assert!(
        json_objects(&out)
            .iter()
            .any(|r| r.get("id").and_then(|v| v.as_str()) == Some(rec.as_str())),
        "recording {rec} not listed after the recorder restart:\n{out}"
    );
}

/// A grant that says `--unrecorded` is the one way around mandatory recording: its sessions run
/// and are audited as unrecorded, leave no recording, and still run with the recorder gone,
/// while everyone else's are refused.
#[test]
fn an_unrecorded_grant_runs_without_a_recording_even_with_the_recorder_down() {
    let mut w = World::with_mode(PsmMode::Separate);
    let bob_key = w.add_user_with_key("bob");
    let acct = format!("{TARGET_USER}@web01");
    w.psm
        .psmctl_ok(&["grant", "add", "bob", &acct, "--unrecorded"], None);
    let grants = w.psm.psmctl_ok(&["grant", "list"], None);
    assert!(
        grants
            .lines()
            .any(|l| l.contains("bob") && l.contains("unrecorded")),
        "grant list does not show bob's grant as unrecorded:\n{grants}"
    );
    let bob = format!("bob@{TARGET_USER}@web01");
    // the grant reaches the relay within a second; wait for it, and for its tries to end
    assert!(
        wait_for(Duration::from_secs(10), || {
            run_ssh(w.ssh_as(&bob, &bob_key).arg("true")).code() == Some(0)
        }),
        "bob's grant did not reach the relay"
    );
    assert!(wait_for(Duration::from_secs(10), || {
        w.psm.audit_of("session_end").len() >= w.psm.audit_of("session_start").len()
    }));

    let run_bob = |w: &World, word: &str| -> serde_json::Value {
        let mark = w.psm.audit_mark();
        let out = run_ssh(w.ssh_as(&bob, &bob_key).arg(format!("echo {word}")));
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        assert_eq!(out.stdout_str(), format!("{word}\n"), "{}", out.describe());
        let start =
            w.psm
                .wait_audit_after(mark, "bob's session_start", Duration::from_secs(5), |e| {
                    jstr(e, "event") == "session_start" && jstr(e, "user") == "bob"
                });
        assert_eq!(
            start.get("recorded"),
            Some(&serde_json::Value::Bool(false)),
            "session_start does not say unrecorded: {start}"
        );
        w.psm
            .wait_audit_after(mark, "bob's session_end", Duration::from_secs(5), |e| {
                jstr(e, "event") == "session_end" && jstr(e, "user") == "bob"
            })
    };

    // recorder up: no recording for bob, one for alice
    let end = run_bob(&w, "unrecorded-ok");
    let bob_rec = jstr(&end, "recording_id").to_string();
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("echo recorded-ok"));
    assert_eq!(out.stdout_str(), "recorded-ok\n", "{}", out.describe());
    let alice_start =
        w.psm
            .wait_audit_after(mark, "alice's session_start", Duration::from_secs(5), |e| {
                jstr(e, "event") == "session_start" && jstr(e, "user") == "alice"
            });
    assert!(
        alice_start.get("recorded").is_none(),
        "a recorded session_start carries no `recorded` field: {alice_start}"
    );
    let alice_rec = jstr(&alice_start, "recording_id").to_string();
    let listed = |w: &World, id: &str| {
        let out = w.psm.psmctl_ok(&["recordings", "list", "--json"], None);
        json_objects(&out)
            .iter()
            .any(|r| r.get("id").and_then(|v| v.as_str()) == Some(id))
    };
    assert!(
        wait_for(Duration::from_secs(5), || listed(&w, &alice_rec)),
        "alice's recording {alice_rec} is not listed"
    );
    assert!(
        !listed(&w, &bob_rec),
        "bob's unrecorded session was recorded"
    );
    let file = w
        .psm
        .data_dir()
        .join("recordings")
        .join(format!("{bob_rec}.psmrec"));
    assert!(!file.exists(), "{} exists", file.display());

    // a live unrecorded session: listed as such, and there is nothing to watch
    let mut held = w.ssh_as(&bob, &bob_key);
    held.arg("sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut held = held.spawn().expect("ssh");
    let mut row = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(10), || {
            let list = w.psm.psmctl_ok(&["sessions", "list", "--json"], None);
            let v: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
            row = v
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| jstr(s, "user") == "bob")
                .cloned()
                .unwrap_or_default();
            !row.is_null()
        }),
        "bob's live session is not listed"
    );
    assert_eq!(
        row.get("recorded"),
        Some(&serde_json::Value::Bool(false)),
        "{row}"
    );
    let id = jstr(&row, "session_id").to_string();
    let table = w.psm.psmctl_ok(&["sessions", "list"], None);
    let line = table.lines().find(|l| l.contains(&id)).unwrap_or_default();
    assert!(line.contains("(unrecorded)"), "{table}");
    let watch = w.psm.psmctl(&["sessions", "watch", &id], None);
    assert!(
        !watch.success() && watch.stderr_str().contains("is not recorded"),
        "{}",
        watch.describe()
    );
    w.psm.psmctl_ok(&["sessions", "kill", &id], None);
    assert!(
        wait_child(&mut held, Duration::from_secs(10)).is_some(),
        "the killed session's ssh did not end"
    );

    // recorder down: bob's sessions still run, alice's are refused
    w.psm.kill_recorder();
    w.psm.wait_recorder_link(false);
    run_bob(&w, "still-unrecorded-ok");
    let out = run_ssh(w.ssh().arg("echo must-not-run"));
    assert_eq!(assert_refused(&out, UNAVAILABLE), UNAVAILABLE);
    assert!(out.stdout.is_empty(), "{}", out.describe());
    w.assert_all_sessions_ended();
}

#[test]
fn psm_up_restarts_a_killed_recorder() {
    let w = World::new();
    let needle = w.psm.data_dir().display().to_string();
    let before = pids_matching(&needle, Some("psm-recorder"));
    assert_eq!(
        before.len(),
        1,
        "expected one psm-recorder under psm up, found {before:?}"
    );
    let _ = kill(Pid::from_raw(before[0] as i32), Signal::SIGKILL);
    let back = wait_for(Duration::from_secs(20), || {
        let now = pids_matching(&needle, Some("psm-recorder"));
        !now.is_empty() && now != before
    });
    assert!(
        back,
        "psm up did not restart psm-recorder within 20 s\n{}",
        w.psm.logs()
    );
    w.wait_session_works(&alice_login(), Duration::from_secs(20));
}

/// Output bytes recorded for a session (every DATA record toward the user), read up to where
/// the file ends (a recording cut by a killed recorder ends early).
fn recorded_output(w: &World, recording_id: &str) -> u64 {
    let (data, _) = w.psm.recorded_data(recording_id);
    data.iter()
        .filter(|(d, _)| *d != psm_recorder_format::Direction::Input)
        .map(|(_, n)| *n as u64)
        .sum()
}

/// `ssh … COMMAND` in the background, its output counted on a thread as it arrives.
fn streaming(
    w: &World,
    command: &str,
) -> (
    std::process::Child,
    Arc<AtomicU64>,
    std::thread::JoinHandle<()>,
) {
    let mut child = w
        .ssh()
        .arg(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let (received, reader) = count_output(&mut child);
    (child, received, reader)
}

/// Reads a child's stdout on a thread, counting the bytes.
fn count_output(child: &mut std::process::Child) -> (Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let received = Arc::new(AtomicU64::new(0));
    let mut stdout = child.stdout.take().expect("stdout");
    let counter = received.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            counter.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    (received, reader)
}

#[test]
fn a_recorder_killed_mid_stream_leaves_every_byte_the_user_saw_accounted_for() {
    let mut w = World::with_mode(PsmMode::Separate);
    // the normal case: everything relayed was confirmed durable
    let mark = w.psm.audit_mark();
    let out = run_ssh(w.ssh().arg("seq 1 20000"));
    assert!(out.success(), "{}", out.describe());
    // (the end of the harness's own readiness session may land after the mark)
    let got = out.stdout.len() as u64;
    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the seq session",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "session_end" && e["bytes_down"].as_u64() >= Some(got),
    );
    assert_eq!(end["unconfirmed_bytes"].as_u64(), Some(0), "{end}");
    assert_eq!(
        recorded_output(&w, jstr(&end, "recording_id")),
        got,
        "the recording holds every byte the user got"
    );

    // a stream of digits for several seconds; the recorder is killed once 256 KiB came through
    let mark = w.psm.audit_mark();
    let (mut child, received, reader) = streaming(
        &w,
        "for i in $(seq 0 999); do seq $((i*1000)) $((i*1000+999)); sleep 0.01; done",
    );
    assert!(
        wait_for(Duration::from_secs(20), || received.load(Ordering::SeqCst)
            >= 256 * 1024),
        "the stream did not start"
    );
    w.psm.kill_recorder();
    let status = wait_child(&mut child, Duration::from_secs(20)).expect("ssh ends");
    let _ = reader.join();
    assert!(!status.success(), "the session must end with its recording");
    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the cut session",
        Duration::from_secs(10),
        |e| jstr(e, "event") == "session_end" && jstr(e, "side") == "recorder",
    );
    assert_eq!(jstr(&end, "side"), "recorder", "{end}");
    let user_got = received.load(Ordering::SeqCst);
    let unconfirmed = end["unconfirmed_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("session_end must say what was not confirmed: {end}"));
    let recorded = recorded_output(&w, jstr(&end, "recording_id"));
    assert!(
        recorded + unconfirmed >= user_got,
        "recorded {recorded} + unconfirmed {unconfirmed} < {user_got} bytes the user received"
    );
    // the bound: no more than the durable window ran ahead of the recording
    assert!(
        unconfirmed <= (1 << 20) + 64 * 1024,
        "unconfirmed {unconfirmed} exceeds the 1 MiB window"
    );
    assert!(
        user_got < 3_500_000,
        "the session went on after its recorder died ({user_got} of about 6.9 MB)"
    );
}

/// A psm-recorder stuck with its connection open (SIGSTOP) under a flood of tiny packets, with a
/// durable window so large that no session pauses on it: the worker's recording queue fills
/// first, and the sessions waiting for room in it still end, blamed on the recorder, when the
/// link gives up on a psm-recorder that takes nothing (twice the stall limit), instead of
/// hanging.
#[test]
fn a_stalled_recorder_under_a_flood_of_tiny_packets_still_ends_its_session() {
    let metrics = free_port();
    let opts = PsmOpts {
        relay_args: vec![
            "--recorder-stall-secs".into(),
            "3".into(),
            "--durable-window-bytes".into(),
            (1u64 << 30).to_string(),
            "--durable-window-ms".into(),
            "60000".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
        ],
        ..PsmOpts::default()
    };
    let w = World::build_opts(PsmMode::Separate, Sshd::start(), opts);
    let gauge = counters(metrics);
    let mark = w.psm.audit_mark();
    // one byte per write, as fast as perl goes: sshd sends small packets, each a frame
    let (mut child, received, reader) = streaming(&w, "perl -e '$|=1; print \"x\" while 1'");
    assert!(
        wait_for(Duration::from_secs(20), || received.load(Ordering::SeqCst)
            >= 64 << 10),
        "the stream did not start"
    );
    w.psm.signal_recorder(Signal::SIGSTOP);
    let stopped_at = std::time::Instant::now();
    // the relay's memory while its queue is full and the flood goes on: the queue is bounded
    // and the session waits for room in it, so the relay takes in no more than it holds
    let relay = w.psm.relay_pids()[0];
    let rss_at_stop = vm_rss_kib(relay);
    let sampler = RssSampler::start(relay);
    let status = wait_child(&mut child, Duration::from_secs(30));
    let took = stopped_at.elapsed();
    let rss_most = sampler.most();
    w.psm.signal_recorder(Signal::SIGCONT);
    if status.is_none() {
        let _ = child.kill();
    }
    // (0.04–0.6 MiB here; this flood brings about 2 MB/s of payload, so a relay that kept
    // taking it in through the 6 s stall would hold over 11 MB more, frames not counted)
    assert!(
        rss_most <= rss_at_stop + 4 * 1024,
        "the relay grew from {rss_at_stop} to {rss_most} KiB while its queue was full"
    );
    let status = status.expect("the session must end while psm-recorder is stuck");
    let _ = reader.join();
    assert!(!status.success(), "the session must end with its recording");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(20),
        "ended {took:?} after the stall (the link's limit 6 s)"
    );
    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the flooded session",
        Duration::from_secs(10),
        |e| jstr(e, "event") == "session_end" && jstr(e, "side") == "recorder",
    );
    assert!(jstr(&end, "reason").contains("recording"), "{end}");
    // the wait for room in the full queue was a pause, and it is over
    assert!(
        gauge("psm_relay_recording_pauses_total") >= 1.0,
        "the full queue's wait is not counted as a pause"
    );
    assert_eq!(gauge("psm_relay_recording_paused"), 0.0);
}

/// The largest resident size of a process, sampled every 50 ms from `start` to `most`.
struct RssSampler {
    ended: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = ended.clone();
        let thread = std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::SeqCst) {
                most = most.max(vm_rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            most
        });
        RssSampler { ended, thread }
    }

    /// Stops sampling; the largest size seen, in KiB.
    fn most(self) -> u64 {
        self.ended.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler")
    }
}

/// The relay's counters named `name`, summed over workers, read from its metrics port.
fn counters(port: u16) -> impl Fn(&str) -> f64 {
    move |name: &str| relay_counter(port, name)
}

/// A psm-recorder that stops answering (SIGSTOP, not dead: its socket stays open) pauses its
/// sessions instead of letting the relay buffer: the user stops getting data within the
/// durable window, the relay's counters show the pause, and once the stall limit has passed the
/// session ends, blamed on the recorder.
#[test]
fn a_stalled_recorder_pauses_its_sessions_then_ends_them() {
    let metrics = free_port();
    let opts = PsmOpts {
        relay_args: vec![
            "--recorder-stall-secs".into(),
            "4".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
        ],
        ..PsmOpts::default()
    };
    let w = World::build_opts(PsmMode::Separate, Sshd::start(), opts);
    let gauge = counters(metrics);
    let mark = w.psm.audit_mark();
    let (mut child, received, reader) =
        streaming(&w, "yes psm-stalled-recorder-line | head -c 500000000");
    assert!(
        wait_for(Duration::from_secs(20), || received.load(Ordering::SeqCst)
            >= 1 << 20),
        "the stream did not start"
    );
    w.psm.signal_recorder(Signal::SIGSTOP);
    let stopped_at = std::time::Instant::now();
    // paused: the counters say so, and the user gets at most about one window more
    assert!(
        wait_for(Duration::from_secs(3), || gauge(
            "psm_relay_recording_paused"
        ) >= 1.0),
        "no paused session in the counters"
    );
    assert!(gauge("psm_relay_recording_pauses_total") >= 1.0);
    // and the recording lags: its oldest unconfirmed byte ages
    assert!(
        wait_for(Duration::from_secs(3), || gauge(
            "psm_relay_recording_lag_seconds"
        ) >= 1.0),
        "no recording lag in the counters"
    );
    assert!(
        gauge("psm_relay_recording_worker_lag_seconds") >= 1.0,
        "no recording lag in the session's worker's counters"
    );
    // what the relay hands on toward the user from here to the end (bytes already in sockets
    // and SSH windows on the way still arrive) stays within the durable window
    let relayed = || gauge("psm_relay_bytes_down_total");
    let at_pause = relayed();
    // and the relay does not take in what it cannot relay: its memory stays put while the
    // target keeps offering data (`yes` writes hundreds of MB a second) until the session ends
    let relay = w.psm.relay_pids()[0];
    let rss_at_pause = vm_rss_kib(relay);
    let sampler = RssSampler::start(relay);
    // then the stall limit ends the session, blamed on the recorder
    let status = wait_child(&mut child, Duration::from_secs(20)).expect("ssh ends");
    let took = stopped_at.elapsed();
    let rss_most = sampler.most();
    assert!(
        rss_most <= rss_at_pause + 16 * 1024,
        "the relay grew from {rss_at_pause} to {rss_most} KiB while its session was paused"
    );
    w.psm.signal_recorder(Signal::SIGCONT);
    let _ = reader.join();
    assert!(!status.success(), "the session must end with its recording");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "ended {took:?} after the stall (limit 4 s)"
    );
    let end = w.psm.wait_audit_after(
        mark,
        "session_end of the stalled session",
        Duration::from_secs(10),
        |e| jstr(e, "event") == "session_end" && jstr(e, "side") == "recorder",
    );
    assert!(jstr(&end, "reason").contains("stalled recorder"), "{end}");
    let after = relayed() - at_pause;
    assert!(
        after <= f64::from((1 << 20) + (256 << 10)),
        "{after} bytes relayed after the session paused"
    );
    assert!(gauge("psm_relay_recording_stalls_total") >= 1.0);
    assert_eq!(gauge("psm_relay_recording_paused"), 0.0);
}
