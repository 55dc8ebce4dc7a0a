//! The relay's two worker back ends: io_uring (`--io auto`, the default, where the kernel allows
//! it, or `uring`) and epoll. Each runs sessions the same way: bytes intact both ways, exit codes,
//! the recording. `PSM_RELAY_IO=epoll` runs any other test on epoll (scripts/test.sh runs the
//! tests of the relay's legs that way a second time).

use std::time::Duration;

use psm_tests::*;

fn io_uring_allowed() -> bool {
    let out = run_cmd(
        std::process::Command::new(bin("psm-perf")).args(["check", "--json"]),
        None,
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["name"] == "io_uring" && c["value"]["available"] == true)
}

fn sessions_work_on(backend: &str, log_line: &str) {
    let opts = PsmOpts {
        relay_args: vec!["--io".into(), backend.into()],
        ..PsmOpts::default()
    };
    drop(sessions_work_with(
        backend,
        log_line,
        backend == "epoll",
        opts,
    ));
}

/// tests/py/no_io_uring.py: runs what follows where io_uring's system calls fail with EPERM.
fn no_io_uring() -> Vec<String> {
    vec![
        python3().display().to_string(),
        format!("{}/py/no_io_uring.py", env!("CARGO_MANIFEST_DIR")),
    ]
}

/// `epoll`: the relay is expected to run on epoll (it holds a descriptor per socket). Returns
/// the world, still running.
fn sessions_work_with(backend: &str, log_line: &str, epoll: bool, opts: PsmOpts) -> World {
    let w = World::build_opts(PsmMode::Separate, Sshd::start(), opts);
    let logs = w.psm.logs();
    assert!(logs.contains(log_line), "{backend}: {logs}");
    // 8 MiB up, its hash back down, and an exit status
    let payload: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = run_cmd(
        w.ssh().arg("sha256sum; exit 7"),
        Some(&payload),
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(7), "{backend}: {}", out.describe());
    let want = local_sha256(&payload);
    assert_eq!(want.len(), 64, "sha256sum printed {want:?}");
    assert!(
        out.stdout_str().starts_with(&want),
        "{backend}: {}",
        out.describe()
    );
    // 16 MiB down, counted
    let out = run_cmd(
        w.ssh().arg("head -c 16777216 /dev/zero"),
        None,
        Duration::from_secs(60),
    );
    assert!(out.success(), "{backend}: {}", out.describe());
    assert_eq!(out.stdout.len(), 16 << 20, "{backend}");
    // a held session's target leg: a descriptor of the relay on epoll; on io_uring a place in
    // the worker's table, the relay holding no descriptor for it
    let relay = w.psm.relay_pids()[0];
    let mut held = w
        .ssh()
        .arg("sleep 60")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ssh");
    let open = wait_for(Duration::from_secs(20), || {
        connections_to(relay, w.sshd.port()) == 1
    });
    let by_descriptor = descriptor_connections_to(relay, w.sshd.port());
    let _ = held.kill();
    let _ = held.wait();
    assert!(
        open,
        "{backend}: the held session's target leg never showed"
    );
    // (kernels before 6.13 give the rings no table: `registered_sockets=0`)
    let want = if epoll || logs.contains("registered_sockets=0") {
        1
    } else {
        0
    };
    assert_eq!(
        by_descriptor, want,
        "{backend}: the relay's descriptors toward the target"
    );
    w.assert_all_sessions_ended();
    w
}

/// The SHA-256 of `data` in hex, as `sha256sum` prints it here.
fn local_sha256(data: &[u8]) -> String {
    let out = run_cmd(
        &mut std::process::Command::new("sha256sum"),
        Some(data),
        Duration::from_secs(30),
    );
    out.stdout_str()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sessions_work_on_the_epoll_fallback() {
    sessions_work_on("epoll", "worker running on tokio (epoll)");
}

/// Where a seccomp filter refuses io_uring (as a container's default profile does), the relay's
/// default `--io auto` falls back to epoll at start, says so in its log, and works the same;
/// `psm-perf check` under the same filter says io_uring is unavailable, with its fix; and
/// `--io uring` refuses to start rather than fall back.
#[test]
fn where_seccomp_refuses_io_uring_the_relay_falls_back_to_epoll_and_says_so() {
    let opts = PsmOpts {
        // `--io auto` named, so that PSM_RELAY_IO (the epoll rerun) does not decide it
        relay_args: vec!["--io".into(), "auto".into()],
        relay_wrapper: no_io_uring(),
        ..PsmOpts::default()
    };
    let w = sessions_work_with(
        "auto under seccomp",
        "io_uring unavailable; worker falls back to epoll",
        true,
        opts,
    );
    // this test's relay (others may run beside it)
    let relay = w.psm.relay_pids()[0].to_string();
    let wrapped = no_io_uring();
    let out = run_cmd(
        std::process::Command::new(&wrapped[0])
            .arg(&wrapped[1])
            .arg(bin("psm-perf"))
            .args(["check", "--json", "--pid", &relay]),
        None,
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("psm-perf check --json: {e}: {}", out.describe()));
    let c = v["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "io_uring")
        .cloned()
        .unwrap_or_else(|| panic!("no io_uring line: {v}"));
    assert_eq!(c["status"], "warn", "{c}");
    assert_eq!(c["value"]["available"], false, "{c}");
    assert_eq!(c["value"]["relay_rings"], 0, "the relay holds no ring: {c}");
    let msg = c["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("Operation not permitted") && msg.contains("falls back to epoll"),
        "{c}"
    );
    assert!(
        c["fix"].as_str().unwrap_or_default().contains("seccomp"),
        "{c}"
    );
    // `--io uring` asks for io_uring or nothing: the relay exits, naming why
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_cmd(
        std::process::Command::new(&wrapped[0])
            .arg(&wrapped[1])
            .arg(bin("psm-relay"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--rdp-listen", "off", "--io", "uring", "--workers", "1"]),
        None,
        Duration::from_secs(30),
    );
    let said = out.describe();
    assert!(!out.success(), "{said}");
    assert!(
        said.contains("io_uring unavailable (Operation not permitted")
            && said.contains("--io uring allows no fallback"),
        "{said}"
    );
}

#[test]
fn sessions_work_on_io_uring() {
    assert!(
        io_uring_allowed(),
        "io_uring is not allowed on this machine (psm-perf check says why); the relay falls back to epoll, which sessions_work_on_the_epoll_fallback covers"
    );
    sessions_work_on("uring", "worker running on io_uring");
}
