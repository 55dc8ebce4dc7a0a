//! The store's CRUD and snapshot basics: versions bumped by every change and only by changes
//! that succeed, reference checks, updates that keep the rest, sealed credentials.

use psm_control_api::{Credential, PasswordHash, Secret, Target};

use super::*;
use crate::protocol::CredentialKind;
use crate::testkeys::{ENCRYPTED_PRIV, USER_PRIV, USER_PUB};
use crate::validate;
use crate::vault::Vault;

fn setup() -> (tempfile::TempDir, Store, Vault) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&tmp.path().join("psm.db")).expect("open");
    let vault = Vault::new(&[9u8; 32]).expect("vault");
    (tmp, store, vault)
}

fn host_key() -> String {
    USER_PUB.to_string()
}

fn populate(s: &mut Store, v: &Vault) {
    let h = PasswordHash::new("pw").expect("hash");
    s.add_user("alice", Some(&h), &[USER_PUB.into()])
        .expect("alice");
    s.add_target("web01", "127.0.0.1:22", &host_key())
        .expect("web01");
    s.add_account(
        v,
        "web01",
        "root",
        &Credential::Password(Secret::new("hunter2".into())),
    )
    .expect("root");
    s.add_account(
        v,
        "web01",
        "deploy",
        &Credential::PrivateKey(Secret::new(USER_PRIV.into())),
    )
    .expect("deploy");
    s.add_grant("alice", "web01", "root").expect("grant");
}

#[test]
fn crud_and_versions() {
    let (_t, mut s, v) = setup();
    assert_eq!(s.policy_version().expect("v"), 1);
    populate(&mut s, &v);
    assert_eq!(s.policy_version().expect("v"), 6);

    let users = s.list_users().expect("users");
    assert_eq!(users.len(), 1);
    assert!(users[0].has_password);
    assert_eq!(users[0].ssh_keys, vec![USER_PUB.to_string()]);
    let targets = s.list_targets().expect("targets");
    assert_eq!(targets[0].address, "127.0.0.1:22");
    assert!(
        !targets[0].host_key.contains("alice@laptop"),
        "comment dropped"
    );
    assert!(targets[0].fingerprint.starts_with("ssh-ed25519 SHA256:"));
    let accounts = s.list_accounts().expect("accounts");
    assert_eq!(
        accounts
            .iter()
            .map(|a| (a.username.as_str(), a.kind))
            .collect::<Vec<_>>(),
        vec![
            ("deploy", CredentialKind::PrivateKey),
            ("root", CredentialKind::Password)
        ]
    );
    assert_eq!(s.list_grants().expect("grants").len(), 1);

    s.remove_grant("alice", "web01", "root")
        .expect("remove grant");
    assert!(s.list_grants().expect("grants").is_empty());
    s.add_grant("alice", "web01", "root").expect("grant again");
    let r = s.remove_account("web01", "root").expect("remove account");
    assert_eq!(r.grants, 1);
    s.add_grant("alice", "web01", "deploy")
        .expect("grant deploy");
    let r = s.remove_target("web01").expect("remove target");
    assert_eq!((r.accounts, r.grants), (1, 1));
    assert!(s.list_accounts().expect("accounts").is_empty());
    let r = s.remove_user("alice").expect("remove user");
    assert_eq!(r.grants, 0);
    assert!(s.list_users().expect("users").is_empty());
    assert_eq!(s.policy_version().expect("v"), r.version);
}

#[test]
fn password_and_target_updates_keep_everything_else() {
    let (_t, mut s, v) = setup();
    populate(&mut s, &v);
    let before = s.policy_version().expect("v");

    let h = PasswordHash::new("a much longer password").expect("hash");
    let v1 = s.set_password("alice", &h).expect("passwd");
    assert_eq!(v1, before + 1);
    let snap = s.snapshot(&v).expect("snapshot");
    let alice = snap.user("alice").expect("alice");
    assert!(alice
        .password
        .as_ref()
        .is_some_and(|p| p.verify("a much longer password")));
    assert!(!alice.password.as_ref().is_some_and(|p| p.verify("pw")));
    assert_eq!(alice.ssh_keys, vec![USER_PUB.to_string()]);
    assert_eq!(
        s.set_password("bob", &h).expect_err("unknown").to_string(),
        "unknown user 'bob'"
    );

    let other = crate::testkeys::OTHER_PUB;
    let (v2, old) = s
        .update_target("web01", Some(" 10.0.0.9:2222 "), None)
        .expect("address");
    assert_eq!(v2, v1 + 1);
    assert_eq!(old.address, "127.0.0.1:22");
    let (v3, old) = s.update_target("web01", None, Some(other)).expect("key");
    assert_eq!(v3, v2 + 1);
    assert_eq!(old.address, "10.0.0.9:2222");
    assert_eq!(old.host_key, validate::host_key(&host_key()).expect("key"));
    let t = &s.list_targets().expect("targets")[0];
    assert_eq!(
        (t.address.as_str(), t.host_key.as_str()),
        ("10.0.0.9:2222", other)
    );
    // accounts and grants are untouched
    assert_eq!(s.list_accounts().expect("accounts").len(), 2);
    assert_eq!(s.list_grants().expect("grants").len(), 1);
    let snap = s.snapshot(&v).expect("snapshot");
    assert!(snap.authorize_local("alice", "root", "web01").is_ok());

    let msg = |r: Result<(u64, Target), StoreError>| r.expect_err("must fail").to_string();
    assert_eq!(
        msg(s.update_target("db01", Some("10.0.0.1:22"), None)),
        "unknown target 'db01'"
    );
    assert!(msg(s.update_target("web01", None, None)).starts_with("nothing to update"));
    assert!(msg(s.update_target("web01", Some("nope"), None)).contains("invalid address"));
    assert!(
        msg(s.update_target("web01", None, Some("ssh-ed25519 AAAA"))).contains("invalid host key")
    );
    assert_eq!(
        s.policy_version().expect("v"),
        v3,
        "failed updates change nothing"
    );
}

