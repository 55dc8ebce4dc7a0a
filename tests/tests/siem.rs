//! SIEM export against a real syslog receiver (issue #7, "SIEM export"): rsyslogd, run as its own
//! process with a config file written here, listening on loopback for UDP, TCP (octet counting)
//! and TLS (gtls, client certificate required), writes what it parsed as RFC 5424 into one file
//! per transport. The tests check:
//! - every audit event reaches each transport in each format (JSON, CEF, OCSF), once, with the
//!   OCSF classes for authentication, SSH sessions and commands;
//! - a receiver stopped and restarted loses and duplicates nothing (TCP and TLS), and neither
//!   does a psm-control killed and restarted;
//! - a sink down past its bound keeps the oldest events, drops the newer ones for itself only,
//!   and says so (audit notice, log line, `psmctl status`), while the audit log drops nothing.

use psm_tests::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("psm-siem")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
const DELIVERY: Duration = Duration::from_secs(30);

/// A CA, rsyslog's server certificate for 127.0.0.1, and psm's client certificate (PEM files).
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    fs::create_dir_all(dir).expect("pki dir");
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "psm siem test CA");
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
        "localhost",
    );
    let (client_pem, client_key) = leaf(
        vec!["psm".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "psm",
    );
    let p = Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    for (path, text) in [
        (&p.ca, ca.pem()),
        (&p.server_cert, server_pem),
        (&p.server_key, server_key),
        (&p.client_cert, client_pem),
        (&p.client_key, client_key),
    ] {
        fs::write(path, text).expect("write pem");
    }
    p
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind udp")
        .local_addr()
        .expect("addr")
        .port()
}

/// rsyslogd in the foreground with its own config, pid file and work directory; killed on
/// drop. One output file per transport: `%protocol-version% %app-name% %msgid% %hostname%
/// %msg%`, so a line starts with `1 ` only when rsyslog parsed the message as RFC 5424.
struct Rsyslog {
    dir: PathBuf,
    udp: u16,
    tcp: u16,
    tls: u16,
    child: Option<Child>,
}

