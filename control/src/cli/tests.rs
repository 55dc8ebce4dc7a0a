//! Tests of whole psmctl commands through [`run`](super::run), up to one against a running
//! psm-control.

use std::fs;
use std::io;
use std::path::Path;

use clap::Parser;

use super::args::tests::parse;
use super::{run, Cli};

#[test]
fn not_running_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cli = parse(&[
        "--data-dir",
        &tmp.path().display().to_string(),
        "user",
        "list",
    ])
    .expect("parse");
    let e = run(cli, &mut io::empty(), &mut Vec::new()).expect_err("no daemon");
    assert_eq!(
        e.to_string(),
        format!(
            "psm-control is not running on the data directory {} (no socket at {}); if it \
             runs with another data directory, give --data-dir DIR or set PSM_DATA_DIR",
            tmp.path().display(),
            tmp.path().join("control.sock").display()
        )
    );
}

/// Runs psmctl synchronously; Err is the message psmctl would print.
fn run_args(args: &[&str]) -> Result<String, String> {
    let cli = parse(args).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    run(cli, &mut io::empty(), &mut out).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn file_commands_need_the_data_directory_and_its_ownership() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    let d = missing.display().to_string();
    for args in [
        &["--data-dir", &d, "recordings", "list"][..],
        &["--data-dir", &d, "audit", "tail"],
        &[
            "--data-dir",
            &d,
            "recordings",
            "export",
            "x",
            "--format",
            "text",
        ],
    ] {
        let e = run_args(args).expect_err("no data directory");
        assert!(
            e.starts_with(&format!("no data directory at {d}; give --data-dir DIR")),
            "{args:?}: {e}"
        );
    }

    let dir = tmp.path().join("data");
    fs::create_dir(&dir).expect("mkdir");
    fs::create_dir(dir.join("recordings")).expect("mkdir recordings");
    fs::write(dir.join("audit.jsonl"), "").expect("audit");
    let d = dir.display().to_string();
    // the owner reads them
    assert_eq!(
        run_args(&["--data-dir", &d, "audit", "tail"]).expect("tail"),
        ""
    );
    assert_eq!(
        run_args(&["--data-dir", &d, "recordings", "list", "--json"])
            .expect("list")
            .trim(),
        "[]"
    );
    // Only root can hand the directory to someone else (the suite runs as root: scripts/test.sh)
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test hands the data directory to another uid: run it as root"
    );
    std::os::unix::fs::chown(&dir, Some(12345), None).expect("chown");
    let want =
        format!("permission denied: uid 0 does not own the data directory {d} (owner uid 12345)");
    for args in [
        &["--data-dir", &d, "recordings", "list"][..],
        &["--data-dir", &d, "recordings", "list", "--json"],
        &["--data-dir", &d, "recordings", "play", "x"],
        &[
            "--data-dir",
            &d,
            "recordings",
            "export",
            "x",
            "--format",
            "asciicast",
        ],
        &["--data-dir", &d, "audit", "tail"],
    ] {
        assert_eq!(run_args(args).expect_err("not the owner"), want, "{args:?}");
    }
}

/// Runs psmctl against `dir` on a blocking thread; returns (ok, stdout or error message).
async fn psmctl(dir: &Path, args: &[&str], stdin: &str) -> Result<String, String> {
    let mut full = vec!["--data-dir".to_string(), dir.display().to_string()];
    full.extend(args.iter().map(|a| a.to_string()));
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let cli = Cli::try_parse_from(std::iter::once("psmctl".to_string()).chain(full))
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        run(cli, &mut io::Cursor::new(stdin.into_bytes()), &mut out).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .expect("blocking task")
}

