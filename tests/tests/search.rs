//! Search and review: psm-recorder indexes what was typed and shown as it writes; `psmctl
//! recordings search` finds a typed command (a real pty shell) and a screen text across
//! several recordings, with --user/--target/--since/--until and --regex; `recordings reindex`
//! rebuilds a deleted index; `recordings play --from/--idle-limit/--speed` replays without a
//! terminal.

use psm_tests::*;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn search(w: &World, args: &[&str]) -> Vec<String> {
    let mut a = vec!["recordings", "search"];
    a.extend_from_slice(args);
    w.psm
        .psmctl_ok(&a, None)
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_hits(w: &World, args: &[&str], n: usize) -> Vec<String> {
    let mut last = Vec::new();
    let ok = wait_for(T, || {
        let out = w
            .psm
            .psmctl(&[&["recordings", "search"][..], args].concat(), None);
        last = out.stdout_str().lines().map(str::to_string).collect();
        out.success() && last.len() >= n
    });
    assert!(ok, "search {args:?}: wanted {n} hit(s), got {last:#?}");
    last
}

#[test]
fn search_finds_typed_commands_and_screen_text_with_filters() {
    let w = World::new();
    let acct = format!("{TARGET_USER}@web01");
    let bob_key = w.add_user_with_key("bob");
    w.psm.psmctl_ok(&["grant", "add", "bob", &acct], None);
    w.psm.wait_policy_applied();

    // a typed command in a real pty shell: the typed line and its output are indexed
    let mut cmd = w.ssh();
    cmd.arg("-tt");
    let mut pty = PtySession::spawn(&cmd, &[("TERM", "xterm")], 24, 80);
    pty.send_line("echo \"NEEDLE\"\"-typed-7\"");
    pty.expect("NEEDLE-typed-7", T);
    pty.send_line("exit");
    assert_eq!(pty.wait(T), Some(0));

    // a screen text in two more recordings, one of them bob's
    let out = run_ssh(w.ssh().arg("echo \"SCREEN\"\"-MARK-42\""));
    assert!(out.success(), "{}", out.describe());
    let bob_login = format!("bob@{acct}");
    let out = run_ssh(
        w.ssh_as(&bob_login, &bob_key)
            .arg("echo \"SCREEN\"\"-MARK-42\""),
    );
    assert!(out.success(), "{}", out.describe());

    let typed = wait_hits(&w, &["NEEDLE\"\"-typed"], 1);
    assert!(
        typed
            .iter()
            .any(|l| l.contains(" typed ") && l.contains("alice")),
        "the typed command: {typed:#?}"
    );
    let shown = wait_hits(&w, &["needle-TYPED-7"], 1);
    assert!(shown.iter().any(|l| l.contains(" screen ")), "{shown:#?}");

    let both = wait_hits(&w, &["SCREEN-MARK-42"], 2);
    let ids: std::collections::BTreeSet<&str> = both
        .iter()
        .filter(|l| l.contains(" screen "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ids.len(), 2, "two recordings show it: {both:#?}");
    assert!(both.iter().all(|l| l.contains("@web01")), "{both:#?}");

    let bob = search(&w, &["SCREEN-MARK-42", "--user", "bob"]);
    assert!(
        !bob.is_empty() && bob.iter().all(|l| l.contains("  bob  ")),
        "{bob:#?}"
    );
    let alice = search(&w, &["SCREEN-MARK-42", "--user", "alice"]);
    assert!(
        !alice.is_empty() && alice.iter().all(|l| l.contains("  alice  ")),
        "{alice:#?}"
    );
    assert_eq!(
        search(&w, &["SCREEN-MARK-42", "--target", &acct]).len(),
        both.len()
    );
    assert!(search(&w, &["SCREEN-MARK-42", "--target", "nosuch"]).is_empty());
    assert!(search(&w, &["SCREEN-MARK-42", "--since", "2999-01-01"]).is_empty());
    assert_eq!(
        search(&w, &["SCREEN-MARK-42", "--since", "2000-01-01"]).len(),
        both.len()
    );
    assert!(search(&w, &["SCREEN-MARK-42", "--until", "2000-01-01"]).is_empty());
    let re = search(&w, &["--regex", r"SCREEN-MARK-\d{2}$", "--user", "bob"]);
    assert!(
        !re.is_empty() && re.iter().all(|l| l.contains("  bob  ")),
        "{re:#?}"
    );
    assert!(search(&w, &["--regex", r"SCREEN-MARK-\d{3}"]).is_empty());

    // the index is derived: deleted, search says so; reindex rebuilds it from the files
    let index = w.psm.data_dir().join("recordings").join("index.db");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", index.display()));
    }
    let out = w
        .psm
        .psmctl(&["recordings", "search", "SCREEN-MARK-42"], None);
    assert!(!out.success(), "{}", out.describe());
    assert!(out.describe().contains("reindex"), "{}", out.describe());
    let re = w.psm.psmctl_ok(&["recordings", "reindex"], None);
    assert!(
        re.contains("indexed ") && re.contains("; 0 could not be read"),
        "{re}"
    );
    assert_eq!(search(&w, &["SCREEN-MARK-42"]).len(), both.len());
    assert_eq!(search(&w, &["NEEDLE\"\"-typed"]).len(), typed.len());
}

#[test]
fn play_from_idle_limit_and_speed_without_a_terminal() {
    let w = World::new();
    let out = run_ssh(
        w.ssh()
            .arg("echo \"FIR\"\"ST\"; sleep 3; echo \"SEC\"\"OND\""),
    );
    assert!(out.success(), "{}", out.describe());
    let hits = wait_hits(&w, &["SECOND"], 1);
    let id = hits[0].split_whitespace().next().expect("id").to_string();

    // the 3 s gap is capped at 0.1 s
    let t0 = Instant::now();
    let o = w
        .psm
        .psmctl_ok(&["recordings", "play", &id, "--idle-limit", "0.1"], None);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(o.contains("FIRST") && o.contains("SECOND"), "{o}");

    // kept whole but at 20x
    let t0 = Instant::now();
    let o = w.psm.psmctl_ok(
        &[
            "recordings",
            "play",
            &id,
            "--idle-limit",
            "10",
            "--speed",
            "20",
        ],
        None,
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(o.contains("SECOND"), "{o}");

    // from past the end: the screen is rebuilt at once, nothing waits
    let t0 = Instant::now();
    let o = w.psm.psmctl_ok(
        &[
            "recordings",
            "play",
            &id,
            "--from",
            "1h",
            "--idle-limit",
            "10",
        ],
        None,
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(o.contains("FIRST") && o.contains("SECOND"), "{o}");

    let bad = w
        .psm
        .psmctl(&["recordings", "play", &id, "--from", "soon"], None);
    assert!(!bad.success(), "{}", bad.describe());
}

#[test]
fn a_damaged_index_stops_no_recording_and_reindex_rebuilds_it() {
    let w = World::new();
    let index = w.psm.data_dir().join("recordings").join("index.db");
    wait_for(T, || index.exists());
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", index.display()));
    }
    std::fs::write(&index, vec![0x5a; 8192]).expect("damage the index");

    let out = run_ssh(w.ssh().arg("echo \"DAMAGED\"\"-INDEX-OK\""));
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout_str().contains("DAMAGED-INDEX-OK"));
    let v = w.psm.psmctl(&["recordings", "verify", "--all"], None);
    assert!(v.success(), "{}", v.describe());

    let s = w
        .psm
        .psmctl(&["recordings", "search", "DAMAGED-INDEX"], None);
    assert!(!s.success(), "{}", s.describe());
    assert!(s.describe().contains("reindex"), "{}", s.describe());

    let re = w.psm.psmctl_ok(&["recordings", "reindex"], None);
    assert!(
        re.contains("unusable") && re.contains("; 0 could not be read"),
        "{re}"
    );
    wait_hits(&w, &["DAMAGED-INDEX-OK"], 1);

    // psm-recorder follows the rebuilt file: the next session is indexed as it is written
    let out = run_ssh(w.ssh().arg("echo \"AFTER\"\"-REINDEX\""));
    assert!(out.success(), "{}", out.describe());
    wait_hits(&w, &["AFTER-REINDEX"], 1);
}
