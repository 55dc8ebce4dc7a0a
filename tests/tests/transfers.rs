//! What was done, not only what was shown: file operations over sftp, scp (SFTP-based) and
//! legacy `scp -O` audited as `file_transfer` events with their sizes and the SHA-256 of what
//! passed, compared with the files at both ends; an exec's exit status as `command_end`.

use psm_tests::*;
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const SIZE: u64 = 1024 * 1024 + 123;
const WAIT: Duration = Duration::from_secs(10);

fn make_readable(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).expect("chmod");
}

fn is_op(e: &Value, protocol: &str, op: &str, path: &Path) -> bool {
    jstr(e, "event") == "file_transfer"
        && jstr(e, "protocol") == protocol
        && jstr(e, "operation") == op
        && jstr(e, "path") == path.display().to_string()
}

/// The content event of a transfer: its size and hash as the file has them.
fn assert_hashed(e: &Value, file: &Path, len: u64) {
    assert_eq!(e["bytes"].as_u64(), Some(len), "bytes of {e}");
    assert_eq!(jstr(e, "sha256"), sha256_file(file), "hash of {e}");
    assert_eq!(e["partial"].as_bool(), Some(false), "{e}");
    assert_eq!(e["ok"].as_bool(), Some(true), "{e}");
}

#[test]
fn sftp_operations_are_audited_with_sizes_and_hashes() {
    let w = World::new();
    let work = w.psm.work_dir();
    let scratch = w.sshd.scratch();
    let up_local = work.join("put.bin");
    random_file(&up_local, SIZE);
    let up_remote = scratch.join("put.bin");
    let down_remote = scratch.join("get.bin");
    random_file(&down_remote, SIZE / 3);
    make_readable(&down_remote);
    let down_local = work.join("get.bin");
    let dir = scratch.join("newdir");
    let moved = dir.join("moved.bin");
    let missing = scratch.join("no such file");
    let batch = work.join("batch.txt");
    fs::write(
        &batch,
        format!(
            "put {up} {up_r}\nget {down_r} {down}\nmkdir {dir}\nrename {up_r} {moved}\nrm {moved}\nrmdir {dir}\n-rm \"{missing}\"\n",
            up = up_local.display(),
            up_r = up_remote.display(),
            down_r = down_remote.display(),
            down = down_local.display(),
            dir = dir.display(),
            moved = moved.display(),
            missing = missing.display(),
        ),
    )
    .expect("batch file");
    let mark = w.psm.audit_mark();
    let out = run_cmd(&mut w.sftp(&batch), None, CMD_TIMEOUT);
    assert!(out.success(), "sftp batch:\n{}", out.describe());
    assert_eq!(sha256_file(&down_local), sha256_file(&down_remote));

    let put = w.psm.wait_audit_after(mark, "sftp put", WAIT, |e| {
        is_op(e, "sftp", "write", &up_remote)
    });
    assert_hashed(&put, &up_local, SIZE);
    let get = w.psm.wait_audit_after(mark, "sftp get", WAIT, |e| {
        is_op(e, "sftp", "read", &down_remote)
    });
    assert_hashed(&get, &down_local, SIZE / 3);
    let mkdir = w.psm.wait_audit_after(mark, "sftp mkdir", WAIT, |e| {
        is_op(e, "sftp", "mkdir", &dir)
    });
    assert_eq!(mkdir["ok"].as_bool(), Some(true), "{mkdir}");
    let rename = w.psm.wait_audit_after(mark, "sftp rename", WAIT, |e| {
        is_op(e, "sftp", "rename", &up_remote)
    });
    assert_eq!(jstr(&rename, "path2"), moved.display().to_string());
    w.psm.wait_audit_after(mark, "sftp rm", WAIT, |e| {
        is_op(e, "sftp", "remove", &moved)
    });
    w.psm.wait_audit_after(mark, "sftp rmdir", WAIT, |e| {
        is_op(e, "sftp", "rmdir", &dir)
    });
    let failed = w.psm.wait_audit_after(mark, "failed rm", WAIT, |e| {
        is_op(e, "sftp", "remove", &missing)
    });
    assert_eq!(failed["ok"].as_bool(), Some(false), "{failed}");
    assert!(jstr(&failed, "status").contains("no such file"), "{failed}");
    // every event names the session, the user and the channel
    assert_eq!(jstr(&put, "user"), "alice");
    assert_eq!(jstr(&put, "session_id"), jstr(&get, "session_id"));

    let tail = w.psm.psmctl_ok(&["audit", "tail", "-n", "50"], None);
    assert!(
        tail.lines().any(|l| l.contains("file_transfer")
            && l.contains("op=write")
            && l.contains(&format!("sha256={}", jstr(&put, "sha256")))),
        "audit tail:\n{tail}"
    );
    // the file name with a space is shown quoted, on one line
    assert!(
        tail.lines()
            .any(|l| l.contains("op=remove") && l.contains("no such file")),
        "audit tail:\n{tail}"
    );
}

