//! psmctl's RDP commands end to end against a running psm-control: what an operator types and
//! reads back.

use std::io;
use std::path::Path;

use clap::Parser;

use crate::cli::{run, Cli};
use crate::scan_rdp::tests::{confirm, serve};
use crate::scan_rdp::PROTOCOL_SSL;

/// Runs psmctl against `dir` on a blocking thread; returns stdout or the error message.
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
async fn an_operator_sets_up_an_rdp_target_and_hands_out_an_rdp_file() {
    use crate::testkeys::USER_PUB;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(crate::daemon::run_until(dir.clone(), async move {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        if dir.join("control.sock").exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let ok = |r: Result<String, String>| r.expect("psmctl");

    // a user with a password can log in over RDP; one with keys only cannot
    ok(psmctl(
        &dir,
        &["user", "add", "alice", "--password-stdin"],
        "Shad0w-Pass-long\n",
    )
    .await);
    let pubkey = tmp.path().join("bob.pub");
    std::fs::write(&pubkey, format!("{USER_PUB}\n")).expect("pub");
    let key_arg = pubkey.display().to_string();
    ok(psmctl(&dir, &["user", "add", "bob", "--ssh-key", &key_arg], "").await);
    let users = ok(psmctl(&dir, &["user", "list"], "").await);
    let header = users.lines().next().unwrap_or_default();
    assert!(header.ends_with("RDP"), "{users}");
    let alice = users
        .lines()
        .find(|l| l.starts_with("alice"))
        .unwrap_or_default();
    let bob = users
        .lines()
        .find(|l| l.starts_with("bob"))
        .unwrap_or_default();
    assert!(alice.ends_with("yes"), "{users}");
    assert!(bob.ends_with('-'), "{users}");
    let json = ok(psmctl(&dir, &["user", "list", "--json"], "").await);
    assert!(
        !json.contains("Shad0w") && !json.contains("nt_hash"),
        "{json}"
    );

    // pinned from a given fingerprint; the port defaults to 3389
    let fp = crate::validate::der_fingerprint(b"win01");
    let out = ok(psmctl(
        &dir,
        &[
            "target",
            "add",
            "win01",
            "--protocol",
            "rdp",
            "--address",
            "127.0.0.1",
            "--cert-fingerprint",
            &fp,
        ],
        "",
    )
    .await);
    assert!(
        out.starts_with("added RDP target win01 (127.0.0.1:3389)"),
        "{out}"
    );
    // pinned from a scan of a TLS server answering the X.224 request
    let (addr, der) = serve(confirm(2, PROTOCOL_SSL), true);
    let out = ok(psmctl(
        &dir,
        &[
            "target",
            "add",
            "win02",
            "--protocol",
            "rdp",
            "--address",
            &addr,
            "--scan",
        ],
        "",
    )
    .await);
    let scanned = crate::validate::der_fingerprint(&der);
    assert!(
        out.starts_with(&format!("scanned win02 ({addr}): {scanned} (TLS")),
        "{out}"
    );
    // a host key is not a certificate pin, and a fingerprint needs --protocol rdp
    let e = psmctl(
        &dir,
        &[
            "target",
            "add",
            "win03",
            "--protocol",
            "rdp",
            "--address",
            "10.0.0.3",
            "--host-key",
            USER_PUB,
        ],
        "",
    )
    .await
    .expect_err("host key for rdp");
    assert!(e.contains("invalid certificate fingerprint"), "{e}");
    let e = psmctl(
        &dir,
        &[
            "target",
            "add",
            "web01",
            "--address",
            "10.0.0.4:22",
            "--cert-fingerprint",
            &fp,
        ],
        "",
    )
    .await
    .expect_err("fingerprint for ssh");
    assert!(e.contains("add --protocol rdp"), "{e}");
    ok(psmctl(
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
    .await);
    let targets = ok(psmctl(&dir, &["target", "list"], "").await);
    assert!(targets.starts_with("NAME   PROTOCOL  ADDRESS"), "{targets}");
    let win01: Vec<&str> = targets
        .lines()
        .find(|l| l.starts_with("win01"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        win01,
        ["win01", "rdp", "127.0.0.1:3389", fp.as_str()],
        "{targets}"
    );
    assert!(targets.contains("ssh-ed25519 SHA256:"), "{targets}");
    let json = ok(psmctl(&dir, &["target", "list", "--json"], "").await);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v[0]["protocol"], "ssh");
    assert_eq!(v[1]["protocol"], "rdp");

    // re-pin: the audit and the answer name the certificate
    let renewed = crate::validate::der_fingerprint(b"renewed");
    let out = ok(psmctl(
        &dir,
        &["target", "update", "win01", "--cert-fingerprint", &renewed],
        "",
    )
    .await);
    assert!(
        out.starts_with(&format!("updated target win01 (certificate {renewed})")),
        "{out}"
    );
    let e = psmctl(
        &dir,
        &["target", "update", "web01", "--cert-fingerprint", &renewed],
        "",
    )
    .await
    .expect_err("ssh target");
    assert!(e.contains("is an SSH target"), "{e}");

    // accounts: a domain, a password only
    ok(psmctl(
        &dir,
        &[
            "account",
            "add",
            "Administrator@win01",
            "--password-stdin",
            "--domain",
            "CORP",
        ],
        "Adm1n-Pass\n",
    )
    .await);
    let key = tmp.path().join("id");
    std::fs::write(&key, crate::testkeys::USER_PRIV).expect("key");
    let e = psmctl(
        &dir,
        &[
            "account",
            "add",
            "deploy@win01",
            "--private-key",
            &key.display().to_string(),
        ],
        "",
    )
    .await
    .expect_err("key on rdp");
    assert!(e.contains("need a password"), "{e}");
    let accounts = ok(psmctl(&dir, &["account", "list"], "").await);
    assert_eq!(
        accounts,
        "TARGET  USERNAME       CREDENTIAL  DOMAIN\nwin01   Administrator  password    CORP\n"
    );

    // a grant with channel rules, shown in grant list
    let out = ok(psmctl(
        &dir,
        &[
            "grant",
            "add",
            "alice",
            "Administrator@win01",
            "--clipboard",
            "to-target",
            "--drive",
            "--no-audio",
            "--rdp-channel",
            "rail",
        ],
        "",
    )
    .await);
    assert!(
        out.contains("clipboard to-target; drive; no audio; rdp channels rail"),
        "{out}"
    );
    let e = psmctl(
        &dir,
        &[
            "grant",
            "add",
            "bob",
            "Administrator@win01",
            "--clipboard",
            "sideways",
        ],
        "",
    )
    .await
    .expect_err("bad clipboard");
    assert!(e.contains("sideways"), "{e}");
    let grants = ok(psmctl(&dir, &["grant", "list"], "").await);
    assert!(
        grants.contains("clipboard to-target; drive; no audio"),
        "{grants}"
    );

    // the .rdp file follows the grant
    let file = ok(psmctl(
        &dir,
        &[
            "rdp-file",
            "alice",
            "Administrator@win01",
            "--host",
            "gw.example.com",
        ],
        "",
    )
    .await);
    assert_eq!(
        file,
        "full address:s:gw.example.com:3389\r\n\
         username:s:alice@Administrator@win01\r\n\
         enablecredsspsupport:i:1\r\n\
         authentication level:i:2\r\n\
         prompt for credentials:i:1\r\n\
         redirectclipboard:i:1\r\n\
         redirectdrives:i:1\r\n\
         drivestoredirect:s:*\r\n\
         redirectprinters:i:0\r\n\
         redirectsmartcards:i:0\r\n\
         audiomode:i:2\r\n"
    );
    // the address from psm.toml when no --host
    std::fs::write(
        dir.join("psm.toml"),
        "[relay]\nrdp_public_address = \"rdp.example.com:443\"\n",
    )
    .expect("toml");
    let file = ok(psmctl(&dir, &["rdp-file", "alice", "Administrator@win01"], "").await);
    assert!(
        file.starts_with("full address:s:rdp.example.com:443\r\n"),
        "{file}"
    );
    let e = psmctl(&dir, &["rdp-file", "bob", "Administrator@win01"], "")
        .await
        .expect_err("no grant");
    assert_eq!(e, "user 'bob' has no grant for Administrator@win01");
    let e = psmctl(&dir, &["rdp-file", "alice", "root@web01"], "")
        .await
        .expect_err("ssh");
    assert!(e.contains("is an SSH target"), "{e}");

    // the policy document carries it all
    let doc = ok(psmctl(&dir, &["policy", "export"], "").await);
    for part in [
        "protocol = \"rdp\"",
        "domain = \"CORP\"",
        "clipboard = \"to-target\"",
    ] {
        assert!(doc.contains(part), "{part}: {doc}");
    }
    // and the audit log names the pin, never a secret
    let tail = ok(psmctl(&dir, &["audit", "tail", "--json"], "").await);
    assert!(tail.contains(&format!("certificate {fp}")), "{tail}");
    assert!(
        !tail.contains("Adm1n-Pass") && !tail.contains("Shad0w"),
        "{tail}"
    );

    let _ = stop.send(());
    daemon.await.expect("join").expect("daemon");
}
