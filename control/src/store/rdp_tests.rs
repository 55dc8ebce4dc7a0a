//! The store's RDP parts: schema v4 migration, target protocols and certificate pins, account
//! domains, users' NT hashes (sealed at rest, opened in the snapshot, gone with a password
//! change that does not bring one), and policy documents carrying them.

use psm_control_api::{Conditions, Credential, PasswordHash, Secret};

use super::*;
use crate::ntlm::nt_hash;
use crate::testkeys::USER_PUB;
use crate::validate;
use crate::vault::Vault;

fn setup() -> (tempfile::TempDir, Store, Vault) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&tmp.path().join("psm.db")).expect("open");
    let vault = Vault::new(&[9u8; 32]).expect("vault");
    (tmp, store, vault)
}

fn pin() -> String {
    crate::validate::der_fingerprint(b"win01 certificate")
}

#[test]
fn a_version_3_store_migrates_to_ssh_targets_and_no_nt_hashes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("psm.db");
    {
        let mut c = Connection::open(&path).expect("open");
        let tx = c.transaction().expect("tx");
        tx.execute_batch(SCHEMA_V1).expect("v1");
        tx.execute_batch(SCHEMA_V2).expect("v2");
        tx.execute_batch(SCHEMA_V3).expect("v3");
        tx.pragma_update(None, "user_version", 3).expect("version");
        let h =
            serde_json::to_string(&PasswordHash::new("old password").expect("hash")).expect("json");
        tx.execute(
            "INSERT INTO users (name, password) VALUES ('alice', ?1)",
            [h],
        )
        .expect("user");
        tx.execute(
            "INSERT INTO targets (name, address, host_key) VALUES ('web01', '127.0.0.1:22', ?1)",
            [validate::host_key(USER_PUB).expect("key")],
        )
        .expect("target");
        tx.commit().expect("commit");
    }
    let mut s = Store::open(&path).expect("migrate");
    let v: i64 = s
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(v, SCHEMA_VERSION);
    let t = &s.list_targets().expect("targets")[0];
    assert_eq!(t.protocol, Protocol::Ssh);
    let u = &s.list_users().expect("users")[0];
    assert!(u.has_password && !u.rdp, "an old password has no NT hash");
    let vault = Vault::new(&[9u8; 32]).expect("vault");
    let snap = s.snapshot(&vault).expect("snapshot");
    assert!(snap.users[0].nt_hash.is_none());
    // the next password change brings one
    let h = PasswordHash::new("Shad0w-Pass").expect("hash");
    s.set_password_with_nt_hash(&vault, "alice", &h, &nt_hash("Shad0w-Pass"))
        .expect("passwd");
    assert!(s.list_users().expect("users")[0].rdp);
    let snap = s.snapshot(&vault).expect("snapshot");
    assert_eq!(
        snap.users[0]
            .nt_hash
            .as_ref()
            .map(|n| n.expose().to_string()),
        Some("58ade4f200760fa5454e8ab24bdedc5f".to_string())
    );
}

#[test]
fn nt_hashes_are_sealed_and_follow_the_password() {
    let (t, mut s, v) = setup();
    let h = PasswordHash::new("Shad0w-Pass").expect("hash");
    s.add_user_with_nt_hash(&v, "alice", Some((&h, &nt_hash("Shad0w-Pass"))), &[])
        .expect("alice");
    s.add_user_with_nt_hash(&v, "bob", None, &[USER_PUB.into()])
        .expect("bob, keys only");
    let users = s.list_users().expect("users");
    assert_eq!(
        users
            .iter()
            .map(|u| (u.name.as_str(), u.rdp))
            .collect::<Vec<_>>(),
        [("alice", true), ("bob", false)]
    );
    let snap = s.snapshot(&v).expect("snapshot");
    let alice = snap.user("alice").expect("alice");
    assert_eq!(
        alice.nt_hash.as_ref().map(|n| n.expose()),
        Some("58ade4f200760fa5454e8ab24bdedc5f")
    );
    // at rest only sealed
    let raw = fs::read(t.path().join("psm.db")).expect("read");
    assert!(!raw
        .windows(32)
        .any(|w| w == b"58ade4f200760fa5454e8ab24bdedc5f"));
    // sealed for this user: copied onto another it does not open
    let sealed: Vec<u8> = s
        .conn
        .query_row("SELECT nt_hash FROM users WHERE name = 'alice'", [], |r| {
            r.get(0)
        })
        .expect("sealed");
    s.conn
        .execute(
            "UPDATE users SET nt_hash = ?1 WHERE name = 'bob'",
            [&sealed],
        )
        .expect("copy");
    let e = s.snapshot(&v).expect_err("wrong row");
    assert!(e.to_string().contains("nthash:bob"), "{e}");
    s.conn
        .execute("UPDATE users SET nt_hash = NULL WHERE name = 'bob'", [])
        .expect("undo");
    // a password change without an NT hash removes the old one (it would not match)
    s.set_password("alice", &PasswordHash::new("another one").expect("hash"))
        .expect("passwd");
    assert!(!s.list_users().expect("users")[0].rdp);
    assert!(s.snapshot(&v).expect("snapshot").users[0].nt_hash.is_none());
    let bad = Secret::new("not a hash".into());
    assert!(s
        .set_password_with_nt_hash(&v, "alice", &h, &bad)
        .expect_err("malformed")
        .to_string()
        .contains("malformed NT hash"));
}