#[test]
fn scp_both_modes_are_audited_and_hashed() {
    let w = World::new();
    let work = w.psm.work_dir();
    let scratch = w.sshd.scratch();
    for (protocol, extra) in [("sftp", None), ("scp", Some("-O"))] {
        let local = work.join(format!("up-{protocol}.bin"));
        random_file(&local, SIZE);
        let remote = scratch.join(format!("up-{protocol}.bin"));
        let mark = w.psm.audit_mark();
        let mut cmd = w.scp();
        cmd.args(extra)
            .arg(&local)
            .arg(format!("127.0.0.1:{}", remote.display()));
        let out = run_cmd(&mut cmd, None, CMD_TIMEOUT);
        assert!(
            out.success(),
            "scp ({protocol}) upload:\n{}",
            out.describe()
        );
        let e = w
            .psm
            .wait_audit_after(mark, &format!("{protocol} upload"), WAIT, |e| {
                is_op(e, protocol, "write", &remote)
            });
        assert_hashed(&e, &remote, SIZE);
        assert_eq!(jstr(&e, "sha256"), sha256_file(&local));

        let remote_src = scratch.join(format!("down-{protocol}.bin"));
        random_file(&remote_src, SIZE / 2);
        make_readable(&remote_src);
        let local = work.join(format!("down-{protocol}.bin"));
        let mark = w.psm.audit_mark();
        let mut cmd = w.scp();
        cmd.args(extra)
            .arg(format!("127.0.0.1:{}", remote_src.display()))
            .arg(&local);
        let out = run_cmd(&mut cmd, None, CMD_TIMEOUT);
        assert!(
            out.success(),
            "scp ({protocol}) download:\n{}",
            out.describe()
        );
        let e = w
            .psm
            .wait_audit_after(mark, &format!("{protocol} download"), WAIT, |e| {
                is_op(e, protocol, "read", &remote_src)
            });
        assert_hashed(&e, &local, SIZE / 2);
        assert_eq!(jstr(&e, "sha256"), sha256_file(&remote_src));
    }
    // legacy scp runs as an exec: it has its command_end too
    let end = w.psm.wait_audit("scp -O command_end", WAIT, |e| {
        jstr(e, "event") == "command_end" && jstr(e, "line").starts_with("scp ")
    });
    assert_eq!(end["exit_status"].as_u64(), Some(0), "{end}");
}

#[test]
fn an_exec_commands_exit_status_is_audited() {
    let w = World::new();
    let mark = w.psm.audit_mark();
    let out = run_cmd(w.ssh().arg("echo out; exit 3"), None, CMD_TIMEOUT);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    let end = w.psm.wait_audit_after(mark, "command_end", WAIT, |e| {
        jstr(e, "event") == "command_end" && jstr(e, "line") == "echo out; exit 3"
    });
    assert_eq!(end["exit_status"].as_u64(), Some(3), "{end}");
    assert!(end["exit_signal"].is_null(), "{end}");
    assert_eq!(end["bytes_down"].as_u64(), Some(4), "{end}");
    // the command event came first, on the same channel
    let cmd = w.psm.wait_audit_after(mark, "command", WAIT, |e| {
        jstr(e, "event") == "command" && jstr(e, "line") == "echo out; exit 3"
    });
    assert_eq!(cmd["channel"], end["channel"]);
    assert!(cmd["seq"].as_u64() < end["seq"].as_u64());

    let tail = w.psm.psmctl_ok(&["audit", "tail", "-n", "20"], None);
    assert!(
        tail.lines()
            .any(|l| l.contains("command_end") && l.contains("exit=3")),
        "audit tail:\n{tail}"
    );
}

/// An SFTP packet: length, type, body.
fn sftp_packet(typ: u8, body: &[u8]) -> Vec<u8> {
    let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(typ);
    p.extend_from_slice(body);
    p
}

fn sftp_string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

