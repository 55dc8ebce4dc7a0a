//! The issue's own yardstick for CPU per GiB: the OpenSSH client and sshd on the same direct
//! transfer. The bench's sshd (the jump host's) serves as the target here: `ssh` runs
//! `cat > /dev/null` for an upload and `head -c N /dev/zero` for a download, and psm-perf feeds
//! or drains the client's standard input or output.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::procs;

/// How to reach the bench's sshd with the OpenSSH client.
#[derive(Clone)]
pub struct OpenSsh {
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
    /// The sshd listener's pid (its tree's CPU is the server's share).
    pub sshd_pid: u32,
}

/// One transfer of `n` bytes, up or down, with `cipher` (an OpenSSH cipher name): the seconds
/// it took and the CPU-seconds of `ssh` and of sshd's tree (the remote `cat` or `head`
/// included, a few percent of it). Bounded by `limit`.
pub fn transfer(
    s: &OpenSsh,
    cipher: &str,
    up: bool,
    n: u64,
    limit: Duration,
) -> anyhow::Result<(f64, f64)> {
    let remote = if up {
        "cat > /dev/null".to_string()
    } else {
        format!("head -c {n} /dev/zero")
    };
    let sshd_before = procs::tree_cpu_seconds(s.sshd_pid);
    let children_before = procs::reaped_children_cpu_seconds();
    let start = Instant::now();
    let mut child = Command::new("ssh")
        // no configuration file: a ControlMaster, ProxyJump or Ciphers there would change the
        // route measured (or leave a master process behind)
        .args([
            "-F",
            "/dev/null",
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-o", "IdentitiesOnly=yes", "-o", "Compression=no"])
        .arg("-c")
        .arg(cipher)
        .arg("-i")
        .arg(&s.key)
        .arg("-p")
        .arg(s.port.to_string())
        .arg(format!("{}@127.0.0.1", s.user))
        .arg(remote)
        .stdin(if up { Stdio::piped() } else { Stdio::null() })
        .stdout(if up { Stdio::null() } else { Stdio::piped() })
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ssh")?;
    let pid = child.id();
    // the watchdog: a stalled transfer is killed at the limit
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    });
    let moved = if up {
        let mut stdin = child.stdin.take().context("ssh's stdin")?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = n;
        while left > 0 {
            let k = left.min(zeros.len() as u64) as usize;
            if stdin.write_all(&zeros[..k]).is_err() {
                break;
            }
            left -= k as u64;
        }
        drop(stdin);
        n - left
    } else {
        let mut stdout = child.stdout.take().context("ssh's stdout")?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k as u64,
            }
        }
        got
    };
    let status = child.wait()?;
    let secs = start.elapsed().as_secs_f64();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() || moved != n {
        bail!(
            "ssh {status}, {moved} of {n} bytes: {}",
            err.lines().next().unwrap_or("").trim()
        );
    }
    // sshd reaps its session's processes a moment after the client is gone
    let _ = procs::wait_until("sshd to end the session", Duration::from_secs(5), || {
        procs::tree_size(s.sshd_pid) == 1
    });
    let cpu = procs::reaped_children_cpu_seconds() - children_before
        + procs::tree_cpu_seconds(s.sshd_pid)
        - sshd_before;
    Ok((secs, cpu))
}
