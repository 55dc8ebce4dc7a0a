//! Zero-copy TCP pass-through: a `tcp` target served on a psm port of its own, reachable only
//! from the source address of a user holding a lease (an SSH login to `tcp@TARGET`) under a
//! grant that allows it unrecorded. Real OpenSSH for the lease; a plain TCP echo server as the
//! target (a database port would be the same bytes).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use psm_tests::*;

const MIB: u64 = 1 << 20;

/// A lease held by `ssh LOGIN` with stdin kept open; killed on drop.
struct Lease {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Lease {
    fn open(w: &World, first: &[&str]) -> Lease {
        let mut c = w.ssh_with(first, "alice@tcp@db01", &w.alice_key);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("ssh");
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Lease {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// The first line containing `needle`; panics with what came instead.
    fn line(&self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?} from the lease; got {seen:?}");
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bytes a transfer sends: xorshift64, so the receiver checks them without a copy.
struct Pattern(u64, [u8; 8], usize);

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern(seed | 1, [0; 8], 8)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.2 == 8 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.1 = self.0.to_le_bytes();
                self.2 = 0;
            }
            *b = self.1[self.2];
            self.2 += 1;
        }
    }
}

/// A connection to psm's port from `source`.
fn connect_from(source: &str, port: u16) -> TcpStream {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from: SocketAddr = format!("{source}:0").parse().expect("addr");
    s.bind(&from.into()).expect("bind source");
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    s.connect(&to.into()).expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

/// Whether psm closed the connection without relaying (EOF or reset, no byte echoed).
fn closed_at_once(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(b"hello?\n");
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

/// Sends `len` bytes of `Pattern(seed)` and reads the echo back, checking every byte; returns
/// how many came back intact before the end (all of them on success).
fn echo_transfer(s: TcpStream, seed: u64, len: u64) -> u64 {
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let mut p = Pattern::new(seed);
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < len {
            let n = buf.len().min((len - sent) as usize);
            p.fill(&mut buf[..n]);
            if w.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
        }
        let _ = w.shutdown(Shutdown::Write);
    });
    let mut r = s;
    let mut expect = Pattern::new(seed);
    let (mut buf, mut want) = (vec![0u8; 256 * 1024], vec![0u8; 256 * 1024]);
    let mut got = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        expect.fill(&mut want[..n]);
        assert!(buf[..n] == want[..n], "byte mismatch after {got} bytes");
        got += n as u64;
    }
    writer.join().expect("writer");
    got
}

/// An echo transfer of 4 GiB (`seed`'s pattern) on `s` runs, then `session` is killed: the
/// transfer is cut within 3 s, having moved some of its bytes and not all.
fn kill_cuts_a_transfer(w: &World, s: TcpStream, seed: u64, session: &str) {
    let probe = s.try_clone().expect("clone");
    let transfer = std::thread::spawn(move || echo_transfer(s, seed, 4096 * MIB));
    // the transfer is running once an echo comes back through psm
    let mut one = [0u8; 1];
    probe.set_read_timeout(Some(Duration::from_secs(10))).ok();
    assert_eq!(
        probe.peek(&mut one).map_err(|e| e.kind()),
        Ok(1),
        "an echo came back"
    );
    let killed = Instant::now();
    w.psm.psmctl_ok(
        &["sessions", "kill", session, "--reason", "incident 9"],
        None,
    );
    let moved = transfer.join().expect("transfer");
    let took = killed.elapsed();
    assert!(
        moved > 0 && moved < 4096 * MIB,
        "the transfer ran ({moved} bytes) and was cut, not finished"
    );
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
}

fn wait_event(
    w: &World,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    w.psm.wait_audit(what, Duration::from_secs(10), pred)
}

