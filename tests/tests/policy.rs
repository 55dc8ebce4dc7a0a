//! Policy changes through psmctl while psm runs: a removed grant stops new sessions within one
//! second, adding it back lets them in again within one second, `grant list --json` follows, and
//! `target add --scan` pins the target's real host key.

use psm_tests::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const PROPAGATION: Duration = Duration::from_secs(1);

fn has_alice_grant(w: &World) -> bool {
    let out = w.psm.psmctl(&["grant", "list", "--json"], None);
    assert!(out.success(), "{}", out.describe());
    json_objects(&out.stdout_str()).iter().any(|g| {
        let s = g.to_string();
        s.contains("\"alice\"") && s.contains(TARGET_USER) && s.contains("web01")
    })
}

/// Tries sessions until one gives the wanted outcome; returns when (after `since`) the first such
/// attempt started. Panics if an attempt starting later than `PROPAGATION` still has the old
/// outcome.
fn first_attempt_with(w: &World, since: Instant, want_allowed: bool) -> Duration {
    let mut attempts = Vec::new();
    loop {
        let started = since.elapsed();
        let out = run_ssh(w.ssh().arg("echo allowed"));
        let allowed = out.success() && out.stdout_str() == "allowed\n";
        let denied = out.code() == Some(255)
            && out
                .stderr_str()
                .contains("psm: access denied: you have no grant for");
        assert!(
            allowed || denied,
            "neither allowed nor denied with the expected message:\n{}",
            out.describe()
        );
        attempts.push(format!(
            "{:.3}s {}",
            started.as_secs_f64(),
            if allowed { "allowed" } else { "denied" }
        ));
        if allowed == want_allowed {
            return started;
        }
        assert!(
            started <= PROPAGATION,
            "policy change not in effect {:.3} s after psmctl returned (attempts: {attempts:?})\n{}",
            started.as_secs_f64(),
            out.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn grant_remove_and_add_reach_the_relay_within_a_second() {
    let w = World::new();
    assert!(
        has_alice_grant(&w),
        "grant list --json should show alice's grant"
    );

    let mark = w.psm.audit_mark();
    w.psm.psmctl_ok(
        &["grant", "remove", "alice", &format!("{TARGET_USER}@web01")],
        None,
    );
    let removed = Instant::now();
    let t = first_attempt_with(&w, removed, false);
    eprintln!(
        "grant remove effective for an attempt started {:.3} s after psmctl returned",
        t.as_secs_f64()
    );
    assert!(
        !has_alice_grant(&w),
        "grant list --json still shows the removed grant"
    );
    // and it stays removed
    let out = run_ssh(w.ssh().arg("echo allowed"));
    assert_refused(
        &out,
        &format!("psm: access denied: you have no grant for {TARGET_USER}@web01"),
    );
    w.psm.wait_audit_after(
        mark,
        "admin_change for grant remove",
        Duration::from_secs(5),
        |e| jstr(e, "event") == "admin_change" && jstr(e, "action") == "grant remove",
    );

    w.psm.psmctl_ok(
        &["grant", "add", "alice", &format!("{TARGET_USER}@web01")],
        None,
    );
    let added = Instant::now();
    let t = first_attempt_with(&w, added, true);
    eprintln!(
        "grant add effective for an attempt started {:.3} s after psmctl returned",
        t.as_secs_f64()
    );
    assert!(
        has_alice_grant(&w),
        "grant list --json does not show the re-added grant"
    );

    // audit tail --json parses (array or one object per line) and holds events
    let out = w.psm.psmctl(&["audit", "tail", "-n", "5", "--json"], None);
    assert!(out.success(), "{}", out.describe());
    let events: Vec<Value> = json_objects(&out.stdout_str());
    assert!(
        !events.is_empty() && events.len() <= 5,
        "audit tail -n 5 --json:\n{}",
        out.describe()
    );
    assert!(
        events.iter().all(|e| e.get("event").is_some()),
        "audit tail events need `event`:\n{}",
        out.describe()
    );
}

#[test]
fn target_add_scan_pins_the_sshd_host_key() {
    let w = World::new();
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "web09",
            "--address",
            &w.sshd.address(),
            "--scan",
        ],
        None,
    );
    let out = w.psm.psmctl_ok(&["target", "list", "--json"], None);
    let targets = json_objects(&out);
    let web09 = targets
        .iter()
        .find(|t| t.to_string().contains("\"web09\""))
        .unwrap_or_else(|| panic!("web09 not in target list --json:\n{out}"));
    let text = web09.to_string();
    let b64 = w
        .sshd
        .host_key()
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let fp = fingerprint(&w.sshd.host_key_pub_path());
    assert!(
        text.contains(&b64) || text.contains(&fp),
        "web09 should pin the sshd's key {} ({fp}); listed: {text}",
        w.sshd.host_key()
    );
    // the wrong key must not be what is pinned: a session through web09 works
    let acct = format!("{TARGET_USER}@web09");
    w.psm.psmctl_ok(
        &["account", "add", &acct, "--password-stdin"],
        Some(&format!("{TARGET_PASSWORD}\n")),
    );
    w.psm.psmctl_ok(&["grant", "add", "alice", &acct], None);
    w.wait_session_works(&format!("alice@{acct}"), Duration::from_secs(5));

    // scanning a closed port fails cleanly
    let closed = free_port();
    let out = w.psm.psmctl(
        &[
            "target",
            "add",
            "web10",
            "--address",
            &format!("127.0.0.1:{closed}"),
            "--scan",
        ],
        None,
    );
    assert!(
        !out.success(),
        "--scan of a closed port must fail\n{}",
        out.describe()
    );
}