impl Rsyslog {
    fn start(dir: &Path, pki: &Pki) -> Rsyslog {
        assert!(
            Path::new(RSYSLOGD).exists(),
            "{RSYSLOGD} is missing: install rsyslog and rsyslog-gnutls (scripts/test.sh does)"
        );
        fs::create_dir_all(dir.join("work")).expect("rsyslog dir");
        let mut r = Rsyslog {
            dir: dir.to_path_buf(),
            udp: free_udp_port(),
            tcp: free_port(),
            tls: free_port(),
            child: None,
        };
        let d = dir.display();
        let conf = format!(
            r#"global(workDirectory="{d}/work" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imudp")
module(load="imtcp" maxSessions="200")
template(name="psm" type="string" string="%protocol-version% %app-name% %msgid% %hostname% %msg%\n")
ruleset(name="udp") {{ action(type="omfile" file="{d}/udp.log" template="psm") }}
ruleset(name="tcp") {{ action(type="omfile" file="{d}/tcp.log" template="psm") }}
ruleset(name="tls") {{ action(type="omfile" file="{d}/tls.log" template="psm") }}
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="udp")
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="tcp")
input(type="imtcp" address="127.0.0.1" port="{tls}" ruleset="tls"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
"#,
            ca = pki.ca.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
            udp = r.udp,
            tcp = r.tcp,
            tls = r.tls,
        );
        fs::write(dir.join("rsyslog.conf"), conf).expect("rsyslog.conf");
        r.run();
        r
    }

    /// Starts rsyslogd and waits (15 s at most) until both TCP ports accept.
    fn run(&mut self) {
        assert!(self.child.is_none(), "rsyslogd already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("rsyslogd.out"))
            .expect("log");
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {RSYSLOGD}: {e}"));
        self.child = Some(child);
        let ok = wait_for(Duration::from_secs(15), || {
            port_open(self.tcp) && port_open(self.tls)
        });
        assert!(ok, "rsyslogd does not listen within 15 s:\n{}", self.out());
    }

    /// SIGTERM, and waits for it to exit (SIGKILL after 10 s).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_child(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = wait_child(&mut c, Duration::from_secs(5));
            }
        }
    }

    fn out(&self) -> String {
        file_tail(&self.dir.join("rsyslogd.out"), 4000)
    }

    /// What rsyslog wrote for `transport`: (protocol version, app-name, msgid, hostname, msg).
    fn lines(&self, transport: &str) -> Vec<[String; 5]> {
        fs::read_to_string(self.dir.join(format!("{transport}.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut it = l.splitn(5, ' ');
                std::array::from_fn(|_| it.next().unwrap_or("").trim().to_string())
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- rsyslogd ----\n{}", self.out());
        }
        self.stop();
    }
}

/// The audit `seq` a message carries, whatever its format.
fn seq_of(format: &str, msg: &str) -> u64 {
    match format {
        "json" => serde_json::from_str::<Value>(msg).expect("json")["seq"]
            .as_u64()
            .expect("seq"),
        "ocsf" => serde_json::from_str::<Value>(msg).expect("ocsf")["metadata"]["sequence"]
            .as_u64()
            .expect("metadata.sequence"),
        _ => msg
            .split(' ')
            .find_map(|kv| kv.strip_prefix("externalId="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no externalId in {msg}")),
    }
}

/// Messages of one sink (by app-name) in one transport's file, by `seq`, in arrival order.
fn by_seq(rs: &Rsyslog, transport: &str, app: &str, format: &str) -> Vec<(u64, [String; 5])> {
    rs.lines(transport)
        .into_iter()
        .filter(|l| l[1] == app)
        .map(|l| (seq_of(format, &l[4]), l))
        .collect()
}

fn sink_toml(
    name: &str,
    transport: &str,
    port: u16,
    format: &str,
    pki: &Pki,
    extra: &str,
) -> String {
    let tls = if transport == "tls" {
        format!(
            "ca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        )
    } else {
        String::new()
    };
    format!(
        "[[siem.sink]]\nname = \"{name}\"\ntransport = \"{transport}\"\naddress = \"127.0.0.1:{port}\"\nformat = \"{format}\"\napp_name = \"{name}\"\nhostname = \"psm-test-gw\"\n{tls}{extra}\n"
    )
}

fn audit_seqs(psm: &Psm) -> Vec<u64> {
    psm.audit()
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

fn sink_status(psm: &Psm, name: &str) -> Value {
    psm.status()["siem"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no sink {name} in psmctl status"))
}

#[test]
fn every_transport_in_every_format_reaches_rsyslog() {
    let scratch = scratch();
    let pki = pki(&scratch.path().join("pki"));
    let rs = Rsyslog::start(&scratch.path().join("rsyslog"), &pki);
    let mut config = String::new();
    for (transport, port) in [("udp", rs.udp), ("tcp", rs.tcp), ("tls", rs.tls)] {
        for format in ["json", "cef", "ocsf"] {
            config.push_str(&sink_toml(
                &format!("{transport}-{format}"),
                transport,
                port,
                format,
                &pki,
                "",
            ));
        }
    }
    let world = World::build_opts(
        PsmMode::Up,
        Sshd::start(),
        PsmOpts {
            config: Some(config),
            ..Default::default()
        },
    );
    // a failed login, a command, a session
    let out = run_cmd(
        world
            .ssh_password("alice@psmtarget@web01", "wrong-password-1")
            .arg("true"),
        None,
        CMD_TIMEOUT,
    );
    assert!(!out.success(), "{}", out.describe());
    let out = run_cmd(world.ssh().arg("echo siem-check"), None, CMD_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    world
        .psm
        .wait_audit("the siem-check command's session end", DELIVERY, |e| {
            jstr(e, "event") == "command" && jstr(e, "line") == "echo siem-check"
        });
    world.assert_all_sessions_ended();
    let audit = world.psm.audit();
    let last = audit.last().and_then(|e| e["seq"].as_u64()).expect("seq");
    let kinds: BTreeMap<u64, String> = audit
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().expect("seq"),
                jstr(e, "event").to_string(),
            )
        })
        .collect();
    for transport in ["udp", "tcp", "tls"] {
        for format in ["json", "cef", "ocsf"] {
            let app = format!("{transport}-{format}");
            let mut got = Vec::new();
            let ok = wait_for(DELIVERY, || {
                got = by_seq(&rs, transport, &app, format);
                got.iter().filter(|(s, _)| *s <= last).count() >= last as usize
            });
            let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).filter(|s| *s <= last).collect();
            assert!(
                ok,
                "{app}: want seq 1..={last}, got {seqs:?}\nstatus: {}",
                world.psm.status()
            );
            assert_eq!(
                seqs,
                (1..=last).collect::<Vec<_>>(),
                "{app}: in order, once each"
            );
            for (seq, l) in &got {
                assert_eq!(l[0], "1", "{app}: RFC 5424 (protocol version 1): {l:?}");
                assert_eq!(l[3], "psm-test-gw", "{app}: hostname: {l:?}");
                if let Some(kind) = kinds.get(seq) {
                    assert_eq!(&l[2], kind, "{app}: MSGID is the event kind: {l:?}");
                }
            }
            let msg = |kind: &str| -> &str {
                got.iter()
                    .find(|(s, _)| kinds.get(s).map(String::as_str) == Some(kind))
                    .map(|(_, l)| l[4].as_str())
                    .unwrap_or_else(|| panic!("{app}: no {kind} message"))
            };
            match format {
                "json" => {
                    for (seq, l) in &got {
                        let v: Value = serde_json::from_str(&l[4]).expect("json");
                        let want = audit.iter().find(|e| e["seq"] == *seq);
                        if let Some(want) = want {
                            assert_eq!(&v, want, "{app}: the audit event as in audit.jsonl");
                        }
                    }
                }
                "cef" => {
                    let m = msg("command");
                    assert!(m.starts_with("CEF:0|psm|psm|"), "{app}: {m}");
                    assert!(m.contains("|command|command allowed|3|"), "{app}: {m}");
                    assert!(m.contains(" suser=alice "), "{app}: {m}");
                    let m = msg("auth_failure");
                    assert!(
                        m.contains("|auth_failure|authentication failed|6|"),
                        "{app}: {m}"
                    );
                    assert!(m.contains(" src=127.0.0.1 "), "{app}: {m}");
                }
                _ => {
                    let v: Value = serde_json::from_str(msg("auth_success")).expect("ocsf");
                    assert_eq!(v["class_uid"], 3002, "{app}: {v}");
                    assert_eq!(v["user"]["name"], "alice", "{app}: {v}");
                    let v: Value = serde_json::from_str(msg("auth_failure")).expect("ocsf");
                    assert_eq!(
                        (v["class_uid"].clone(), v["status_id"].clone()),
                        (3002.into(), 2.into()),
                        "{app}: {v}"
                    );
                    let v: Value = serde_json::from_str(msg("session_start")).expect("ocsf");
                    assert_eq!(
                        (v["class_uid"].clone(), v["activity_id"].clone()),
                        (4007.into(), 1.into()),
                        "{app}: {v}"
                    );
                    let v: Value = serde_json::from_str(msg("session_end")).expect("ocsf");
                    assert_eq!(
                        (v["class_uid"].clone(), v["activity_id"].clone()),
                        (4007.into(), 2.into()),
                        "{app}: {v}"
                    );
                    let cmd = got
                        .iter()
                        .map(|(_, l)| serde_json::from_str::<Value>(&l[4]).expect("ocsf"))
                        .find(|v| v["process"]["cmd_line"] == "echo siem-check")
                        .unwrap_or_else(|| {
                            panic!("{app}: no OCSF process activity for the command")
                        });
                    assert_eq!(cmd["class_uid"], 1007, "{app}: {cmd}");
                    assert_eq!(cmd["type_uid"], 100701, "{app}: {cmd}");
                    assert_eq!(cmd["actor"]["user"]["name"], "alice", "{app}: {cmd}");
                }
            }
        }
    }
    let status = world.psm.psmctl_ok(&["status"], None);
    for name in ["udp-json", "tcp-cef", "tls-ocsf"] {
        assert!(
            status.contains(&format!("siem sink {name} (")),
            "psmctl status shows the sink {name}:\n{status}"
        );
    }
    let tls = sink_status(&world.psm, "tls-ocsf");
    assert_eq!(tls["connected"], true, "{tls}");
    assert_eq!(tls["dropped"], 0, "{tls}");
}

#[test]
fn a_receiver_stopped_and_restarted_loses_and_duplicates_nothing() {
    let scratch = scratch();
    let pki = pki(&scratch.path().join("pki"));
    let mut rs = Rsyslog::start(&scratch.path().join("rsyslog"), &pki);
    let config = format!(
        "{}{}",
        sink_toml("tcp-json", "tcp", rs.tcp, "json", &pki, ""),
        sink_toml("tls-cef", "tls", rs.tls, "cef", &pki, "")
    );
    let psm = Psm::start_opts(
        PsmMode::Up,
        PsmOpts {
            config: Some(config),
            ..Default::default()
        },
    );
    let sinks = [("tcp", "tcp-json", "json"), ("tls", "tls-cef", "cef")];
    let delivered_up_to = |rs: &Rsyslog, n: u64| {
        sinks.iter().all(|(t, app, f)| {
            by_seq(rs, t, app, f)
                .iter()
                .filter(|(s, _)| *s <= n)
                .count()
                >= n as usize
        })
    };
    for i in 0..5 {
        psm.psmctl_ok(&["group", "add", &format!("before{i}")], None);
    }
    let n = *audit_seqs(&psm).last().expect("events");
    assert!(
        wait_for(DELIVERY, || delivered_up_to(&rs, n)),
        "the first {n} events did not arrive; status: {}",
        psm.status()
    );

    rs.stop();
    for (_, name, _) in sinks {
        let ok = wait_for(DELIVERY, || sink_status(&psm, name)["connected"] == false);
        assert!(ok, "{name} still connected: {}", sink_status(&psm, name));
    }
    for i in 0..10 {
        psm.psmctl_ok(&["group", "add", &format!("while-down{i}")], None);
    }
    let m = *audit_seqs(&psm).last().expect("events");
    for (_, name, _) in sinks {
        let st = sink_status(&psm, name);
        assert!(st["queued"].as_u64() >= Some(m - n), "{name}: {st}");
        assert_eq!(st["connected"], false, "{name}: {st}");
    }
    let status = psm.psmctl_ok(&["status"], None);
    assert!(status.contains("NOT CONNECTED"), "{status}");

    rs.run();
    assert!(
        wait_for(DELIVERY, || delivered_up_to(&rs, m)),
        "events 1..={m} did not all arrive after the restart; status: {}",
        psm.status()
    );
    psm.psmctl_ok(&["group", "add", "after"], None);
    let before_kill = *audit_seqs(&psm).last().expect("events");
    assert!(wait_for(DELIVERY, || delivered_up_to(&rs, before_kill)));

    // psm-control killed (no shutdown of its own) and restarted by psm up: it resumes from the
    // delivered position it saved, so nothing is sent again.
    let data = psm.data_dir().display().to_string();
    let control = pids_matching(&data, Some("psm-control"));
    assert_eq!(control.len(), 1, "one psm-control: {control:?}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(control[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let restarted = wait_for(DELIVERY, || {
        let now = pids_matching(&data, Some("psm-control"));
        !now.is_empty() && !now.contains(&control[0]) && psm.psmctl(&["status"], None).success()
    });
    assert!(
        restarted,
        "psm up did not restart psm-control:\n{}",
        psm.logs()
    );
    psm.psmctl_ok(&["group", "add", "after-control-restart"], None);
    let last = *audit_seqs(&psm).last().expect("events");
    assert!(
        wait_for(DELIVERY, || delivered_up_to(&rs, last)),
        "events after psm-control's restart did not arrive; status: {}",
        psm.status()
    );
    for (t, app, f) in sinks {
        let seqs: Vec<u64> = by_seq(&rs, t, app, f).iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=last).collect::<Vec<_>>(),
            "{app}: every event once, in order, across the receiver's and psm-control's restarts"
        );
        let st = sink_status(&psm, app);
        assert_eq!(
            (st["queued"].as_u64(), st["dropped"].as_u64()),
            (Some(0), Some(0)),
            "{st}"
        );
    }
}

