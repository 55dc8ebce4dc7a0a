//! The RDP test peers work on their own, without psm: FreeRDP reaches xrdp (TLS security,
//! the local account logs in) and freerdp-shadow (NLA with a SAM file). When these fail, the
//! RDP tests through psm cannot say anything.

use std::time::Duration;

use psm_tests::*;

#[test]
fn freerdp_logs_in_to_xrdp_directly() {
    let xrdp = Xrdp::start();
    let mut client = FreeRdp::start(&xrdp.address(), XRDP_USER, XRDP_PASSWORD, &["/sec:tls"]);
    assert!(
        xrdp.wait_login(XRDP_USER, Duration::from_secs(30)),
        "xrdp did not log {XRDP_USER} in; xrdp log:\n{}\nclient:\n{}",
        xrdp.log(),
        client.log()
    );
    assert!(
        client.wait_screen(Duration::from_secs(30), shows_xlogo),
        "the client's screen never showed the session's xlogo; client:\n{}",
        client.log()
    );
    assert!(client.running());
}

#[test]
fn freerdp_reaches_shadow_with_nla_directly() {
    let shadow = Shadow::start();
    let mut bad = FreeRdp::start(
        &shadow.address(),
        SHADOW_USER,
        "wrong-password",
        &["/sec:nla", "/auth-only"],
    );
    let code = bad.wait(Duration::from_secs(60));
    assert!(
        matches!(code, Some(c) if c != 0),
        "wrong password: exit {code:?}\n{}",
        bad.log()
    );
    let mut client = FreeRdp::start(
        &shadow.address(),
        SHADOW_USER,
        SHADOW_PASSWORD,
        &["/sec:nla"],
    );
    assert!(
        client.wait_screen(Duration::from_secs(30), shows_xlogo),
        "the client's screen never showed the shadowed xlogo; client:\n{}\nshadow:\n{}",
        client.log(),
        shadow.log()
    );
    let target = shadow.display().screenshot();
    assert!(shows_xlogo(&target));
    assert!(client.running());
}
