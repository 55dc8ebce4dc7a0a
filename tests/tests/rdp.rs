//! RDP through psm, end to end with the real FreeRDP 2 client under Xvfb: psm authenticates
//! alice with NLA, checks the same policy as for SSH, logs in to xrdp (TLS security: the Client
//! Info carries the vaulted password) or to freerdp-shadow (NLA: CredSSP with the vaulted
//! account), relays, records, exports and ends sessions. Every refusal is checked in the audit
//! log, and the relay keeps serving after each.

use std::time::{Duration, Instant};

use psm_tests::*;

const TYPED: &str = "psm-rdp-typed-4711";

/// The client ends with a logon failure (a non-zero exit) and the audit log has the first
/// `session_denied` after `mark`, with `code`; returns that event.
fn logon_failure(w: &RdpWorld, mark: usize, c: &mut FreeRdp, code: &str) -> serde_json::Value {
    let exit = c.wait(Duration::from_secs(60));
    assert!(
        matches!(exit, Some(c) if c != 0),
        "exit {exit:?}\n{}",
        c.log()
    );
    let e = w
        .psm
        .wait_audit_after(mark, code, Duration::from_secs(10), |e| {
            jstr(e, "event") == "session_denied"
        });
    assert_eq!(jstr(&e, "reason_code"), code, "{e}");
    e
}

fn end_of(w: &RdpWorld, id: &str, timeout: Duration) -> serde_json::Value {
    w.psm.wait_audit("session_end", timeout, |e| {
        jstr(e, "event") == "session_end" && jstr(e, "session_id") == id
    })
}

/// xrdp: the vaulted account logs in (xrdp's log names it), the client's screen shows the
/// target's desktop, typed text is recorded, and the recording exports to PNG frames that show
/// what the client showed, to a video ffprobe reads and to text with what was typed.
#[test]
fn xrdp_session_with_the_vaulted_account_is_recorded_and_exported() {
    let w = RdpWorld::xrdp();
    let RdpTarget::Xrdp(xrdp) = &w.target else {
        unreachable!()
    };
    let mark = w.psm.audit_mark();
    let mut client = w.client(&[]);
    assert!(
        xrdp.wait_login(XRDP_USER, Duration::from_secs(40)),
        "xrdp did not log the vaulted account in; xrdp log:\n{}\nclient:\n{}\n{}",
        xrdp.log(),
        client.log(),
        w.psm.logs()
    );
    let start = w.wait_start(mark);
    assert_eq!(jstr(&start, "user"), "alice");
    assert!(
        client.wait_screen(Duration::from_secs(30), shows_xlogo),
        "the client's screen never showed the target's desktop; client:\n{}",
        client.log()
    );
    // the clipboard is refused by default, and the refusal is audited
    w.psm
        .wait_audit("cliprdr refused", Duration::from_secs(10), |e| {
            jstr(e, "event") == "rdp_channel" && jstr(e, "channel") == "cliprdr"
        });
    // what alice types is recorded as text
    let moved = run_cmd(
        std::process::Command::new("xdotool")
            .args(["mousemove", "512", "384"])
            .env("DISPLAY", client.display().display()),
        None,
        CMD_TIMEOUT,
    );
    assert!(moved.success(), "{}", moved.describe());
    let typed = client.type_text(TYPED);
    assert!(typed.success(), "{}", typed.describe());
    client.key("Return");
    let id = jstr(&start, "session_id").to_string();
    let recording = jstr(&start, "recording_id").to_string();
    // the typed text reaches the recording while the session runs (export reads it live)
    let search_ok = wait_for(Duration::from_secs(20), || {
        w.psm
            .psmctl(
                &["recordings", "export", &recording, "--format", "text"],
                None,
            )
            .stdout_str()
            .contains(TYPED)
    });
    assert!(search_ok, "the typed text never reached the recording");
    let (cw, ch) = client.display().size();
    let shot = client.display().screenshot();
    assert!(client.running(), "client:\n{}", client.log());
    drop(client);
    let end = end_of(&w, &id, Duration::from_secs(15));
    assert_eq!(jstr(&end, "side"), "client", "{end}");
    // the vaulted password never reached the user, the recording or the audit log
    let audit = std::fs::read_to_string(w.psm.data_dir().join("audit.jsonl")).expect("audit");
    assert!(!audit.contains(XRDP_PASSWORD));
    // PNG frames: the last one shows what the client's screen showed
    let frames = w.psm.work_dir().join("frames");
    w.psm.psmctl_ok(
        &[
            "recordings",
            "export",
            &recording,
            "--format",
            "png",
            "--every",
            "1s",
            "-o",
            &frames.display().to_string(),
        ],
        None,
    );
    let mut pngs: Vec<_> = std::fs::read_dir(&frames)
        .expect("frames dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    pngs.sort();
    let last = pngs.last().expect("at least one PNG frame");
    let (fw, fh, pixels) = decode_image(last);
    assert_eq!((fw, fh), (cw, ch), "frame size vs the client's screen");
    let diff = pixel_difference((fw, fh, &pixels), (cw, ch, &shot), 24);
    assert!(
        diff < 0.02,
        "last frame differs from the client's screen in {:.1}% of pixels",
        diff * 100.0
    );
    // text: what was typed, with its time
    let text = w.psm.psmctl_ok(
        &["recordings", "export", &recording, "--format", "text"],
        None,
    );
    assert!(text.contains(TYPED), "{text}");
    // search covers RDP sessions
    let found = w.psm.psmctl_ok(&["recordings", "search", TYPED], None);
    assert!(found.contains(&recording), "{found}");
    // video a browser plays
    let video = w.psm.work_dir().join("session.webm");
    w.psm.psmctl_ok(
        &[
            "recordings",
            "export",
            &recording,
            "--format",
            "video",
            "-o",
            &video.display().to_string(),
        ],
        None,
    );
    let probe = run_cmd(
        std::process::Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "stream=codec_name,width,height",
            ])
            .args(["-of", "csv=p=0"])
            .arg(&video),
        None,
        CMD_TIMEOUT,
    );
    assert!(probe.success(), "{}", probe.describe());
    assert!(
        probe.stdout_str().contains("vp9,1024,768"),
        "{}",
        probe.describe()
    );
    // play replays terminals and says what to use instead
    let play = w.psm.psmctl(&["recordings", "play", &recording], None);
    assert!(
        !play.success() && play.stderr_str().contains("is an RDP session"),
        "{}",
        play.describe()
    );
    // the recording verifies
    w.psm.psmctl_ok(&["recordings", "verify", &recording], None);
}

