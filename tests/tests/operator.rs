//! What an operator is told and can do with psmctl (issue #5, items 7 to 9):
//! - answers that do not mislead: file commands refuse a data directory this uid does not own,
//!   "not running" names the path and `--data-dir`/`PSM_DATA_DIR`, a public key given as a
//!   private key is named, `target add --scan` of an existing name says so before scanning,
//!   `status --json` is the object its help says, `recordings list` and `audit tail` show the
//!   same duration, and an `ssh -tt` recording exports as an 80x24 asciicast;
//! - `admin_change` events name the actor (uid and user name of the psmctl caller);
//! - `target update` (address, host key, scan) keeps accounts and grants, `user passwd`
//!   changes a password, and psm-control refuses passwords shorter than 12 characters.

use psm_tests::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PROPAGATION: Duration = Duration::from_secs(5);

/// `psmctl ARGS` in `cwd`, without `PSM_DATA_DIR` (so the default `./psm-data` applies unless
/// ARGS give `--data-dir`).
fn psmctl_in(cwd: &Path, args: &[&str]) -> CmdOut {
    run_cmd(
        Command::new(bin("psmctl"))
            .args(args)
            .current_dir(cwd)
            .env_remove("PSM_DATA_DIR"),
        None,
        CMD_TIMEOUT,
    )
}

fn assert_fails_with(out: &CmdOut, needle: &str) {
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout\n{}",
        out.describe()
    );
    assert!(
        out.stderr_str().contains(needle),
        "expected {needle:?} on stderr\n{}",
        out.describe()
    );
}

#[test]
fn file_commands_refuse_a_data_directory_this_uid_does_not_own() {
    require_psm_binaries();
    let tmp = tempfile::Builder::new()
        .prefix("psm-owner")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data = tmp.path().join("d");
    fs::create_dir_all(data.join("recordings")).expect("data dir");
    fs::write(data.join("audit.jsonl"), "").expect("audit log");
    let d = data.display().to_string();
    // the owner gets an (empty) answer
    let out = psmctl_in(
        tmp.path(),
        &["--data-dir", &d, "recordings", "list", "--json"],
    );
    assert!(out.success(), "{}", out.describe());
    // Only root can hand the directory to another uid (and root is who would otherwise read
    // it regardless); elsewhere there is nothing to test.
    assert_eq!(
        fs::metadata(&data).expect("meta").uid(),
        0,
        "this test hands the directory to another uid: run the suite as root (scripts/test.sh does)"
    );
    std::os::unix::fs::chown(&data, Some(12345), None).expect("chown");
    let want = format!(
        "psmctl: permission denied: uid 0 does not own the data directory {d} (owner uid 12345)"
    );
    for args in [
        &["recordings", "list"][..],
        &["recordings", "list", "--json"],
        &["recordings", "play", "abc"],
        &["recordings", "export", "abc", "--format", "asciicast"],
        &["audit", "tail"],
    ] {
        let mut full = vec!["--data-dir", d.as_str()];
        full.extend_from_slice(args);
        let out = psmctl_in(tmp.path(), &full);
        assert_fails_with(&out, &want);
    }
}

#[test]
fn not_running_names_the_path_it_tried_and_how_to_point_elsewhere() {
    require_psm_binaries();
    // psm runs, but with another data directory than the default ./psm-data
    let psm = Psm::up();
    let cwd = psm.work_dir();
    let out = psmctl_in(&cwd, &["user", "list"]);
    let tried = cwd.join("psm-data");
    assert_fails_with(&out, &format!("no data directory at {}", tried.display()));
    assert_fails_with(&out, "--data-dir DIR or set PSM_DATA_DIR");
    // a data directory with nothing serving it
    fs::create_dir(&tried).expect("mkdir");
    let out = psmctl_in(&cwd, &["status"]);
    assert_fails_with(
        &out,
        &format!(
            "psm-control is not running on the data directory {} (no socket at {}/control.sock)",
            tried.display(),
            tried.display()
        ),
    );
    assert_fails_with(&out, "--data-dir DIR or set PSM_DATA_DIR");
    // pointed at the right one, it answers
    let d = psm.data_dir().display().to_string();
    let out = psmctl_in(&cwd, &["--data-dir", &d, "status"]);
    assert!(out.success(), "{}", out.describe());
    let out = run_cmd(
        Command::new(bin("psmctl"))
            .arg("status")
            .current_dir(&cwd)
            .env("PSM_DATA_DIR", &d),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.success(), "{}", out.describe());
}