/// Adds the `tcp` target db01 in front of the echo server on `echo`, served on a psm port of
/// its own; waits until psm serves it. Returns the port and its `127.0.0.1:PORT`.
/// `psmctl target add db01 --protocol tcp`: the echo server on `echo`, served on `listen`.
fn add_db01(w: &World, echo: u16, listen: &str) -> String {
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "db01",
            "--protocol",
            "tcp",
            "--address",
            &format!("127.0.0.1:{echo}"),
            "--listen",
            listen,
        ],
        None,
    )
}

fn tcp_target(w: &World, echo: u16) -> (u16, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let added = add_db01(w, echo, &listen);
    assert!(added.contains("added tcp target db01"), "{added}");
    let list = w.psm.psmctl_ok(&["target", "list"], None);
    assert!(list.contains(&format!("psm port {listen}")), "{list}");
    w.psm.wait_policy_applied();
    assert!(
        wait_for(Duration::from_secs(10), || port_open(port)),
        "psm serves the tcp target's port"
    );
    (port, listen)
}

#[test]
fn tcp_pass_through_needs_a_lease_moves_256_mib_intact_and_is_audited_and_killed() {
    let w = World::new();
    let echo = echo_server(8);
    let (port, listen) = tcp_target(&w, echo);

    // no lease: the connection is closed before anything reaches the target, and audited
    assert!(closed_at_once(connect_from("127.0.0.1", port)));
    let e = wait_event(&w, "no_lease", |e| jstr(e, "reason_code") == "no_lease");
    assert_eq!(jstr(&e, "event"), "session_denied");
    assert_eq!(jstr(&e, "protocol"), "tcp", "{e}");
    assert!(jstr(&e, "source").starts_with("127.0.0.1:"), "{e}");
    assert!(jstr(&e, "reason").contains("db01"), "{e}");

    // a grant that does not allow the payload unrecorded opens no lease
    w.psm
        .psmctl_ok(&["grant", "add", "alice", "tcp@db01"], None);
    let out = run_ssh(&mut w.ssh_as("alice@tcp@db01", &w.alice_key));
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(
        out.stderr_str()
            .contains("does not allow unrecorded pass-through"),
        "{}",
        out.describe()
    );
    wait_event(&w, "unrecorded_not_allowed", |e| {
        jstr(e, "reason_code") == "unrecorded_not_allowed"
    });

    // with --unrecorded-tcp: the lease opens and says where
    w.psm
        .psmctl_ok(&["grant", "remove", "alice", "tcp@db01"], None);
    w.psm.psmctl_ok(
        &["grant", "add", "alice", "tcp@db01", "--unrecorded-tcp"],
        None,
    );
    let lease = Lease::open(&w, &["-T"]);
    let line = lease.line("is open to");
    assert!(
        line.contains(&format!("db01 is open to 127.0.0.1 on {listen}")),
        "{line}"
    );
    let start = wait_event(&w, "lease session_start", |e| {
        jstr(e, "event") == "session_start" && jstr(e, "target") == "db01"
    });
    let session = jstr(&start, "session_id").to_string();
    assert_eq!(jstr(&start, "account"), "tcp");

    // another source address has no lease
    assert!(closed_at_once(connect_from("127.0.0.2", port)));
    let e = wait_event(&w, "no_lease from 127.0.0.2", |e| {
        jstr(e, "reason_code") == "no_lease" && jstr(e, "source").starts_with("127.0.0.2:")
    });
    assert_eq!(jstr(&e, "side"), "policy");

    // 256 MiB each way through the lease's psm port, every byte checked, then audited exactly
    let len = 256 * MIB;
    let got = echo_transfer(connect_from("127.0.0.1", port), 1, len);
    assert_eq!(got, len, "the whole echo came back");
    let f = wait_event(&w, "tcp forward", |e| {
        jstr(e, "event") == "forward" && jstr(e, "kind") == "tcp"
    });
    assert_eq!(jstr(&f, "session_id"), session);
    assert_eq!(jstr(&f, "user"), "alice");
    assert_eq!(
        (f["bytes_up"].as_u64(), f["bytes_down"].as_u64()),
        (Some(len), Some(len)),
        "{f}"
    );
    assert!(
        jstr(&f, "destination").starts_with(&format!("127.0.0.1:{echo} from 127.0.0.1:")),
        "{f}"
    );
    // from where, who, when and for how long
    let source = jstr(&f, "source");
    assert!(
        source.starts_with("127.0.0.1:") && jstr(&f, "destination").ends_with(source),
        "{f}"
    );
    let duration = f["duration_ms"].as_u64().expect("duration_ms");
    assert!(duration > 0, "{f}");
    assert!(f["ts_ms"].as_u64().is_some_and(|t| t > duration), "{f}");

    // a kill of the lease cuts a transfer in flight within a second or two
    kill_cuts_a_transfer(&w, connect_from("127.0.0.1", port), 2, &session);
    let end = wait_event(&w, "lease session_end", |e| {
        jstr(e, "event") == "session_end" && jstr(e, "session_id") == session
    });
    assert_eq!(jstr(&end, "side"), "operator", "{end}");
    assert!(
        end["bytes_up"].as_u64().unwrap_or(0) >= len,
        "the lease's session counts its connections' bytes: {end}"
    );
    let cut = wait_event(&w, "cut forward", |e| {
        jstr(e, "event") == "forward" && jstr(e, "kind") == "tcp" && e["channel"] == 2
    });
    assert_eq!(jstr(&cut, "session_id"), session);
    drop(lease);
    assert!(
        closed_at_once(connect_from("127.0.0.1", port)),
        "no lease after the kill"
    );

    // Ctrl-C in the lease's terminal ends it: ssh exits 0, the port is closed to us again
    let mut lease = Lease::open(&w, &["-tt"]);
    lease.line("is open to");
    let s = connect_from("127.0.0.1", port);
    assert_eq!(echo_transfer(s, 3, MIB), MIB);
    let mut stdin = lease.stdin.take().expect("stdin");
    stdin.write_all(b"\x03").expect("ctrl-c");
    let status = wait_child(&mut lease.child, Duration::from_secs(10)).expect("ssh exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        closed_at_once(connect_from("127.0.0.1", port)),
        "no lease after Ctrl-C"
    );
    w.assert_all_sessions_ended();
}

