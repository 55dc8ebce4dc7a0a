//! The sinks against in-process receivers on loopback: TCP framing, TLS with a client
//! certificate, a receiver that goes away and comes back (nothing lost, nothing twice), a
//! receiver down past the bound (the drop is reported), and UDP datagrams.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use psm_control_api::{AuditEvent, AuditKind};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, UdpSocket};

use super::config::{Format, SinkConfig, TlsFiles, Transport};
use super::*;

fn sink(name: &str, transport: Transport, address: String, format: Format) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        transport,
        address,
        format,
        queue_max_events: 1000,
        queue_max_bytes: 1 << 20,
        app_name: "psm".into(),
        hostname: Some("gw1".into()),
        facility: 10,
    }
}

fn notice(seq: u64) -> AuditEvent {
    AuditEvent {
        seq,
        ts_ms: 1_796_304_000_000 + seq,
        origin: "control".into(),
        kind: AuditKind::Notice {
            message: format!("event {seq}"),
            session_id: None,
            kind: None,
            count: None,
        },
    }
}

/// An audit line as `AuditLog::append` hands it over (hash-chain fields and newline included).
fn line(e: AuditEvent) -> Vec<u8> {
    let mut v = serde_json::to_value(&e).expect("json");
    v["prev_hash"] = "00".into();
    let mut l = serde_json::to_vec(&v).expect("json");
    l.push(b'\n');
    l
}

/// Reads one octet-counted frame; `None` at EOF.
async fn frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<String> {
    let mut len = Vec::new();
    loop {
        let b = r.read_u8().await.ok()?;
        if b == b' ' {
            break;
        }
        assert!(b.is_ascii_digit(), "frame length digit, got {b:#x}");
        len.push(b);
        assert!(len.len() < 9, "frame length too long");
    }
    let n: usize = std::str::from_utf8(&len).ok()?.parse().ok()?;
    let mut msg = vec![0u8; n];
    r.read_exact(&mut msg).await.ok()?;
    Some(String::from_utf8(msg).expect("utf8 message"))
}

/// The `seq` a JSON-format syslog message carries.
fn seq_of(msg: &str) -> u64 {
    let json: serde_json::Value =
        serde_json::from_str(&msg[msg.find('{').expect("json")..]).expect("json msg");
    json["seq"].as_u64().expect("seq")
}

async fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status(siem: &Siem) -> SinkStatus {
    siem.status().pop().expect("one sink")
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "psm test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("params");
        p.extended_key_usages = vec![usage];
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "receiver",
    );
    let (client_pem, client_key) = leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "psm");
    let p = Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&p.ca, ca.pem()).expect("write");
    std::fs::write(&p.server_cert, server_pem).expect("write");
    std::fs::write(&p.server_key, server_key).expect("write");
    std::fs::write(&p.client_cert, client_pem).expect("write");
    std::fs::write(&p.client_key, client_key).expect("write");
    p
}