#[test]
fn constraint_errors() {
    let (_t, mut s, v) = setup();
    populate(&mut s, &v);
    let before = s.policy_version().expect("v");
    let msg = |r: Result<u64, StoreError>| r.expect_err("must fail").to_string();
    assert_eq!(
        msg(s.add_grant("bob", "web01", "root")),
        "unknown user 'bob'"
    );
    assert_eq!(
        msg(s.add_grant("alice", "db01", "root")),
        "unknown target 'db01'"
    );
    assert_eq!(
        msg(s.add_grant("alice", "web01", "admin")),
        "unknown account 'admin@web01'"
    );
    assert_eq!(
        msg(s.add_grant("alice", "web01", "root")),
        "grant alice -> root@web01 already exists"
    );
    assert_eq!(
        msg(s.remove_grant("alice", "web01", "deploy")),
        "no grant alice -> deploy@web01"
    );
    assert_eq!(
        msg(s.add_user("alice", None, &[USER_PUB.into()])),
        "user 'alice' already exists"
    );
    assert_eq!(
        msg(s.add_user("bob", None, &[])),
        "user 'bob' needs a password or at least one ssh key"
    );
    assert!(msg(s.add_user("bob", None, &["ssh-rsa nope".into()]))
        .contains("not an OpenSSH public key"));
    assert_eq!(
        msg(s.add_user("bob", None, &[USER_PUB.into(), USER_PUB.into()])),
        "duplicate ssh key for user 'bob'"
    );
    assert_eq!(
        msg(s.add_target("web01", "10.0.0.1:22", &host_key())),
        "target 'web01' already exists"
    );
    assert!(msg(s.add_target("db01", "10.0.0.1", &host_key())).contains("invalid address"));
    assert!(
        msg(s.add_target("db01", "10.0.0.1:22", "ssh-ed25519 AAAA")).contains("invalid host key")
    );
    let pw = Credential::Password(Secret::new("x".into()));
    assert_eq!(
        msg(s.add_account(&v, "db01", "root", &pw)),
        "unknown target 'db01'"
    );
    assert_eq!(
        msg(s.add_account(&v, "web01", "root", &pw)),
        "account 'root@web01' already exists"
    );
    let enc = Credential::PrivateKey(Secret::new(ENCRYPTED_PRIV.into()));
    assert!(msg(s.add_account(&v, "web01", "x", &enc)).contains("encrypted"));
    assert!(s
        .remove_user("bob")
        .expect_err("unknown")
        .to_string()
        .contains("unknown user 'bob'"));
    assert!(s.remove_target("db01").is_err());
    assert!(s.remove_account("web01", "nobody").is_err());
    // failed changes do not bump the version
    assert_eq!(s.policy_version().expect("v"), before);
}

#[test]
fn snapshot_decrypts_and_survives_reopen() {
    let (t, mut s, v) = setup();
    populate(&mut s, &v);
    let snap = s.snapshot(&v).expect("snapshot");
    assert_eq!(snap.version, 6);
    assert!(snap.recording_required);
    assert_eq!(snap.users.len(), 1);
    assert!(snap.users[0]
        .password
        .as_ref()
        .is_some_and(|h| h.verify("pw")));
    let root = snap
        .accounts
        .iter()
        .find(|a| a.username == "root")
        .expect("root");
    assert_eq!(
        root.credential,
        Credential::Password(Secret::new("hunter2".into()))
    );
    assert!(snap.authorize_local("alice", "root", "web01").is_ok());
    assert!(snap.authorize_local("alice", "deploy", "web01").is_err());

    // the ciphertext at rest holds no plaintext
    let raw = fs::read(t.path().join("psm.db")).expect("read");
    assert!(!raw.windows(7).any(|w| w == b"hunter2"));

    s.add_grant("alice", "web01", "deploy").expect("grant");
    let snap2 = s.snapshot(&v).expect("snapshot");
    assert_eq!(snap2.version, 7);
    assert_eq!(snap2.grants.len(), 2);
    drop(s);

    let mut s = Store::open(&t.path().join("psm.db")).expect("reopen");
    assert_eq!(s.policy_version().expect("v"), 7);
    // a different master key cannot build a snapshot, and says which account failed
    let wrong = Vault::new(&[1u8; 32]).expect("vault");
    let e = s.snapshot(&wrong).expect_err("wrong key");
    assert!(e.to_string().contains("account:web01/"), "{e}");
    assert_eq!(s.snapshot(&v).expect("snapshot").version, 7);
}