/// freerdp-shadow with NLA: CredSSP toward the target with the vaulted account works end to
/// end, and the client sees the shadowed display.
#[test]
fn shadow_session_injects_the_vaulted_account_through_credssp() {
    let w = RdpWorld::shadow();
    let RdpTarget::Shadow(shadow) = &w.target else {
        unreachable!()
    };
    let mark = w.psm.audit_mark();
    let mut client = w.client(&[]);
    let start = w.wait_start(mark);
    assert!(
        client.wait_screen(Duration::from_secs(30), shows_xlogo),
        "the client's screen never showed the shadowed display; client:\n{}\nshadow:\n{}\n{}",
        client.log(),
        shadow.log(),
        w.psm.logs()
    );
    let target = shadow.display().screenshot();
    let shot = client.display().screenshot();
    let diff = pixel_difference((1024, 768, &shot), (1024, 768, &target), 24);
    assert!(
        diff < 0.05,
        "client and target screens differ in {:.1}% of pixels",
        diff * 100.0
    );
    assert!(client.running());
    drop(client);
    end_of(&w, jstr(&start, "session_id"), Duration::from_secs(15));
}

/// Wrong psm password, no grant, a closed time window, a target certificate that changed and a
/// target that is down: each refused as a logon failure with its audit event, and the relay
/// keeps serving.
#[test]
fn refusals_are_logon_failures_with_the_reason_audited() {
    let w = RdpWorld::shadow();
    let (_, address, _, _) = w.target_facts();
    let auth_only = ["/auth-only"];
    // wrong password
    let mark = w.psm.audit_mark();
    let mut c = w.client_as(&w.login(), "not-alices-password", &auth_only);
    let code = c.wait(Duration::from_secs(60));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}\n{}",
        c.log()
    );
    w.psm
        .wait_audit_after(mark, "auth_failure", Duration::from_secs(10), |e| {
            jstr(e, "event") == "auth_failure" && jstr(e, "login").starts_with("alice")
        });
    // no grant: bob has a password but no grant
    w.psm.psmctl_ok(
        &["user", "add", "bob", "--password-stdin"],
        Some("bob-Secret-77\n"),
    );
    w.psm.wait_policy_applied();
    let denied = |login: &str, password: &str, code: &str| {
        let mark = w.psm.audit_mark();
        let mut c = w.client_as(login, password, &auth_only);
        logon_failure(&w, mark, &mut c, code)
    };
    denied(&format!("bob@{}", w.account()), "bob-Secret-77", "no_grant");
    // a time window that is closed now (one hour, twelve hours away)
    let hour = (jiff_hour() + 12) % 24;
    let window = format!("{hour:02}:00-{:02}:00", (hour + 1) % 24);
    w.regrant(&["--days", "all", "--hours", &window, "--tz", "UTC"]);
    denied(&w.login(), ALICE_PASSWORD, "outside_window");
    w.regrant(&[]);
    // the target's certificate changed: pin another fingerprint
    let acct = w.account();
    w.psm.psmctl_ok(&["grant", "remove", "alice", &acct], None);
    w.psm.psmctl_ok(&["target", "remove", "shadow01"], None);
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "shadow01",
            "--protocol",
            "rdp",
            "--address",
            &address,
            "--cert-fingerprint",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        ],
        None,
    );
    w.psm.psmctl_ok(
        &["account", "add", &acct, "--password-stdin"],
        Some(&format!("{SHADOW_PASSWORD}\n")),
    );
    w.psm.psmctl_ok(&["grant", "add", "alice", &acct], None);
    w.psm.wait_policy_applied();
    let e = denied(&w.login(), ALICE_PASSWORD, "host_key_mismatch");
    assert_eq!(jstr(&e, "side"), "target", "{e}");
    // the target is down
    let down = free_port();
    w.psm.psmctl_ok(&["grant", "remove", "alice", &acct], None);
    w.psm.psmctl_ok(&["target", "remove", "shadow01"], None);
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "shadow01",
            "--protocol",
            "rdp",
            "--address",
            &format!("127.0.0.1:{down}"),
            "--cert-fingerprint",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        ],
        None,
    );
    w.psm.psmctl_ok(
        &["account", "add", &acct, "--password-stdin"],
        Some(&format!("{SHADOW_PASSWORD}\n")),
    );
    w.psm.psmctl_ok(&["grant", "add", "alice", &acct], None);
    w.psm.wait_policy_applied();
    let mark = w.psm.audit_mark();
    let mut c = w.client_as(&w.login(), ALICE_PASSWORD, &auth_only);
    let exit = c.wait(Duration::from_secs(60));
    assert!(matches!(exit, Some(c) if c != 0), "exit {exit:?}");
    let e = w
        .psm
        .wait_audit_after(mark, "target down", Duration::from_secs(10), |e| {
            jstr(e, "event") == "session_denied"
        });
    assert_eq!(jstr(&e, "side"), "target", "{e}");
    // the relay still serves: put the real target back and log in
    w.psm.psmctl_ok(&["grant", "remove", "alice", &acct], None);
    w.psm.psmctl_ok(&["target", "remove", "shadow01"], None);
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "shadow01",
            "--protocol",
            "rdp",
            "--address",
            &address,
            "--scan",
        ],
        None,
    );
    w.psm.psmctl_ok(
        &["account", "add", &acct, "--password-stdin"],
        Some(&format!("{SHADOW_PASSWORD}\n")),
    );
    w.psm.psmctl_ok(&["grant", "add", "alice", &acct], None);
    w.psm.wait_policy_applied();
    let mark = w.psm.audit_mark();
    let client = w.client(&[]);
    w.wait_start(mark);
    assert!(client.wait_screen(Duration::from_secs(30), shows_xlogo));
}