#[test]
fn a_lease_relays_at_most_its_cap_of_connections_at_once() {
    let w = World::new();
    let echo = echo_server(400);
    let (port, _) = tcp_target(&w, echo);
    w.psm.psmctl_ok(
        &["grant", "add", "alice", "tcp@db01", "--unrecorded-tcp"],
        None,
    );
    w.psm.wait_policy_applied();
    let lease = Lease::open(&w, &["-T"]);
    lease.line("is open to");
    let relay = w.psm.relay_pids()[0];
    // 300 connections from the lease's address at once: 256 reach the target, the rest are
    // refused and audited
    let held: Vec<TcpStream> = (0..300).map(|_| connect_from("127.0.0.1", port)).collect();
    let e = wait_event(&w, "lease_connections", |e| {
        jstr(e, "reason_code") == "lease_connections"
    });
    assert_eq!(jstr(&e, "event"), "session_denied");
    assert!(
        wait_for(Duration::from_secs(10), || connections_to(relay, echo)
            == 256),
        "the relay holds {} connections to the target",
        connections_to(relay, echo)
    );
    // a worker on io_uring waits for them on its ring, the epoll fallback on its epoll
    // (once each is set up: a dial is on the runtime's epoll until it connects)
    let on_epoll = !w.psm.relay_on_io_uring();
    let want = if on_epoll { 256 } else { 0 };
    assert!(
        wait_for(Duration::from_secs(10), || {
            epoll_watched_connections_to(relay, echo) == want
        }),
        "{} pass-through sockets in the relay's epoll, not {want} (relay on {})",
        epoll_watched_connections_to(relay, echo),
        if on_epoll { "epoll" } else { "io_uring" }
    );
    // closed, they give their places back
    drop(held);
    assert!(
        wait_for(Duration::from_secs(10), || connections_to(relay, echo) == 0),
        "the relay still holds {} connections to the target",
        connections_to(relay, echo)
    );
    assert_eq!(echo_transfer(connect_from("127.0.0.1", port), 7, MIB), MIB);
    drop(lease);
}

