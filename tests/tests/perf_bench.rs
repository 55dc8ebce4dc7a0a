//! `psm-perf bench --quick`: every path of the operators' bench works on this machine (direct,
//! through psm with recording on and off, through an OpenSSH jump host, the OpenSSH client
//! straight to sshd, TCP pass-through, echo through socat): small sizes, no timing asserts.

use std::process::Command;
use std::time::Duration;

use psm_tests::*;

/// Whatever the bench started (its work folder, under this test's own temporary folder, is in
/// their command lines) is stopped when the test ends, passed or not: a killed psm-perf cannot
/// clean up after itself. Only this test's: a bench someone runs beside the suite is left alone.
struct Leftovers(String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        signal_matching(&self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

#[test]
fn psm_perf_bench_quick_runs_every_path() {
    require_psm_binaries();
    // the bench's work folder goes under TMPDIR: a folder of this test's own
    let tmp = tempfile::Builder::new()
        .prefix("perfb")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let work = format!("{}/psm-perf-bench.", tmp.path().display());
    let _cleanup = Leftovers(work.clone());
    let out = run_cmd(
        Command::new(bin("psm-perf"))
            .args(["bench", "--quick", "--json", "--bin"])
            .arg(bin_dir())
            .env("TMPDIR", tmp.path()),
        None,
        // issue #9: `--quick` runs in CI in under a minute (it takes about 11 s here, alone:
        // nextest runs this test by itself); killed past that, the run fails
        Duration::from_secs(60),
    );
    assert!(
        out.success(),
        "psm-perf bench --quick failed or ran past a minute: {}",
        out.describe()
    );
    let report: serde_json::Value = serde_json::from_str(&out.stdout_str()).expect("json report");
    let rows = report["rows"].as_array().expect("rows");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["workload"] == name)
            .unwrap_or_else(|| panic!("no row {name:?} in {report}"))
    };
    // OpenSSH's sshd is installed for the tests, so the ProxyJump route runs too
    let routes = ["direct", "psm", "jump"];
    for w in [
        "up aes128-gcm",
        "down aes128-gcm",
        "both aes128-gcm",
        "up chacha20-poly1305",
        "down chacha20-poly1305",
        "both chacha20-poly1305",
        "sessions sequential",
        "sessions 4 at once",
        "echo p50",
        "echo p99",
    ] {
        let r = row(w);
        for route in routes {
            let v = r[route].as_f64();
            assert!(v.is_some_and(|v| v > 0.0), "{w} on {route}: {r}");
        }
    }
    // psm with recording off (an --unrecorded grant) for bulk and echo, and the OpenSSH client
    // straight to sshd for uploads and downloads
    for w in [
        "up aes128-gcm",
        "down aes128-gcm",
        "both aes128-gcm",
        "up chacha20-poly1305",
        "echo p50",
    ] {
        let r = row(w);
        assert!(r["psm-norec"].as_f64().is_some_and(|v| v > 0.0), "{w}: {r}");
    }
    for w in [
        "up aes128-gcm",
        "down aes128-gcm",
        "up chacha20-poly1305",
        "down chacha20-poly1305",
        "up aes128-gcm CPU",
    ] {
        let r = row(w);
        assert!(r["openssh"].as_f64().is_some_and(|v| v > 0.0), "{w}: {r}");
    }
    // the pass-through moved its bytes to the sink, directly, through a lease on psm and
    // through socat (scripts/test.sh installs it)
    let tcp = row("tcp pass-through");
    for route in ["direct", "psm", "socat"] {
        assert!(tcp[route].as_f64().is_some_and(|v| v > 0.0), "{tcp}");
    }
    // echo through socat in front of the target: the hop of a bare forwarder
    let echo = row("echo p50");
    assert!(echo["socat"].as_f64().is_some_and(|v| v > 0.0), "{echo}");
    let idle = row("idle 20: slowest echo");
    assert!(idle["psm"].as_f64().is_some_and(|v| v > 0.0), "{idle}");
    // the relay's memory was read (20 sessions may fit in what it already holds: >= 0)
    let mem = row("idle 20: relay memory per session");
    assert!(mem["psm"].as_f64().is_some(), "{mem}");
    let cpu = row("up aes128-gcm CPU");
    assert!(cpu["psm"].as_f64().is_some(), "{cpu}");
    // nothing it started is left behind
    let leftovers = pids_matching(&work, None);
    assert!(leftovers.is_empty(), "processes left: {leftovers:?}");
}