#[tokio::test]
async fn tcp_in_order_and_nothing_lost_or_twice_across_a_receiver_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let siem = Siem::start(
        tmp.path(),
        &[sink("soc", Transport::Tcp, addr.to_string(), Format::Json)],
    )
    .expect("start");
    let tap = siem.tap().expect("tap");
    let (mut conn, _) = listener.accept().await.expect("accept");
    for s in 1..=20 {
        tap.offer(&line(notice(s)));
    }
    let mut got = Vec::new();
    for _ in 1..=20 {
        let m = frame(&mut conn).await.expect("frame");
        assert!(m.starts_with("<"), "{m}");
        assert!(m.contains(" gw1 psm "), "{m}");
        got.push(seq_of(&m));
    }
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    wait("20 delivered", || status(&siem).delivered == 20).await;
    assert!(status(&siem).connected);

    // The receiver goes away; events keep coming and wait on disk.
    drop(conn);
    drop(listener);
    wait("the sink to notice", || !status(&siem).connected).await;
    for s in 21..=40 {
        tap.offer(&line(notice(s)));
    }
    wait("20 queued", || status(&siem).queued == 20).await;
    assert_eq!(status(&siem).delivered, 20);
    assert!(status(&siem).last_error.is_some());

    // It comes back on the same port: the rest arrives, once each, in order.
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("reconnect in time")
        .expect("accept");
    let mut got = Vec::new();
    for _ in 21..=40 {
        got.push(seq_of(&frame(&mut conn).await.expect("frame")));
    }
    assert_eq!(got, (21..=40).collect::<Vec<_>>());
    wait("40 delivered", || status(&siem).delivered == 40).await;
    assert_eq!(status(&siem).queued, 0);
    assert_eq!(status(&siem).dropped, 0);
    siem.stop().await;
    // nothing more after the stop, and the delivered position is on disk
    assert!(frame(&mut conn).await.is_none());
    let state: queue::State = serde_json::from_slice(
        &std::fs::read(tmp.path().join("siem/soc/state.json")).expect("state"),
    )
    .expect("state json");
    assert_eq!((state.delivered_seq, state.delivered), (40, 40));
}