#[test]
fn a_sink_down_past_its_bound_reports_the_drop() {
    let scratch = scratch();
    let pki = pki(&scratch.path().join("pki"));
    // rsyslog is set up (ports chosen) but not running while the queue fills
    let mut rs = Rsyslog::start(&scratch.path().join("rsyslog"), &pki);
    rs.stop();
    let config = format!(
        "{}{}",
        sink_toml(
            "small",
            "tcp",
            rs.tcp,
            "json",
            &pki,
            "queue_max_events = 5\n"
        ),
        sink_toml("roomy", "tls", rs.tls, "json", &pki, "")
    );
    let psm = Psm::start_opts(
        PsmMode::Up,
        PsmOpts {
            config: Some(config),
            ..Default::default()
        },
    );
    for i in 0..10 {
        psm.psmctl_ok(&["group", "add", &format!("g{i}")], None);
    }
    let notice = psm.wait_audit("the drop notice", DELIVERY, |e| {
        jstr(e, "event") == "notice" && jstr(e, "kind") == "siem events dropped"
    });
    let message = jstr(&notice, "message").to_string();
    assert!(
        message.starts_with("SIEM sink small: its queue is full (5 events"),
        "{message}"
    );
    let st = sink_status(&psm, "small");
    assert_eq!(st["queued"], 5, "{st}");
    assert_eq!(st["dropping"], true, "{st}");
    let dropped = st["dropped"].as_u64().expect("dropped");
    assert!(dropped >= 5, "{st}");
    let roomy = sink_status(&psm, "roomy");
    assert_eq!(roomy["dropped"], 0, "only the full sink drops: {roomy}");
    let status = psm.psmctl_ok(&["status"], None);
    assert!(status.contains("DROPPING NOW"), "{status}");
    let log = fs::read_to_string(psm.work_dir().parent().expect("dir").join("psm-up.log"))
        .unwrap_or_default();
    assert!(
        log.contains("SIEM sink is dropping events") && log.contains("small"),
        "a log line says so:\n{}",
        psm.logs()
    );
    // The audit log itself lost nothing.
    let seqs = audit_seqs(&psm);
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // The receiver comes back: the five oldest arrive, then, once there is room, a notice
    // with the total.
    rs.run();
    let small = |rs: &Rsyslog| -> Vec<u64> {
        by_seq(rs, "tcp", "small", "json")
            .iter()
            .map(|(s, _)| *s)
            .collect()
    };
    assert!(
        wait_for(DELIVERY, || small(&rs).len() >= 5),
        "{:?}",
        small(&rs)
    );
    assert_eq!(small(&rs)[..5], [1, 2, 3, 4, 5], "the oldest were kept");
    psm.psmctl_ok(&["group", "add", "after"], None);
    let end = psm.wait_audit("the end-of-drop notice", DELIVERY, |e| {
        jstr(e, "event") == "notice"
            && jstr(e, "kind") == "siem events dropped"
            && jstr(e, "message").contains("were dropped while its queue was full")
    });
    assert!(end["count"].as_u64() >= Some(dropped), "{end}");
    let end_seq = end["seq"].as_u64().expect("seq");
    assert!(
        wait_for(DELIVERY, || small(&rs).contains(&end_seq)),
        "the end notice reaches the sink: {:?}",
        small(&rs)
    );
    // the roomy sink got everything, in order
    let last = *audit_seqs(&psm).last().expect("events");
    let roomy = |rs: &Rsyslog| -> Vec<u64> {
        by_seq(rs, "tls", "roomy", "json")
            .iter()
            .map(|(s, _)| *s)
            .collect()
    };
    assert!(wait_for(DELIVERY, || roomy(&rs).len() >= last as usize));
    assert_eq!(
        roomy(&rs)[..last as usize],
        (1..=last).collect::<Vec<_>>()[..]
    );
}
