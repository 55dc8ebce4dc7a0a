//! Bulk data through psm: 256 MiB up and 256 MiB down at the same time in one exec session, with
//! sha256 checked on both ends, a bounded run time, and the relay's peak memory bounded.
//!
//! `PSM_STREAM_MIB` changes the size (default 256).

use psm_tests::*;
use std::fs::File;
use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const TOTAL_TIMEOUT: Duration = Duration::from_secs(300);
/// The relay's peak memory bound: well below the data moved each way (a relay that buffered one
/// direction of the transfer would exceed it); about 55 MiB is what it takes.
const RELAY_HWM_LIMIT_KIB: u64 = 128 * 1024;

fn size_bytes() -> u64 {
    std::env::var("PSM_STREAM_MIB")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(256)
        * 1024
        * 1024
}

fn hash_line(stderr: &str, label: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{label} ")))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

#[test]
fn stream_up_and_down_concurrently() {
    let size = size_bytes();
    let w = World::new();
    let up = w.psm.work_dir().join("up.bin");
    random_file(&up, size);
    let up_sha = sha256_file(&up);

    // local hash of what comes down
    let mut down_sha = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sha256sum");
    let down_sink = down_sha.stdin.take().expect("sha256sum stdin");

    // remote: hash what comes up (UP) while sending fresh random bytes down and hashing them (DOWN)
    let script = format!(
        "exec 3<&0; {{ sha256sum <&3 | sed 's/^/UP /' >&2; }} & \
         head -c {size} /dev/urandom | tee >(sha256sum | sed 's/^/DOWN /' >&2); wait"
    );
    // INFO: a keepalive timeout or a disconnect reason shows up on stderr
    let mut cmd = w.ssh_with(&["-o", "LogLevel=INFO"], &alice_login(), &w.alice_key);
    cmd.arg(script)
        .stdin(Stdio::from(File::open(&up).expect("open upload")))
        .stdout(Stdio::from(down_sink))
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut ssh = cmd.spawn().expect("spawn ssh");
    // the Command still holds our copy of the pipe to the local sha256sum: close it
    drop(cmd);
    let mut err_pipe = ssh.stderr.take().expect("stderr");
    let err_thread = thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    // watch the relay's memory while the data flows
    let mut peak_kib = 0u64;
    let relays = w.psm.relay_pids();
    assert!(
        !relays.is_empty(),
        "no psm-relay process found for this psm"
    );
    let status = loop {
        if let Ok(Some(st)) = ssh.try_wait() {
            break Some(st);
        }
        if started.elapsed() > TOTAL_TIMEOUT {
            break None;
        }
        for pid in &relays {
            peak_kib = peak_kib.max(vm_hwm_kib(*pid).unwrap_or(0));
        }
        thread::sleep(Duration::from_millis(200));
    };
    let Some(status) = status else {
        let _ = ssh.kill();
        let _ = ssh.wait();
        let _ = down_sha.kill();
        panic!(
            "{} MiB each way did not finish within {TOTAL_TIMEOUT:?}",
            size / (1024 * 1024)
        );
    };
    let elapsed = started.elapsed();
    for pid in &relays {
        peak_kib = peak_kib.max(vm_hwm_kib(*pid).unwrap_or(0));
    }
    let stderr = err_thread.join().unwrap_or_default();
    let local_down =
        wait_child(&mut down_sha, Duration::from_secs(60)).expect("local sha256sum finished");
    assert!(local_down.success());
    let mut local_down_out = String::new();
    if let Some(mut o) = down_sha.stdout.take() {
        let _ = o.read_to_string(&mut local_down_out);
    }
    let local_down_sha = local_down_out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();

    assert!(
        status.success(),
        "ssh exited {:?} after {:.1} s; stderr:\n{stderr}\nrelay processes now: {:?}",
        status.code(),
        elapsed.as_secs_f64(),
        w.psm.relay_pids()
    );
    let remote_up =
        hash_line(&stderr, "UP").unwrap_or_else(|| panic!("no UP hash on stderr:\n{stderr}"));
    let remote_down =
        hash_line(&stderr, "DOWN").unwrap_or_else(|| panic!("no DOWN hash on stderr:\n{stderr}"));
    assert_eq!(
        remote_up, up_sha,
        "upload corrupted: target hashed something else"
    );
    assert_eq!(
        local_down_sha, remote_down,
        "download corrupted: client received something else"
    );
    let end = w.psm.wait_audit(
        "session_end of the stream session",
        Duration::from_secs(10),
        |e| {
            jstr(e, "event") == "session_end"
                && e.get("bytes_up")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
                    >= size
        },
    );
    let down = end
        .get("bytes_down")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    assert!(
        down >= size,
        "session_end bytes_down {down} < {size}: {end}"
    );
    eprintln!(
        "stream: {} MiB each way in {:.1} s; psm-relay VmHWM {} MiB",
        size / (1024 * 1024),
        elapsed.as_secs_f64(),
        peak_kib / 1024
    );
    let limit = RELAY_HWM_LIMIT_KIB.min(size / 1024 / 2);
    assert!(
        peak_kib < limit,
        "psm-relay peak RSS {} MiB exceeds {} MiB",
        peak_kib / 1024,
        limit / 1024
    );
}