fn jiff_hour() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (secs / 3600) % 24
}

/// `psmctl sessions kill` ends an RDP session within one second; a maximum duration ends one.
#[test]
fn kill_and_maximum_duration_end_rdp_sessions() {
    let w = RdpWorld::shadow();
    let mark = w.psm.audit_mark();
    let mut client = w.client(&[]);
    let start = w.wait_start(mark);
    let id = jstr(&start, "session_id").to_string();
    assert!(client.wait_screen(Duration::from_secs(30), shows_xlogo));
    let before = psm_control_api::now_ms();
    w.psm
        .psmctl_ok(&["sessions", "kill", &id, "--reason", "incident 7"], None);
    let end = end_of(&w, &id, Duration::from_secs(10));
    let took = end["end_ms"]
        .as_u64()
        .unwrap_or(u64::MAX)
        .saturating_sub(before);
    assert!(took < 1000, "kill took {took} ms: {end}");
    assert_eq!(
        (jstr(&end, "reason_code"), jstr(&end, "side")),
        ("operator_kill", "operator")
    );
    // the client was told why (Set Error Info: an administrative disconnect), and says so
    // in its exit status (xfreerdp: 1, "disconnected by the server")
    let exit = client.wait(Duration::from_secs(20));
    assert_eq!(exit, Some(1), "{}", client.log());
    assert!(
        client.log().contains("ERRINFO_RPC_INITIATED_DISCONNECT"),
        "{}",
        client.log()
    );
    w.regrant(&["--max-duration", "3s"]);
    let mark = w.psm.audit_mark();
    let t = Instant::now();
    let mut client = w.client(&[]);
    let start = w.wait_start(mark);
    let end = end_of(&w, jstr(&start, "session_id"), Duration::from_secs(20));
    assert_eq!(
        (jstr(&end, "reason_code"), jstr(&end, "side")),
        ("max_duration", "policy")
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    // "the active session limit timer on the server has elapsed" (xfreerdp exits 4)
    let exit = client.wait(Duration::from_secs(20));
    assert_eq!(exit, Some(4), "{}", client.log());
    assert!(
        client.log().contains("ERRINFO_LOGON_TIMEOUT"),
        "{}",
        client.log()
    );
}

/// A grant that needs a reason takes it from the domain field (refused without one); a grant
/// that needs an approval holds the client's NLA until an approver decides over SSH.
#[test]
fn reason_and_approval_hold_the_rdp_login() {
    let w = RdpWorld::shadow();
    let auth_only = ["/auth-only"];
    w.regrant(&["--reason-required"]);
    // no reason: refused, the client's side at fault
    let mark = w.psm.audit_mark();
    let mut c = w.client(&auth_only);
    let e = logon_failure(&w, mark, &mut c, "reason_missing");
    assert_eq!(jstr(&e, "side"), "client", "{e}");
    assert_eq!(jstr(&e, "protocol"), "rdp", "{e}");
    assert!(jstr(&e, "client_message").contains("domain field"), "{e}");
    // the reason in the domain field reaches session_start and session_end
    let mark = w.psm.audit_mark();
    let mut c = w.client(&["/d:CHG-42 disk full"]);
    let start = w.wait_start(mark);
    assert_eq!(jstr(&start, "justification"), "CHG-42 disk full", "{start}");
    assert_eq!(jstr(&start, "protocol"), "rdp", "{start}");
    assert!(c.wait_screen(Duration::from_secs(30), shows_xlogo));
    let id = jstr(&start, "session_id").to_string();
    w.psm.psmctl_ok(&["sessions", "kill", &id], None);
    let end = end_of(&w, &id, Duration::from_secs(10));
    assert_eq!(jstr(&end, "justification"), "CHG-42 disk full", "{end}");
    assert_eq!(jstr(&end, "protocol"), "rdp", "{end}");
    c.wait(Duration::from_secs(20));
    // dual control: bob approves over SSH while alice's client waits in NLA
    let bob = w.psm.work_dir().join("bob_ed25519");
    gen_key(&bob);
    w.psm.psmctl_ok(
        &[
            "user",
            "add",
            "bob",
            "--ssh-key",
            &pub_path(&bob).display().to_string(),
        ],
        None,
    );
    w.psm.psmctl_ok(&["group", "add", "secops"], None);
    w.psm
        .psmctl_ok(&["group", "member", "add", "secops", "bob"], None);
    w.regrant(&[
        "--approval",
        "1",
        "--approvers",
        "@secops",
        "--approval-timeout",
        "60s",
    ]);
    let vote = |verb: &str, id: &str| {
        let out = run_ssh(
            w.psm
                .ssh_with_key(&[], "bob", &bob)
                .arg(format!("requests {verb} {id}")),
        );
        assert!(out.success(), "{}", out.describe());
    };
    let requested = |mark: usize| w.psm.approval_requested(mark);
    let mark = w.psm.audit_mark();
    let mut c = w.client(&[]);
    let id = requested(mark);
    // held in NLA, not refused
    assert!(c.running(), "{}", c.log());
    vote("approve", &id);
    let start = w.wait_start(mark);
    assert!(c.wait_screen(Duration::from_secs(30), shows_xlogo));
    let sid = jstr(&start, "session_id").to_string();
    w.psm.psmctl_ok(&["sessions", "kill", &sid], None);
    c.wait(Duration::from_secs(20));
    // denied: a logon failure, audited with the approver
    let mark = w.psm.audit_mark();
    let mut c = w.client(&auth_only);
    let id = requested(mark);
    vote("deny", &id);
    let e = logon_failure(&w, mark, &mut c, "approval_denied");
    assert_eq!(jstr(&e, "side"), "policy", "{e}");
    assert!(jstr(&e, "client_message").contains("denied by bob"), "{e}");
}
