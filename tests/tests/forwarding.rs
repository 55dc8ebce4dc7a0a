//! Remote port forwarding (`ssh -R`) and agent forwarding (`ssh -A`) through psm, against real
//! OpenSSH on both sides: refused unless the grant allows them (with the reason audited),
//! relayed with the bytes intact when it does, and each forwarded channel audited as a
//! `forward` event with its bytes each way.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use psm_tests::*;

/// On the target: connects to `port` on loopback (retrying while the forward is set up), sends
/// one line and prints the line that comes back.
fn probe(port: u16, line: &str) -> String {
    format!(
        "for i in $(seq 50); do {{ exec 3<>/dev/tcp/127.0.0.1/{port}; }} 2>/dev/null && break; \
         sleep 0.1; done; printf '{line}\\n' >&3; head -n1 <&3"
    )
}

#[test]
fn remote_forwards_follow_the_grant_and_are_audited() {
    let w = World::build(PsmMode::Up, Sshd::start_with(true));
    let echo = echo_server(2);
    let remote = |listen: u16| {
        let spec = format!("127.0.0.1:{listen}:127.0.0.1:{echo}");
        let mut c = w.ssh_with(
            &["-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO"],
            &alice_login(),
            &w.alice_key,
        );
        c.args(["-R", &spec]).arg(probe(listen, "ping via psm -R"));
        run_cmd(&mut c, None, CMD_TIMEOUT)
    };

    // not allowed by default: the target is never asked to listen
    let listen = free_port();
    let out = remote(listen);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr_str().contains("remote port forwarding failed"),
        "{}",
        out.describe()
    );
    let denied = w
        .psm
        .wait_audit("refused remote forward", Duration::from_secs(5), |e| {
            jstr(e, "event") == "session_denied" && jstr(e, "reason").contains("remote forward")
        });
    assert!(
        jstr(&denied, "reason").contains(&format!("127.0.0.1:{listen}")),
        "{denied}"
    );
    assert!(!port_open(listen), "the target must not listen");

    // allowed: the target listens, its connection comes back to the user's side, bytes intact
    w.regrant(&["--allow", "shell,exec,forward-remote"]);
    let listen = free_port();
    let out = remote(listen);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout_str(), "ping via psm -R\n", "bytes intact");
    let e = w
        .psm
        .wait_audit("remote forward", Duration::from_secs(5), |e| {
            jstr(e, "event") == "forward" && jstr(e, "kind") == "remote"
        });
    assert!(
        jstr(&e, "destination").starts_with(&format!("127.0.0.1:{listen} from ")),
        "{e}"
    );
    assert_eq!(
        (e["bytes_up"].as_u64(), e["bytes_down"].as_u64()),
        (Some(16), Some(16)),
        "{e}"
    );
    w.psm
        .wait_audit("tcpip-forward accepted", Duration::from_secs(5), |e| {
            jstr(e, "event") == "channel_request"
                && jstr(e, "request") == "tcpip-forward"
                && e["accepted"] == true
        });
}

/// `ssh-agent -D -a SOCK` holding alice's key; killed on drop.
struct Agent {
    child: Child,
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(key: &std::path::Path) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent");
        assert!(
            wait_for(Duration::from_secs(10), || sock.exists()),
            "ssh-agent socket"
        );
        let out = run_cmd(
            Command::new("ssh-add").env("SSH_AUTH_SOCK", &sock).arg(key),
            None,
            CMD_TIMEOUT,
        );
        assert!(out.success(), "ssh-add: {}", out.describe());
        Agent {
            child,
            sock,
            _dir: dir,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn agent_forwarding_follows_the_grant_and_is_audited() {
    let w = World::new();
    let agent = Agent::start(&w.alice_key);
    let fp = fingerprint(&pub_path(&w.alice_key));
    let listed = || {
        // ssh forwards an agent only when it has one (SSH_AUTH_SOCK)
        let mut c = w.ssh_with(&["-A"], &alice_login(), &w.alice_key);
        c.env("SSH_AUTH_SOCK", &agent.sock).arg("ssh-add -l");
        run_cmd(&mut c, None, CMD_TIMEOUT)
    };

    // not allowed by default: the target has no agent, the user is told why
    let out = listed();
    assert!(!out.success(), "{}", out.describe());
    assert!(!out.stdout_str().contains(&fp), "{}", out.describe());
    w.psm
        .wait_audit("refused agent request", Duration::from_secs(5), |e| {
            jstr(e, "event") == "channel_request"
                && jstr(e, "request") == "auth-agent-req@openssh.com"
                && e["accepted"] == false
        });
    assert!(
        out.stderr_str()
            .contains("psm: agent forwarding is not permitted"),
        "{}",
        out.describe()
    );

    // allowed: a program on the target reaches the user's agent through psm
    w.regrant(&["--allow", "shell,exec,agent"]);
    let out = listed();
    assert!(
        out.success() && out.stdout_str().contains(&fp),
        "{}",
        out.describe()
    );
    let e = w
        .psm
        .wait_audit("agent forward", Duration::from_secs(5), |e| {
            jstr(e, "event") == "forward" && jstr(e, "kind") == "agent"
        });
    assert!(
        e["bytes_up"].as_u64().unwrap_or(0) > 0 && e["bytes_down"].as_u64().unwrap_or(0) > 0,
        "{e}"
    );
}