#[tokio::test]
async fn a_sink_down_past_its_bound_reports_the_drop_and_keeps_the_oldest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // a port nobody listens on
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let mut cfg = sink("full", Transport::Tcp, addr.to_string(), Format::Cef);
    cfg.queue_max_events = 3;
    let siem = Siem::start(tmp.path(), &[cfg]).expect("start");
    let notices = Arc::new(Mutex::new(Vec::new()));
    let n = notices.clone();
    siem.forward_notices(move |k| n.lock().expect("lock").push(k));
    let tap = siem.tap().expect("tap");
    for s in 1..=10 {
        tap.offer(&line(notice(s)));
    }
    let st = status(&siem);
    assert_eq!((st.queued, st.dropped, st.dropping), (3, 7, true));
    wait("the drop notice", || {
        notices.lock().expect("lock").len() == 1
    })
    .await;
    match &notices.lock().expect("lock")[0] {
        AuditKind::Notice {
            message,
            kind,
            count,
            ..
        } => {
            assert_eq!(kind.as_deref(), Some(DROP_NOTICE_KIND));
            assert_eq!(*count, Some(1));
            assert!(
                message.contains("SIEM sink full: its queue is full"),
                "{message}"
            );
            assert!(message.contains("first dropped: seq 4"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The receiver comes: the three oldest arrive, then room again reports the total.
    let listener = TcpListener::bind(addr).await.expect("bind");
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("connect in time")
        .expect("accept");
    for want in 1..=3u64 {
        let m = frame(&mut conn).await.expect("frame");
        assert!(m.contains("CEF:0|psm|psm|"), "{m}");
        assert!(m.contains(&format!(" externalId={want} ")), "{m}");
    }
    wait("3 delivered", || status(&siem).queued == 0).await;
    tap.offer(&line(notice(11)));
    let m = frame(&mut conn).await.expect("frame");
    assert!(m.contains(" externalId=11 "), "{m}");
    wait("the end notice", || {
        notices.lock().expect("lock").len() == 2
    })
    .await;
    match &notices.lock().expect("lock")[1] {
        AuditKind::Notice { message, count, .. } => {
            assert_eq!(*count, Some(7));
            assert!(message.contains("7 event(s) were dropped"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let st = status(&siem);
    assert_eq!((st.dropped, st.dropping, st.delivered), (7, false, 4));
    siem.stop().await;
}

#[tokio::test]
async fn tls_with_a_client_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = pki(tmp.path());
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        r.add(CertificateDer::from_pem_file(&p.ca).expect("ca"))
            .expect("add");
        Arc::new(r)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .expect("verifier");
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_file(&p.server_cert).expect("cert")],
            PrivateKeyDer::from_pem_file(&p.server_key).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let files = TlsFiles {
        ca: p.ca.clone(),
        client: Some((p.client_cert.clone(), p.client_key.clone())),
        server_name: "127.0.0.1".into(),
    };
    let siem = Siem::start(
        &tmp.path().join("data"),
        &[sink(
            "tls",
            Transport::Tls(files),
            addr.to_string(),
            Format::Ocsf,
        )],
    )
    .expect("start");
    let tap = siem.tap().expect("tap");
    tap.offer(&line(AuditEvent {
        seq: 7,
        ts_ms: 1_796_304_000_000,
        origin: "relay-r1".into(),
        kind: AuditKind::Command {
            session_id: "s1".into(),
            user: "alice".into(),
            target: "web01".into(),
            account: "root".into(),
            channel: 0,
            line: "uptime".into(),
            decision: "allow".into(),
            rule: None,
            source: "exec".into(),
        },
    }));
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut tls = acceptor
        .accept(tcp)
        .await
        .expect("handshake with the client certificate");
    let certs = tls.get_ref().1.peer_certificates().map(|c| c.len());
    assert_eq!(certs, Some(1), "psm presented its client certificate");
    let m = frame(&mut tls).await.expect("frame");
    assert!(m.contains(" command - {"), "{m}");
    let ocsf: serde_json::Value =
        serde_json::from_str(&m[m.find('{').expect("json")..]).expect("json");
    assert_eq!(ocsf["class_uid"], 1007);
    assert_eq!(ocsf["process"]["cmd_line"], "uptime");
    assert_eq!(ocsf["metadata"]["uid"], "7");
    wait("delivered", || status(&siem).delivered == 1).await;
    siem.stop().await;
}

#[tokio::test]
async fn tls_refuses_a_receiver_the_ca_did_not_sign() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("a")).expect("dir");
    std::fs::create_dir_all(tmp.path().join("b")).expect("dir");
    let ours = pki(&tmp.path().join("a"));
    let theirs = pki(&tmp.path().join("b"));
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_file(&theirs.server_cert).expect("cert")],
        PrivateKeyDer::from_pem_file(&theirs.server_key).expect("key"),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let files = TlsFiles {
        ca: ours.ca.clone(),
        client: None,
        server_name: "127.0.0.1".into(),
    };
    let siem = Siem::start(
        &tmp.path().join("data"),
        &[sink(
            "tls",
            Transport::Tls(files),
            addr.to_string(),
            Format::Json,
        )],
    )
    .expect("start");
    siem.tap().expect("tap").offer(&line(notice(1)));
    let (tcp, _) = listener.accept().await.expect("accept");
    assert!(acceptor.accept(tcp).await.is_err(), "the handshake fails");
    wait("the error in status", || {
        status(&siem)
            .last_error
            .is_some_and(|e| e.contains("connect"))
    })
    .await;
    let st = status(&siem);
    assert_eq!((st.connected, st.queued, st.delivered), (false, 1, 0));
    siem.stop().await;
}

#[tokio::test]
async fn udp_one_message_per_datagram() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = rx.local_addr().expect("addr");
    let siem = Siem::start(
        tmp.path(),
        &[sink("u", Transport::Udp, addr.to_string(), Format::Json)],
    )
    .expect("start");
    let tap = siem.tap().expect("tap");
    for s in 1..=5 {
        tap.offer(&line(notice(s)));
    }
    let mut buf = vec![0u8; 70_000];
    for want in 1..=5 {
        let n = tokio::time::timeout(Duration::from_secs(20), rx.recv(&mut buf))
            .await
            .expect("datagram in time")
            .expect("recv");
        let m = std::str::from_utf8(&buf[..n]).expect("utf8");
        assert!(m.starts_with("<85>1 "), "authpriv.notice: {m}");
        assert_eq!(seq_of(m), want);
    }
    siem.stop().await;
}