#[test]
fn rdp_targets_pin_certificates_and_their_accounts_take_domains() {
    let (_t, mut s, v) = setup();
    s.add_target_with("win01", "10.0.0.7", &pin(), Protocol::Rdp)
        .expect("rdp target");
    s.add_target("web01", "127.0.0.1:22", USER_PUB)
        .expect("ssh target");
    let targets = s.list_targets().expect("targets");
    let win = targets.iter().find(|t| t.name == "win01").expect("win01");
    assert_eq!(
        (win.protocol, win.address.as_str(), win.fingerprint.as_str()),
        (Protocol::Rdp, "10.0.0.7:3389", pin().as_str())
    );
    let msg = |r: Result<u64, StoreError>| r.expect_err("must fail").to_string();
    assert!(
        msg(s.add_target_with("win02", "10.0.0.8:3389", USER_PUB, Protocol::Rdp))
            .contains("invalid certificate fingerprint")
    );
    let pw = Credential::Password(Secret::new("Adm1n-Pass".into()));
    s.add_account_with(&v, "win01", "Administrator", &pw, Some("CORP"))
        .expect("domain account");
    s.add_account_with(&v, "win01", "local", &pw, None)
        .expect("local account");
    let key = Credential::PrivateKey(Secret::new(crate::testkeys::USER_PRIV.into()));
    assert!(msg(s.add_account_with(&v, "win01", "k", &key, None)).contains("need a password"));
    assert!(
        msg(s.add_account_with(&v, "web01", "root", &pw, Some("CORP")))
            .contains("a domain is for accounts on RDP targets")
    );
    assert!(msg(s.add_account_with(&v, "win01", "x", &pw, Some("CO RP"))).contains("domain"));
    let accounts = s.list_accounts().expect("accounts");
    assert_eq!(
        accounts
            .iter()
            .map(|a| (a.username.as_str(), a.domain.as_deref()))
            .collect::<Vec<_>>(),
        [("Administrator", Some("CORP")), ("local", None)]
    );
    let snap = s.snapshot(&v).expect("snapshot");
    let t = snap.targets.iter().find(|t| t.name == "win01").expect("t");
    assert_eq!((t.protocol, t.host_key.clone()), (Protocol::Rdp, pin()));
    let a = snap
        .accounts
        .iter()
        .find(|a| a.username == "Administrator")
        .expect("a");
    assert_eq!(a.domain.as_deref(), Some("CORP"));

    // re-pinning checks the new pin for the target's protocol
    let other = crate::validate::der_fingerprint(b"renewed certificate");
    let (_, before) = s
        .update_target("win01", Some("10.0.0.9"), Some(&other))
        .expect("re-pin");
    assert_eq!(before.host_key, pin());
    let win = &s.list_targets().expect("targets")[1];
    assert_eq!(
        (win.address.as_str(), win.host_key.as_str()),
        ("10.0.0.9:3389", other.as_str())
    );
    assert!(s.update_target("win01", None, Some(USER_PUB)).is_err());
    assert!(s.update_target("web01", None, Some(&other)).is_err());
}

#[test]
fn policy_documents_carry_protocols_domains_and_channel_rules() {
    let (_t, mut s, v) = setup();
    let h = PasswordHash::new("a long password").expect("hash");
    s.add_user("alice", Some(&h), &[USER_PUB.into()])
        .expect("alice");
    s.add_target_with("win01", "10.0.0.7:3389", &pin(), Protocol::Rdp)
        .expect("target");
    let pw = Credential::Password(Secret::new("Adm1n-Pass".into()));
    s.add_account_with(&v, "win01", "Administrator", &pw, Some("CORP"))
        .expect("account");
    let conditions = Conditions {
        rdp: psm_control_api::RdpChannels {
            clipboard: psm_control_api::ClipboardRule::ToTarget,
            drive: true,
            ..Default::default()
        },
        ..Default::default()
    };
    s.add_grant_with("alice", "win01", "Administrator", &conditions)
        .expect("grant");
    let doc = s.export().expect("export");
    let text = toml::to_string(&doc).expect("toml");
    assert!(text.contains("protocol = \"rdp\""), "{text}");
    assert!(text.contains("domain = \"CORP\""), "{text}");
    assert!(text.contains("clipboard = \"to-target\""), "{text}");
    let back: PolicyDoc = toml::from_str(&text).expect("parse");
    assert_eq!(back, doc);
    let r = s.import(&back, false, false).expect("same");
    assert!(r.changes.is_empty(), "{:?}", r.changes);
    // a domain change applies; a protocol change is refused
    let mut changed = back.clone();
    changed.accounts[0].domain = Some("EXAMPLE".into());
    let r = s.import(&changed, false, false).expect("domain");
    assert_eq!(
        r.changes,
        ["~ account Administrator@win01 domain EXAMPLE".to_string()]
    );
    assert_eq!(
        s.list_accounts().expect("accounts")[0].domain.as_deref(),
        Some("EXAMPLE")
    );
    let mut ssh = changed.clone();
    ssh.targets[0].protocol = Protocol::Ssh;
    ssh.targets[0].host_key = USER_PUB.into();
    ssh.accounts[0].domain = None;
    let e = s.import(&ssh, true, false).expect_err("protocol change");
    assert!(e.to_string().contains("would change protocol"), "{e}");
    let mut bad = changed;
    bad.targets[0].host_key = USER_PUB.into();
    let e = s.import(&bad, true, false).expect_err("bad pin");
    assert!(e.to_string().contains("targets[0].host_key"), "{e}");
}