#[tokio::test]
async fn end_to_end_against_the_daemon() {
    use crate::testkeys::{ENCRYPTED_PRIV, USER_PRIV, USER_PUB};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(crate::daemon::run_until(dir.clone(), async move {
        let _ = stopped.await;
    }));
    for _ in 0..200 {
        if dir.join("control.sock").exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let files = tmp.path();
    fs::write(files.join("alice.pub"), format!("# alice\n{USER_PUB}\n")).expect("pub");
    fs::write(files.join("bad.pub"), "ssh-ed25519 nope\n").expect("bad");
    fs::write(files.join("id"), USER_PRIV).expect("id");
    fs::write(files.join("id_enc"), ENCRYPTED_PRIV).expect("id_enc");
    let f = |name: &str| files.join(name).display().to_string();

    let out = psmctl(
        &dir,
        &[
            "user",
            "add",
            "alice",
            "--password-stdin",
            "--ssh-key",
            &f("alice.pub"),
        ],
        "twelve chars\n",
    )
    .await
    .expect("user add");
    assert!(
        out.starts_with("added user alice (password, 1 ssh key)"),
        "{out}"
    );
    // the daemon holds the minimum: 11 characters are refused, for user add and passwd
    let e = psmctl(
        &dir,
        &["user", "add", "carol", "--password-stdin"],
        "eleven char\n",
    )
    .await
    .expect_err("short password");
    assert_eq!(
        e,
        "password is too short: psm requires at least 12 characters"
    );
    let e = psmctl(
        &dir,
        &["user", "passwd", "alice", "--password-stdin"],
        "eleven char\n",
    )
    .await
    .expect_err("short password");
    assert_eq!(
        e,
        "password is too short: psm requires at least 12 characters"
    );
    let out = psmctl(
        &dir,
        &["user", "passwd", "alice", "--password-stdin"],
        "a new password\n",
    )
    .await
    .expect("passwd");
    assert!(
        out.starts_with("changed the password of user alice (policy version"),
        "{out}"
    );
    let e = psmctl(
        &dir,
        &["user", "passwd", "dave", "--password-stdin"],
        "a new password\n",
    )
    .await
    .expect_err("unknown user");
    assert_eq!(e, "unknown user 'dave'");
    let e = psmctl(
        &dir,
        &["user", "add", "bob", "--ssh-key", &f("bad.pub")],
        "",
    )
    .await
    .expect_err("bad key");
    assert!(
        e.contains("bad.pub: line 1: not an OpenSSH public key"),
        "{e}"
    );
    psmctl(
        &dir,
        &[
            "target",
            "add",
            "web01",
            "--address",
            "127.0.0.1:22",
            "--host-key",
            USER_PUB,
        ],
        "",
    )
    .await
    .expect("target add");
    psmctl(
        &dir,
        &["account", "add", "root@web01", "--password-stdin"],
        "hunter2\n",
    )
    .await
    .expect("account add");
    psmctl(
        &dir,
        &["account", "add", "deploy@web01", "--private-key", &f("id")],
        "",
    )
    .await
    .expect("key account");
    let e = psmctl(
        &dir,
        &["account", "add", "x@web01", "--private-key", &f("id_enc")],
        "",
    )
    .await
    .expect_err("encrypted");
    assert!(e.contains("encrypted"), "{e}");
    // a public key given for a private key is named as one
    let e = psmctl(
        &dir,
        &[
            "account",
            "add",
            "x@web01",
            "--private-key",
            &f("alice.pub"),
        ],
        "",
    )
    .await
    .expect_err("public key");
    assert!(
        e.contains("alice.pub: this is a public key, not a private key"),
        "{e}"
    );
    // an existing name is refused before any scan: nothing listens on port 1
    let e = psmctl(
        &dir,
        &[
            "target",
            "add",
            "web01",
            "--address",
            "127.0.0.1:1",
            "--scan",
        ],
        "",
    )
    .await
    .expect_err("exists");
    assert_eq!(e, "target 'web01' already exists");
    let e = psmctl(&dir, &["target", "update", "db01", "--scan"], "")
        .await
        .expect_err("unknown");
    assert_eq!(e, "unknown target 'db01'");
    let e = psmctl(
        &dir,
        &["account", "add", "root@db01", "--password-stdin"],
        "x\n",
    )
    .await
    .expect_err("unknown target");
    assert_eq!(e, "unknown target 'db01'");
    psmctl(&dir, &["grant", "add", "alice", "root@web01"], "")
        .await
        .expect("grant");
    let e = psmctl(&dir, &["grant", "add", "bob", "root@web01"], "")
        .await
        .expect_err("unknown user");
    assert_eq!(e, "unknown user 'bob'");

    let accounts = psmctl(&dir, &["account", "list"], "").await.expect("list");
    assert_eq!(
        accounts,
        "TARGET  USERNAME  CREDENTIAL\nweb01   deploy    private_key\nweb01   root      password\n"
    );
    let json = psmctl(&dir, &["account", "list", "--json"], "")
        .await
        .expect("json");
    assert!(!json.contains("hunter2") && !json.contains("PRIVATE KEY"));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json array");
    assert_eq!(v.as_array().map(|a| a.len()), Some(2));
    let targets = psmctl(&dir, &["target", "list"], "")
        .await
        .expect("targets");
    assert!(targets.contains("ssh-ed25519 SHA256:"), "{targets}");
    let grants = psmctl(&dir, &["grant", "list", "--json"], "")
        .await
        .expect("grants");
    let v: serde_json::Value = serde_json::from_str(&grants).expect("json");
    assert_eq!(v[0]["user"], "alice");
    let users = psmctl(&dir, &["user", "list"], "").await.expect("users");
    assert!(users.contains("alice  yes"), "{users}");
    let sessions = psmctl(&dir, &["sessions", "list", "--json"], "")
        .await
        .expect("sessions");
    assert_eq!(sessions.trim(), "[]");

    let tail = psmctl(&dir, &["audit", "tail", "-n", "2"], "")
        .await
        .expect("tail");
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), 2, "{tail}");
    let uid = nix::unistd::geteuid().as_raw();
    assert!(
        lines[1].contains("#6  control  admin_change  action=\"grant add\""),
        "{tail}"
    );
    assert!(lines[1].ends_with(&format!("actor_uid={uid}")), "{tail}");
    let tail = psmctl(&dir, &["audit", "tail", "--json"], "")
        .await
        .expect("tail");
    let v: serde_json::Value = serde_json::from_str(&tail).expect("json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(6));
    assert_eq!(v[1]["action"], "user passwd");
    assert_eq!(v[1]["actor_uid"], uid);
    assert!(!tail.contains("hunter2") && !tail.contains("new password"));

    // target update keeps the accounts; the audit names old and new
    let out = psmctl(
        &dir,
        &[
            "target",
            "update",
            "web01",
            "--address",
            "127.0.0.1:2222",
            "--host-key",
            crate::testkeys::OTHER_PUB,
        ],
        "",
    )
    .await
    .expect("update");
    assert!(
        out.starts_with(
            "updated target web01 (address 127.0.0.1:2222, host key ssh-ed25519 SHA256:"
        ),
        "{out}"
    );
    let targets = psmctl(&dir, &["target", "list", "--json"], "")
        .await
        .expect("targets");
    let v: serde_json::Value = serde_json::from_str(&targets).expect("json");
    assert_eq!(v[0]["address"], "127.0.0.1:2222");
    assert_eq!(v[0]["host_key"], crate::testkeys::OTHER_PUB);
    let accounts = psmctl(&dir, &["account", "list"], "").await.expect("list");
    assert_eq!(accounts.lines().count(), 3, "{accounts}");
    let tail = psmctl(&dir, &["audit", "tail", "-n", "1", "--json"], "")
        .await
        .expect("tail");
    let v: serde_json::Value = serde_json::from_str(&tail).expect("json");
    let object = v[0]["object"].as_str().unwrap_or_default();
    assert!(
        object.starts_with(
            "web01 (address 127.0.0.1:22 -> 127.0.0.1:2222, host key ssh-ed25519 SHA256:"
        ),
        "{object}"
    );

    let out = psmctl(&dir, &["grant", "remove", "alice", "root@web01"], "")
        .await
        .expect("revoke");
    assert!(
        out.starts_with("removed grant alice -> root@web01"),
        "{out}"
    );
    let out = psmctl(&dir, &["target", "remove", "web01"], "")
        .await
        .expect("target remove");
    assert!(
        out.starts_with("removed target web01 (and 2 accounts)"),
        "{out}"
    );
    let list = psmctl(&dir, &["recordings", "list", "--json"], "")
        .await
        .expect("recs");
    assert_eq!(list.trim(), "[]");

    let _ = stop.send(());
    daemon.await.expect("join").expect("daemon");
    let e = psmctl(&dir, &["user", "list"], "")
        .await
        .expect_err("stopped");
    assert!(e.starts_with("psm-control is not running"), "{e}");
}