/// A `tcp` target through an SSH local forward on its login (`ssh -N -L LOCAL:db01:PORT
/// alice@tcp@db01`): the grant allows `forward-local` (and, as every grant of a tcp target,
/// `--unrecorded-tcp`); psm dials the target itself. The bytes come back intact, the forward is
/// one `forward` event with them, the session's recording holds them (they crossed psm inside
/// SSH), a forward to anything but the target is refused, and a kill cuts the forward.
#[test]
fn a_tcp_target_through_an_ssh_local_forward_is_relayed_recorded_audited_and_killed() {
    let w = World::new();
    let echo = echo_server(8);
    let (_port, _listen) = tcp_target(&w, echo);
    w.psm.psmctl_ok(
        &[
            "grant",
            "add",
            "alice",
            "tcp@db01",
            "--unrecorded-tcp",
            "--allow",
            "forward-local",
        ],
        None,
    );
    w.psm.wait_policy_applied();
    // the other forward names a port on the relay's host that is not the target
    let elsewhere = echo_server(1);
    let (local, stray) = (free_port(), free_port());
    let mark = w.psm.audit_mark();
    let mut ssh = w.ssh_with(
        &[
            "-N",
            "-L",
            &format!("{local}:db01:{echo}"),
            "-L",
            &format!("{stray}:127.0.0.1:{elsewhere}"),
        ],
        "alice@tcp@db01",
        &w.alice_key,
    );
    let mut ssh = ssh
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    assert!(
        wait_for(Duration::from_secs(15), || port_open(local)),
        "ssh listens on its forward's port"
    );

    // 32 MiB each way, every byte checked
    let len = 32 * MIB;
    let s = TcpStream::connect(("127.0.0.1", local)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    assert_eq!(echo_transfer(s, 4, len), len, "the whole echo came back");
    let f = w
        .psm
        .wait_audit_after(mark, "the forward", Duration::from_secs(15), |e| {
            // (ssh's port was probed first: that forward moved nothing)
            jstr(e, "event") == "forward"
                && jstr(e, "kind") == "local"
                && e["bytes_up"].as_u64() == Some(len)
        });
    assert_eq!(jstr(&f, "destination"), format!("db01:{echo}"), "{f}");
    assert_eq!(jstr(&f, "user"), "alice");
    assert_eq!(jstr(&f, "target"), "db01");
    assert_eq!(
        (f["bytes_up"].as_u64(), f["bytes_down"].as_u64()),
        (Some(len), Some(len)),
        "{f}"
    );
    let session = jstr(&f, "session_id").to_string();
    let start = w
        .psm
        .wait_audit_after(mark, "session_start", Duration::from_secs(10), |e| {
            jstr(e, "event") == "session_start" && jstr(e, "session_id") == session
        });
    assert_eq!(jstr(&start, "account"), "tcp");
    assert_ne!(start["recorded"], false, "the session is recorded: {start}");
    let recording = jstr(&start, "recording_id").to_string();

    // a forward to anything but the target is refused, and audited
    let mut s = TcpStream::connect(("127.0.0.1", stray)).expect("connect to ssh's port");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let _ = s.write_all(b"hello?\n");
    let mut buf = [0u8; 16];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "the refused forward carried nothing"
    );
    let d = w
        .psm
        .wait_audit_after(mark, "forward refused", Duration::from_secs(10), |e| {
            jstr(e, "reason_code") == "forward_not_allowed"
        });
    assert_eq!(jstr(&d, "side"), "policy", "{d}");
    assert!(jstr(&d, "reason").contains("db01"), "{d}");

    // a kill cuts a forward in flight within a second or two
    let s = TcpStream::connect(("127.0.0.1", local)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    kill_cuts_a_transfer(&w, s, 5, &session);
    let end = w
        .psm
        .wait_audit_after(mark, "session_end", Duration::from_secs(15), |e| {
            jstr(e, "event") == "session_end" && jstr(e, "session_id") == session
        });
    assert_eq!(jstr(&end, "side"), "operator", "{end}");
    assert!(
        wait_child(&mut ssh, Duration::from_secs(10)).is_some(),
        "ssh ends with its session"
    );

    // the recording holds the first transfer both ways (and the start of the cut one)
    let (data, err) = w.psm.recorded_data(&recording);
    assert!(err.is_none(), "{err:?}");
    let sum = |d: psm_recorder_format::Direction| -> u64 {
        data.iter()
            .filter(|(x, _)| *x == d)
            .map(|(_, n)| *n as u64)
            .sum()
    };
    assert!(
        sum(psm_recorder_format::Direction::Input) >= len
            && sum(psm_recorder_format::Direction::Output) >= len,
        "recorded {} in, {} out",
        sum(psm_recorder_format::Direction::Input),
        sum(psm_recorder_format::Direction::Output)
    );
    w.assert_all_sessions_ended();
}

/// A target that says its piece and half-closes (as a server may before it reads a request to
/// its end) still gets everything the user sends through the forward: the target's EOF reaches
/// the user as EOF, and the channel closes only once the user is done too. A grant that allows
/// only the forward opens no lease; a target nobody answers at refuses the forward.
#[test]
fn a_forward_to_a_tcp_target_that_half_closes_still_carries_the_users_bytes() {
    let w = World::new();
    // says "ready\n", shuts its sending side, then counts what it reads to the end
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (got_tx, got) = mpsc::channel();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"ready\n");
            let _ = s.shutdown(Shutdown::Write);
            let mut n = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = got_tx.send(n);
        }
    });
    let listen = format!("127.0.0.1:{}", free_port());
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "hsm",
            "--protocol",
            "tcp",
            "--address",
            &format!("127.0.0.1:{port}"),
            "--listen",
            &listen,
        ],
        None,
    );
    w.psm.psmctl_ok(
        &[
            "grant",
            "add",
            "alice",
            "tcp@hsm",
            "--unrecorded-tcp",
            "--allow",
            "forward-local",
        ],
        None,
    );
    w.psm.wait_policy_applied();

    // the grant allows the forward only: no lease
    let out = run_ssh(&mut w.ssh_as("alice@tcp@hsm", &w.alice_key));
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(
        out.stderr_str()
            .contains("shell sessions are not permitted by policy, and a lease of hsm is one"),
        "{}",
        out.describe()
    );
    assert!(
        closed_at_once(connect_from("127.0.0.1", listen_port(&listen))),
        "no lease"
    );

    let local = free_port();
    let mut ssh = w
        .ssh_with(
            &["-N", "-L", &format!("{local}:hsm:{port}")],
            "alice@tcp@hsm",
            &w.alice_key,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let mut s = None;
    assert!(
        wait_for(Duration::from_secs(15), || {
            s = TcpStream::connect(("127.0.0.1", local)).ok();
            s.is_some()
        }),
        "ssh listens on its forward's port"
    );
    let mut s = s.expect("connected");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    // the target's piece, then its EOF
    let mut said = Vec::new();
    s.read_to_end(&mut said).expect("read to the target's EOF");
    assert_eq!(said, b"ready\n");
    // the user's bytes still reach it, all of them
    let len = 4 * MIB;
    let mut p = Pattern::new(7);
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < len {
        p.fill(&mut buf);
        s.write_all(&buf).expect("send after the target's EOF");
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write).expect("eof");
    assert_eq!(
        got.recv_timeout(Duration::from_secs(30)),
        Ok(len),
        "the target read every byte the user sent after its EOF"
    );
    // and the channel closes once both are done
    assert_eq!(s.read(&mut buf).map_err(|e| e.kind()), Ok(0));
    let f = w
        .psm
        .wait_audit("the forward", Duration::from_secs(15), |e| {
            jstr(e, "event") == "forward" && e["bytes_up"].as_u64() == Some(len)
        });
    assert_eq!(f["bytes_down"].as_u64(), Some(6), "{f}");
    let _ = ssh.kill();
    let _ = ssh.wait();

    // a tcp target nobody answers at: the forward is refused, and audited as the target's doing
    let nobody = free_port();
    w.psm.psmctl_ok(
        &[
            "target",
            "add",
            "gone",
            "--protocol",
            "tcp",
            "--address",
            &format!("127.0.0.1:{nobody}"),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        None,
    );
    w.psm.psmctl_ok(
        &[
            "grant",
            "add",
            "alice",
            "tcp@gone",
            "--unrecorded-tcp",
            "--allow",
            "forward-local",
        ],
        None,
    );
    w.psm.wait_policy_applied();
    let local = free_port();
    let mut ssh = w
        .ssh_with(
            &["-N", "-L", &format!("{local}:gone:{nobody}")],
            "alice@tcp@gone",
            &w.alice_key,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    let mut s = None;
    assert!(
        wait_for(Duration::from_secs(15), || {
            s = TcpStream::connect(("127.0.0.1", local)).ok();
            s.is_some()
        }),
        "ssh listens on its forward's port"
    );
    assert!(closed_at_once(s.expect("connected")), "nothing relayed");
    let d = w
        .psm
        .wait_audit("unreachable", Duration::from_secs(15), |e| {
            jstr(e, "reason_code") == "target_unreachable"
        });
    assert_eq!(jstr(&d, "side"), "target", "{d}");
    assert!(jstr(&d, "reason").contains("gone"), "{d}");
    let _ = ssh.kill();
    let _ = ssh.wait();
    w.assert_all_sessions_ended();
}

fn listen_port(listen: &str) -> u16 {
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("port")
}

/// A psm port that was closed (its target removed) and is served again is checked again for
/// another holder: a process that took the port in between, even with `SO_REUSEPORT` as psm's
/// workers bind it, is not silently shared with; the relay says it cannot serve the port.
#[test]
fn a_psm_port_served_again_is_checked_again_for_another_holder() {
    let w = World::new();
    let echo = echo_server(4);
    let (port, listen) = tcp_target(&w, echo);
    let opened = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("psm port open for a tcp target") && l.contains(&listen))
            .count()
    };
    let served = opened(&w.psm.logs());
    assert!(served > 0, "{}", w.psm.logs());
    w.psm.psmctl_ok(&["target", "remove", "db01"], None);
    w.psm.wait_policy_applied();
    assert!(
        wait_for(Duration::from_secs(10), || !port_open(port)),
        "the port closed with its target"
    );
    // another process takes the port, the way psm's workers would share it
    let other =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    other.set_reuse_address(true).expect("SO_REUSEADDR");
    other.set_reuse_port(true).expect("SO_REUSEPORT");
    let addr: SocketAddr = listen.parse().expect("addr");
    other.bind(&addr.into()).expect("bind the freed port");
    other.listen(16).expect("listen");
    // the target comes back on the same port
    add_db01(&w, echo, &listen);
    w.psm.wait_policy_applied();
    assert!(
        wait_for(Duration::from_secs(10), || {
            w.psm
                .logs()
                .lines()
                .any(|l| l.contains("cannot serve a tcp target's psm port") && l.contains(&listen))
        }),
        "the relay says it cannot serve the port: {}",
        w.psm.logs()
    );
    assert_eq!(
        opened(&w.psm.logs()),
        served,
        "no worker joined the other process's port"
    );
    drop(other);
}