#[test]
fn sftp_bytes_psm_cannot_follow_make_one_notice_and_still_pass() {
    let w = World::new();
    let victim = w.sshd.scratch().join("unseen.bin");
    random_file(&victim, 10);
    let mark = w.psm.audit_mark();
    // INIT; an OPEN whose 100 KiB path is more than psm reads whole (64 KiB) but within what
    // sshd's sftp-server takes (256 KiB); then a REMOVE, which psm no longer reads
    let mut input = sftp_packet(1, &3u32.to_be_bytes());
    let mut open = 1u32.to_be_bytes().to_vec();
    open.extend(sftp_string(
        format!("/tmp/{}", "a".repeat(100_000)).as_bytes(),
    ));
    open.extend(1u32.to_be_bytes()); // read
    open.extend(0u32.to_be_bytes()); // no attributes
    input.extend(sftp_packet(3, &open));
    let mut remove = 2u32.to_be_bytes().to_vec();
    remove.extend(sftp_string(victim.display().to_string().as_bytes()));
    input.extend(sftp_packet(13, &remove));
    // sftp-server quits at the end of its input, even with requests unread: keep it open a while
    let mut child = w
        .ssh_with(&["-s"], &alice_login(), &w.alice_key)
        .arg("sftp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&input).expect("write");
    // the three answers (or the end of the output), read before stdin is closed
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let answers = |got: &[u8]| {
            let (mut n, mut rest) = (0, got);
            while rest.len() >= 4 {
                let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if rest.len() < 4 + len {
                    break;
                }
                n += 1;
                rest = &rest[4 + len..];
            }
            n
        };
        while answers(&got) < 3 {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let got = reader.join().expect("reader");
    drop(stdin);
    if wait_child(&mut child, CMD_TIMEOUT).is_none() {
        let _ = child.kill();
        panic!("ssh -s sftp did not end");
    }
    let out = child.wait_with_output().expect("ssh output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // the target's answers all came back: VERSION, then a status for each request
    let mut types = Vec::new();
    let mut rest = got.as_slice();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        types.push(rest[4]);
        rest = &rest[(4 + len).min(rest.len())..];
    }
    assert_eq!(types, vec![2, 101, 101], "stderr: {stderr}");
    assert!(!victim.exists(), "the remove reached the target");
    let notice = w.psm.wait_audit_after(mark, "notice", WAIT, |e| {
        jstr(e, "event") == "notice" && jstr(e, "kind") == "file transfer not followed"
    });
    assert!(
        jstr(&notice, "message").contains("65536"),
        "the notice says why: {notice}"
    );
    w.assert_all_sessions_ended();
    assert!(
        !w.psm
            .audit()
            .iter()
            .skip(mark)
            .any(|e| jstr(e, "event") == "file_transfer"),
        "nothing is reported once psm stopped reading"
    );
}

#[test]
fn rekeying_on_both_legs_loses_no_byte() {
    // sshd renews the target leg's keys every 256 KiB and the OpenSSH client the user leg's:
    // each leg rekeys many times, started by either side (russh patch 5 changed what a session
    // keeps from one key exchange to the next); both legs' counts are checked below
    let w = World::build(
        PsmMode::Up,
        Sshd::start_config(false, "DEBUG", "RekeyLimit 256K\n"),
    );
    let up = w.psm.work_dir().join("rekey-up.bin");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&up, &data).expect("write the upload");
    let out = run_cmd(
        w.ssh().args(["-v", "-o", "RekeyLimit=256K", "sha256sum"]),
        Some(&data),
        Duration::from_secs(60),
    );
    assert!(out.success(), "{}", out.describe());
    // the user leg's key exchanges, as the OpenSSH client logs them (the first one aside)
    let user_kex = out.stderr_str().matches("SSH2_MSG_KEXINIT sent").count();
    assert!(
        user_kex >= 20,
        "the client started {user_kex} key exchanges over 8 MiB at 256 KiB: {}",
        out.describe()
    );
    let remote = out.stdout_str();
    assert_eq!(
        remote.split_whitespace().next(),
        Some(sha256_file(&up).as_str()),
        "the target hashed what was sent: {remote}"
    );
    let out = run_ssh(w.ssh().args(["-o", "RekeyLimit=256K", "seq 1 1000000"]));
    assert!(out.success(), "{}", out.describe());
    let want: String = (1..=1_000_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.stdout.len(), want.len(), "bytes down");
    assert!(out.stdout == want.as_bytes(), "the download differs");
    // the target leg's key exchanges (sshd's own count; the first of each connection aside)
    let kexinits = w.sshd.full_log().matches("SSH2_MSG_KEXINIT sent").count();
    assert!(
        kexinits >= 20,
        "sshd started {kexinits} key exchanges:\n{}",
        w.sshd.log()
    );
    w.assert_all_sessions_ended();
}
