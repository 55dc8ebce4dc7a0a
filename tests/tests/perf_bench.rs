//! `psm-perf bench --quick`: every path of the operators' bench works on this machine (direct,
//! through psm, through an OpenSSH jump host, TCP pass-through): small sizes, no timing asserts.

use std::process::Command;
use std::time::Duration;

use psm_tests::*;

#[test]
fn psm_perf_bench_quick_runs_every_path() {
    require_psm_binaries();
    let out = run_cmd(
        Command::new(bin("psm-perf"))
            .args(["bench", "--quick", "--json", "--bin"])
            .arg(bin_dir()),
        None,
        Duration::from_secs(120),
    );
    assert!(out.success(), "{}", out.describe());
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
    // the pass-through moved its bytes to the sink, directly and through a lease on psm
    let tcp = row("tcp pass-through");
    for route in ["direct", "psm"] {
        assert!(tcp[route].as_f64().is_some_and(|v| v > 0.0), "{tcp}");
    }
    let idle = row("idle 20: slowest echo");
    assert!(idle["psm"].as_f64().is_some_and(|v| v > 0.0), "{idle}");
    // nothing it started is left behind
    let leftovers = pids_matching("psm-perf-bench.", None);
    assert!(leftovers.is_empty(), "processes left: {leftovers:?}");
}