#[test]
fn admin_change_names_the_actor() {
    let psm = Psm::up();
    let key = psm.work_dir().join("bob_ed25519");
    gen_key(&key);
    psm.psmctl_ok(
        &[
            "user",
            "add",
            "bob",
            "--ssh-key",
            &pub_path(&key).display().to_string(),
        ],
        None,
    );
    let e = psm.wait_audit("admin_change for user add bob", PROPAGATION, |e| {
        jstr(e, "event") == "admin_change"
            && jstr(e, "action") == "user add"
            && jstr(e, "object") == "bob"
    });
    let owner = fs::metadata(psm.data_dir()).expect("meta").uid();
    assert_eq!(e["actor_uid"], Value::from(owner), "{e}");
    if owner == 0 {
        assert_eq!(e["actor_uid"], 0, "{e}");
        assert_eq!(jstr(&e, "actor"), "root", "{e}");
    }
    let tail = psm.psmctl_ok(&["audit", "tail", "-n", "1"], None);
    let name = jstr(&e, "actor").to_string();
    assert!(
        tail.contains(&format!("actor={name}  actor_uid={owner}")),
        "audit tail shows the actor: {tail}"
    );
}

#[test]
fn operator_answers_are_not_misleading() {
    let w = World::new();

    // a public key given as the private key
    let out = w.psm.psmctl(
        &[
            "account",
            "add",
            "deploy@web01",
            "--private-key",
            &pub_path(&w.alice_key).display().to_string(),
        ],
        None,
    );
    assert_fails_with(&out, "this is a public key, not a private key");

    // an existing target name is refused before the scan (nothing listens there)
    let closed = free_port();
    let out = w.psm.psmctl(
        &[
            "target",
            "add",
            "web01",
            "--address",
            &format!("127.0.0.1:{closed}"),
            "--scan",
        ],
        None,
    );
    assert_fails_with(&out, "psmctl: target 'web01' already exists");

    // status --json: the object its help announces
    let help = w.psm.psmctl_ok(&["status", "--help"], None);
    assert!(
        help.contains("JSON object") && !help.contains("array"),
        "{help}"
    );
    let out = w.psm.psmctl_ok(&["status", "--json"], None);
    let v: Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert!(v.is_object() && v.get("version").is_some(), "{out}");

    // an ssh -tt session without a local terminal: the pty is requested as 0x0
    let mark = w.psm.audit_mark();
    let out = run_cmd(
        w.ssh_with(&["-tt"], &alice_login(), &w.alice_key)
            .arg("echo tty-ok; sleep 0.3"),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.stdout_str().contains("tty-ok"), "{}", out.describe());
    let end = w
        .psm
        .wait_audit_after(mark, "session_end of the tty session", PROPAGATION, |e| {
            jstr(e, "event") == "session_end"
        });
    let rec_id = jstr(&end, "recording_id").to_string();
    let session = jstr(&end, "session_id").to_string();
    let mut rec = Value::Null;
    let complete = wait_for(PROPAGATION, || {
        let out = w.psm.psmctl_ok(&["recordings", "list", "--json"], None);
        rec = json_objects(&out)
            .into_iter()
            .find(|r| jstr(r, "id") == rec_id)
            .unwrap_or(Value::Null);
        rec["complete"] == true
    });
    assert!(complete, "recording {rec_id} not complete: {rec}");

    // the recording's duration is the session's: end_ms - start_ms
    let span = end["end_ms"].as_u64().unwrap_or(0) - end["start_ms"].as_u64().unwrap_or(0);
    assert_eq!(rec["start_ms"], end["start_ms"], "{rec}\n{end}");
    assert_eq!(rec["end_ms"], end["end_ms"], "{rec}\n{end}");
    assert_eq!(rec["duration_ms"].as_u64(), Some(span), "{rec}\n{end}");
    // and both tables print the same figure
    let tail = w.psm.psmctl_ok(&["audit", "tail", "-n", "100"], None);
    let line = tail
        .lines()
        .find(|l| l.contains("session_end") && l.contains(&format!("session={session}")))
        .unwrap_or_else(|| panic!("no session_end line for {session}:\n{tail}"));
    let audit_duration = line
        .split("  ")
        .find_map(|f| f.strip_prefix("duration="))
        .unwrap_or_else(|| panic!("no duration in {line}"))
        .to_string();
    let table = w.psm.psmctl_ok(&["recordings", "list"], None);
    let row = table
        .lines()
        .find(|l| l.starts_with(&rec_id))
        .unwrap_or_else(|| panic!("no row for {rec_id}:\n{table}"));
    // The relay's duration_ms is end_ms - start_ms (the same instants as the recording); where
    // it still measured on its own clock, it may differ by a millisecond.
    let duration = end["duration_ms"].as_u64().expect("duration_ms");
    assert!(
        duration.abs_diff(span) <= 1,
        "session_end says {duration} ms, its own start and end {span} ms apart: {end}"
    );
    if duration == span {
        assert!(
            row.split_whitespace().any(|c| c == audit_duration),
            "recordings list shows another duration than audit tail ({audit_duration}):\n{row}\n{line}"
        );
    }

    // the asciicast of that session has a usable size
    let cast = w.psm.psmctl_ok(
        &["recordings", "export", &rec_id, "--format", "asciicast"],
        None,
    );
    let header: Value =
        serde_json::from_str(cast.lines().next().unwrap_or_default()).expect("header is JSON");
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24)),
        "{header}"
    );
    assert!(cast.contains("tty-ok"), "{cast}");
}

