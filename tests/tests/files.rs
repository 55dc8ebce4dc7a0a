//! File transfer through psm: scp (SFTP-based default and legacy `scp -O`) both ways and sftp put
//! and get in batch mode, each checked by sha256.

use psm_tests::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const SIZE: u64 = 2 * 1024 * 1024;

fn make_readable(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).expect("chmod");
}

#[test]
fn scp_up_and_down() {
    let w = World::new();
    let work = w.psm.work_dir();
    let scratch = w.sshd.scratch();
    for (mode, extra) in [("sftp", None), ("legacy", Some("-O"))] {
        let local = work.join(format!("up-{mode}.bin"));
        random_file(&local, SIZE);
        let sha = sha256_file(&local);
        let remote = scratch.join(format!("up-{mode}.bin"));
        let mut cmd = w.scp();
        cmd.args(extra)
            .arg(&local)
            .arg(format!("127.0.0.1:{}", remote.display()));
        let out = run_cmd(&mut cmd, None, CMD_TIMEOUT);
        assert!(out.success(), "scp ({mode}) upload:\n{}", out.describe());
        assert_eq!(
            sha256_file(&remote),
            sha,
            "scp ({mode}) upload changed the file"
        );

        let remote_src = scratch.join(format!("down-{mode}.bin"));
        random_file(&remote_src, SIZE);
        make_readable(&remote_src);
        let sha = sha256_file(&remote_src);
        let local = work.join(format!("down-{mode}.bin"));
        let mut cmd = w.scp();
        cmd.args(extra)
            .arg(format!("127.0.0.1:{}", remote_src.display()))
            .arg(&local);
        let out = run_cmd(&mut cmd, None, CMD_TIMEOUT);
        assert!(out.success(), "scp ({mode}) download:\n{}", out.describe());
        assert_eq!(
            sha256_file(&local),
            sha,
            "scp ({mode}) download changed the file"
        );
    }
}

#[test]
fn sftp_put_and_get() {
    let w = World::new();
    let work = w.psm.work_dir();
    let scratch = w.sshd.scratch();
    let up_local = work.join("put.bin");
    random_file(&up_local, SIZE);
    let up_sha = sha256_file(&up_local);
    let up_remote = scratch.join("put.bin");
    let down_remote = scratch.join("get.bin");
    random_file(&down_remote, SIZE);
    make_readable(&down_remote);
    let down_sha = sha256_file(&down_remote);
    let down_local = work.join("get.bin");
    let batch = work.join("batch.txt");
    fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\nls -l {}\n",
            up_local.display(),
            up_remote.display(),
            down_remote.display(),
            down_local.display(),
            scratch.display()
        ),
    )
    .expect("batch file");
    let out = run_cmd(&mut w.sftp(&batch), None, CMD_TIMEOUT);
    assert!(out.success(), "sftp batch:\n{}", out.describe());
    assert_eq!(sha256_file(&up_remote), up_sha, "sftp put changed the file");
    assert_eq!(
        sha256_file(&down_local),
        down_sha,
        "sftp get changed the file"
    );
    assert!(
        out.stdout_str().contains("put.bin"),
        "sftp ls output:\n{}",
        out.describe()
    );
}
