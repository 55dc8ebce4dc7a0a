//! The store's pass-through parts: the schema v5 rebuild of `targets` and `accounts` (nothing
//! lost, foreign keys intact), `tcp` targets with their psm port and credential-less account,
//! and policy documents carrying them.

use psm_control_api::{Conditions, Credential, Secret};

use super::*;
use crate::testkeys::USER_PUB;
use crate::validate;
use crate::vault::{account_aad, Vault};

fn vault() -> Vault {
    Vault::new(&[7u8; 32]).expect("vault")
}

/// A version 4 store with a target, its account, a target group holding it and a grant.
fn version_4(path: &Path, vault: &Vault) {
    let mut c = Connection::open(path).expect("open");
    let tx = c.transaction().expect("tx");
    for schema in [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4] {
        tx.execute_batch(schema).expect("schema");
    }
    tx.pragma_update(None, "user_version", 4).expect("version");
    tx.execute("INSERT INTO users (name) VALUES ('alice')", [])
        .expect("user");
    tx.execute(
        "INSERT INTO targets (name, address, host_key) VALUES ('web01', '127.0.0.1:22', ?1)",
        [validate::host_key(USER_PUB).expect("key")],
    )
    .expect("target");
    let sealed = vault
        .seal(&account_aad("web01", "root"), b"s3cret")
        .expect("seal");
    tx.execute(
        "INSERT INTO accounts (target, username, kind, ciphertext) VALUES ('web01', 'root', 'password', ?1)",
        [sealed],
    )
    .expect("account");
    tx.execute("INSERT INTO target_groups (name) VALUES ('prod')", [])
        .expect("group");
    tx.execute(
        "INSERT INTO target_group_members (grp, target) VALUES ('prod', 'web01')",
        [],
    )
    .expect("member");
    tx.execute(
        "INSERT INTO grants (user, target, account, conditions) VALUES ('alice', '@prod', 'root', '{\"mfa\":true}')",
        [],
    )
    .expect("grant");
    tx.commit().expect("commit");
}

#[test]
fn a_version_4_store_is_rebuilt_to_version_5_losing_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("psm.db");
    let vault = vault();
    version_4(&path, &vault);
    let mut s = Store::open(&path).expect("migrate");
    let v: i64 = s
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(v, 5);
    let fk: bool = s
        .conn
        .pragma_query_value(None, "foreign_keys", |r| r.get(0))
        .expect("pragma");
    assert!(fk, "foreign keys are back on after the rebuild");
    let snap = s.snapshot(&vault).expect("snapshot");
    assert_eq!(snap.targets.len(), 1);
    assert_eq!(snap.targets[0].groups, vec!["prod".to_string()]);
    assert_eq!(snap.targets[0].listen, None);
    match &snap.accounts[0].credential {
        Credential::Password(p) => assert_eq!(p.expose(), "s3cret"),
        other => panic!("credential {other:?}"),
    }
    assert_eq!(snap.grants.len(), 1);
    assert!(snap.grants[0].conditions.mfa);
    // the children still cascade from the rebuilt parent
    s.remove_target("web01").expect("remove");
    let left: i64 = s
        .conn
        .query_row(
            "SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM target_group_members)",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(left, 0, "accounts and memberships went with their target");
}

#[test]
fn a_tcp_target_has_a_psm_port_and_one_account_without_a_credential() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = Store::open(&tmp.path().join("psm.db")).expect("open");
    let vault = vault();
    s.add_user("alice", None, &[USER_PUB.to_string()])
        .expect("user");
    s.add_tcp_target("db01", "127.0.0.1:5432", "0.0.0.0:15432")
        .expect("tcp target");
    // one psm port per target, and a host name is not an address psm can bind
    let e = s
        .add_tcp_target("db02", "127.0.0.1:5433", "0.0.0.0:15432")
        .expect_err("same port");
    assert!(e.to_string().contains("'db01' already listens"), "{e}");
    let e = s
        .add_tcp_target("db02", "127.0.0.1:5433", "gateway:15433")
        .expect_err("host name");
    assert!(e.to_string().contains("expected IP:PORT"), "{e}");
    // psmctl's generic add cannot make one without its port
    let e = s
        .add_target_with("db03", "127.0.0.1:5434", "", Protocol::Tcp)
        .expect_err("no listen");
    assert!(e.to_string().contains("listens"), "{e}");
    // its account comes with it; no other may be added
    let e = s
        .add_account(
            &vault,
            "db01",
            "postgres",
            &Credential::Password(Secret::new("pw".into())),
        )
        .expect_err("second account");
    assert!(e.to_string().contains("tcp target"), "{e}");
    let c = Conditions {
        unrecorded_tcp: true,
        ..Default::default()
    };
    s.add_grant_with("alice", "db01", psm_control_api::TCP_ACCOUNT, &c)
        .expect("grant");
    let snap = s.snapshot(&vault).expect("snapshot");
    let t = &snap.targets[0];
    assert_eq!(
        (t.protocol, t.listen.as_deref()),
        (Protocol::Tcp, Some("0.0.0.0:15432"))
    );
    assert_eq!(snap.accounts[0].credential, Credential::None);
    assert!(snap.grants[0].conditions.unrecorded_tcp);
    let listed = &s.list_targets().expect("list")[0];
    assert_eq!(listed.listen.as_deref(), Some("0.0.0.0:15432"));

    // a policy document carries it and brings it back whole
    let doc = s.export().expect("export");
    assert_eq!(doc.targets[0].listen.as_deref(), Some("0.0.0.0:15432"));
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let mut fresh = Store::open(&tmp2.path().join("psm.db")).expect("open");
    fresh.import(&doc, false, true).expect("import");
    let snap2 = fresh.snapshot(&vault).expect("snapshot");
    assert_eq!(snap2.targets, snap.targets);
    assert_eq!(snap2.accounts, snap.accounts);
    assert_eq!(snap2.grants, snap.grants);
    // and refuses one without its port
    let mut bad = doc.clone();
    bad.targets[0].listen = None;
    let e = fresh.import(&bad, true, true).expect_err("no listen");
    assert!(e.to_string().contains("targets[0].listen"), "{e}");
}