/// Runs `echo $SSH_CONNECTION` through psm as alice; returns the target's port when it worked.
fn target_port(w: &World) -> Option<u16> {
    let out = run_ssh(w.ssh().arg("echo conn $SSH_CONNECTION"));
    if !out.success() {
        return None;
    }
    out.stdout_str()
        .lines()
        .find_map(|l| l.strip_prefix("conn "))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|p| p.parse().ok())
}

#[test]
fn target_update_keeps_accounts_and_grants() {
    let w = World::new();
    let second = Sshd::start();
    let accounts = w.psm.psmctl_ok(&["account", "list", "--json"], None);
    let grants = w.psm.psmctl_ok(&["grant", "list", "--json"], None);
    assert_eq!(target_port(&w), Some(w.sshd.port()));

    // move web01 to the second sshd, with its host key
    let out = w.psm.psmctl_ok(
        &[
            "target",
            "update",
            "web01",
            "--address",
            &second.address(),
            "--host-key",
            second.host_key(),
        ],
        None,
    );
    assert!(out.starts_with("updated target web01 ("), "{out}");
    assert_eq!(
        w.psm.psmctl_ok(&["account", "list", "--json"], None),
        accounts
    );
    assert_eq!(w.psm.psmctl_ok(&["grant", "list", "--json"], None), grants);
    assert!(
        wait_for(PROPAGATION, || target_port(&w) == Some(second.port())),
        "sessions do not reach the new address {}",
        second.address()
    );
    let e = w
        .psm
        .wait_audit("admin_change target update", PROPAGATION, |e| {
            jstr(e, "event") == "admin_change" && jstr(e, "action") == "target update"
        });
    assert!(
        jstr(&e, "object").contains(&format!("{} -> {}", w.sshd.address(), second.address())),
        "{e}"
    );

    // pin a wrong key: sessions fail with the host key mismatch
    let wrong = gen_key(&w.psm.work_dir().join("wrong_host_key"));
    w.psm
        .psmctl_ok(&["target", "update", "web01", "--host-key", &wrong], None);
    let mut last = None;
    let refused = wait_for(PROPAGATION, || {
        let out = run_ssh(w.ssh().arg("echo ran"));
        let refused = out.code() == Some(255);
        last = Some(out);
        refused
    });
    let out = last.expect("an attempt");
    assert!(refused, "{}", out.describe());
    let line = assert_refused(&out, "psm: cannot connect to web01:");
    assert!(line.contains("host key"), "{line}");

    // --scan pins what the target at its current address shows, and sessions work again
    let out = w
        .psm
        .psmctl_ok(&["target", "update", "web01", "--scan"], None);
    assert!(
        out.contains(&format!("scanned web01 ({})", second.address())),
        "{out}"
    );
    let fp = fingerprint(&second.host_key_pub_path());
    assert!(
        out.contains(&fp),
        "scan shows the second sshd's key {fp}: {out}"
    );
    assert!(
        wait_for(PROPAGATION, || target_port(&w) == Some(second.port())),
        "sessions do not work after --scan"
    );
    assert_eq!(
        w.psm.psmctl_ok(&["account", "list", "--json"], None),
        accounts
    );
    assert_eq!(w.psm.psmctl_ok(&["grant", "list", "--json"], None), grants);

    // nothing to update, or no such target
    let out = w.psm.psmctl(&["target", "update", "web01"], None);
    assert!(!out.success(), "{}", out.describe());
    let out = w.psm.psmctl(
        &["target", "update", "nope", "--address", "127.0.0.1:22"],
        None,
    );
    assert_fails_with(&out, "unknown target 'nope'");
}

fn password_login_works(w: &World, password: &str) -> bool {
    let out = run_ssh(w.ssh_password(&alice_login(), password).arg("echo pw-ok"));
    out.success() && out.stdout_str().contains("pw-ok")
}

/// alice's stored password verifier (JSON), read from psm.db.
fn stored_verifier(w: &World) -> String {
    let db = rusqlite::Connection::open(w.psm.data_dir().join("psm.db")).expect("open psm.db");
    db.query_row("SELECT password FROM users WHERE name = 'alice'", [], |r| {
        r.get::<_, String>(0)
    })
    .expect("alice's verifier")
}

#[test]
fn a_legacy_pbkdf2_password_logs_in_and_is_replaced_by_argon2id() {
    let mut w = World::build(PsmMode::Separate, Sshd::start());
    // a store from before argon2id: alice's verifier is PBKDF2 (written while control is down)
    w.psm.kill_control();
    let legacy = psm_control_api::PasswordHash::pbkdf2(ALICE_PASSWORD, 1000).expect("pbkdf2");
    let json = serde_json::to_string(&legacy).expect("json");
    {
        let db = rusqlite::Connection::open(w.psm.data_dir().join("psm.db")).expect("open psm.db");
        db.execute(
            "UPDATE users SET password = ?1 WHERE name = 'alice'",
            [&json],
        )
        .expect("write the legacy verifier");
        db.execute("UPDATE meta SET policy_version = policy_version + 1", [])
            .expect("bump the policy version");
    }
    w.psm.start_control();
    w.psm.wait_policy_applied();
    assert!(
        stored_verifier(&w).contains("iterations"),
        "legacy in place"
    );

    // the login succeeds on the PBKDF2 verifier; the relay sends its argon2id replacement
    assert!(password_login_works(&w, ALICE_PASSWORD));
    assert!(
        wait_for(PROPAGATION, || stored_verifier(&w).contains("$argon2id$")),
        "not rehashed: {}",
        stored_verifier(&w)
    );
    w.psm.wait_policy_applied();
    assert!(
        password_login_works(&w, ALICE_PASSWORD),
        "the argon2id verifier logs in"
    );
    assert!(!password_login_works(&w, "not-alices-password"));
}

#[test]
fn user_passwd_and_the_minimum_password_length() {
    let w = World::new();
    assert!(password_login_works(&w, ALICE_PASSWORD));

    // psm-control refuses passwords shorter than 12 characters, for user add and user passwd
    let eleven = "short-pw-11";
    assert_eq!(eleven.chars().count(), 11);
    let out = w.psm.psmctl(
        &["user", "passwd", "alice", "--password-stdin"],
        Some(&format!("{eleven}\n")),
    );
    assert_fails_with(
        &out,
        "password is too short: psm requires at least 12 characters",
    );
    let out = w.psm.psmctl(
        &["user", "add", "bob", "--password-stdin"],
        Some(&format!("{eleven}\n")),
    );
    assert_fails_with(
        &out,
        "password is too short: psm requires at least 12 characters",
    );
    let twelve = "bob-pw-12chr";
    assert_eq!(twelve.chars().count(), 12);
    w.psm.psmctl_ok(
        &["user", "add", "bob", "--password-stdin"],
        Some(&format!("{twelve}\n")),
    );
    assert!(
        password_login_works(&w, ALICE_PASSWORD),
        "a refused passwd changed nothing"
    );

    // a new password: it works, the old one no longer does, keys stay
    let new = "alice-New-Passw0rd-7";
    let out = w.psm.psmctl_ok(
        &["user", "passwd", "alice", "--password-stdin"],
        Some(&format!("{new}\n")),
    );
    assert!(
        out.starts_with("changed the password of user alice"),
        "{out}"
    );
    assert!(
        wait_for(PROPAGATION, || password_login_works(&w, new)),
        "the new password does not log in"
    );
    let out = run_ssh(
        w.ssh_password(&alice_login(), ALICE_PASSWORD)
            .arg("echo pw-ok"),
    );
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(!out.stdout_str().contains("pw-ok"), "{}", out.describe());
    assert!(
        out.stderr_str().contains("Permission denied"),
        "{}",
        out.describe()
    );
    let out = run_ssh(w.ssh().arg("echo key-ok"));
    assert_eq!(out.stdout_str(), "key-ok\n", "{}", out.describe());
    // the audit log has the change, never the password
    w.psm
        .wait_audit("admin_change user passwd", PROPAGATION, |e| {
            jstr(e, "action") == "user passwd" && jstr(e, "object") == "alice"
        });
    let audit = fs::read_to_string(w.psm.data_dir().join("audit.jsonl")).unwrap_or_default();
    assert!(!audit.contains(new) && !audit.contains(twelve) && !audit.contains(eleven));
    let out = w.psm.psmctl(
        &["user", "passwd", "nobody", "--password-stdin"],
        Some(&format!("{new}\n")),
    );
    assert_fails_with(&out, "unknown user 'nobody'");
}
