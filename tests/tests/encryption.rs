//! Recordings encrypted at rest, end to end: with `[recorder] encryption_key_file` (a key made
//! by `psmctl recordings keygen`), a real session's recording holds none of what the session
//! showed in the clear, neither in its bytes nor in any zstd frame found in them; `psmctl
//! recordings verify` says OK with the key configured and without it, and so does `psm-verify`
//! given only the file and the evidence public key; replay and export show the session with the
//! key, and without it (or with another key) fail with one line that names the key; search does
//! not find the encrypted session's text.

use psm_tests::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
/// What the session prints; the command that prints it does not hold it as is.
const MARKER: &str = "ENC-TEST-MARKER-4711";

fn has(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn keygen(path: &Path) -> String {
    let out = run_cmd(
        Command::new(bin("psmctl"))
            .args(["recordings", "keygen"])
            .arg(path)
            .env_remove("PSM_DATA_DIR"),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.success(), "keygen: {}", out.describe());
    let text = out.stdout_str();
    let id = text
        .strip_prefix("recording key ")
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no key id in: {text}"))
        .to_string();
    assert_eq!(id.len(), 16, "{text}");
    id
}

fn config(key: &Path) -> String {
    format!("[recorder]\nencryption_key_file = \"{}\"\n", key.display())
}

#[test]
fn encrypted_recordings_verify_without_the_key_and_replay_only_with_it() {
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("recording.key");
    let key_id = keygen(&key);
    let mode = fs::metadata(&key).expect("key file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let w = World::build_opts(
        PsmMode::Up,
        Sshd::start(),
        PsmOpts {
            config: Some(config(&key)),
            ..PsmOpts::default()
        },
    );

    let mark = w.psm.audit_mark();
    let out = run_ssh(
        w.ssh()
            .arg("printf 'ENC-TEST-%s-4711\\n' MARKER; sleep 0.3"),
    );
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout_str().contains(MARKER), "{}", out.describe());
    let end = w.psm.wait_audit_after(mark, "session_end", T, |e| {
        jstr(e, "event") == "session_end"
    });
    let id = jstr(&end, "recording_id").to_string();
    // the recorder finishes the file after the relay's CLOSE: wait until it verifies
    let mut last = String::new();
    let done = wait_for(T, || {
        let o = w.psm.psmctl(&["recordings", "verify", &id], None);
        last = o.stdout_str();
        o.success()
    });
    assert!(done, "never verified: {last}");
    assert!(last.contains(": OK: "), "{last}");
    assert!(
        last.contains(&format!("encrypted with recording key {key_id}")),
        "{last}"
    );

    // nothing of the session in the clear, compressed or not
    let path = w
        .psm
        .data_dir()
        .join("recordings")
        .join(format!("{id}.psmrec"));
    let bytes = fs::read(&path).expect("recording");
    assert!(bytes.starts_with(b"PSMREC4\n"));
    assert!(!has(&bytes, MARKER.as_bytes()));
    let zstd_magic = [0x28, 0xb5, 0x2f, 0xfd];
    for at in 0..bytes.len().saturating_sub(4) {
        if bytes[at..at + 4] == zstd_magic {
            if let Ok(plain) = zstd::decode_all(&bytes[at..]) {
                assert!(!has(&plain, MARKER.as_bytes()), "clear frame at {at}");
            }
        }
    }

    // psm-verify: the file and the public key, nothing else
    let standalone = run_cmd(
        Command::new(bin("psm-verify"))
            .arg("--pubkey")
            .arg(w.psm.data_dir().join("evidence.pub"))
            .arg(&path),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(standalone.code(), Some(0), "{}", standalone.describe());
    assert!(
        standalone.stdout_str().contains(": OK: "),
        "{}",
        standalone.describe()
    );

    // with the key: replay and export show the session
    let play = w
        .psm
        .psmctl_ok(&["recordings", "play", &id, "--speed", "100"], None);
    assert!(play.contains(MARKER), "play: {play}");
    let text = w
        .psm
        .psmctl_ok(&["recordings", "export", &id, "--format", "text"], None);
    assert!(text.contains(MARKER), "export: {text}");
    // the listing needs no key either
    let list = w.psm.psmctl_ok(&["recordings", "list"], None);
    assert!(list.contains(&id), "{list}");
    // the search index holds no encrypted text (the default): nothing was indexed, so there is
    // no index yet, or one without it
    let found = w.psm.psmctl(&["recordings", "search", MARKER], None);
    assert!(
        if found.success() {
            !found.stdout_str().contains(&id)
        } else {
            found.stderr_str().contains("no search index")
        },
        "{}",
        found.describe()
    );
    let reindexed = w.psm.psmctl_ok(&["recordings", "reindex"], None);
    assert!(reindexed.contains("0 could not be read"), "{reindexed}");
    let found = w.psm.psmctl_ok(&["recordings", "search", MARKER], None);
    assert!(!found.contains(&id), "{found}");

    // without the key: verify still OK, replay and export fail with one clear line
    let toml = w.psm.data_dir().join("psm.toml");
    fs::write(&toml, "").expect("psm.toml");
    let o = w.psm.psmctl(&["recordings", "verify", &id], None);
    assert!(o.success(), "verify without the key: {}", o.describe());
    let want = format!(
        "recording {id} is encrypted with key {key_id}; configure [recorder] encryption_key_file"
    );
    for args in [
        &["recordings", "play", &id, "--speed", "100"][..],
        &["recordings", "export", &id, "--format", "text"],
    ] {
        let o = w.psm.psmctl(args, None);
        assert!(!o.success(), "{args:?} without the key: {}", o.describe());
        let err = o.stderr_str();
        assert!(err.contains(&want), "{args:?}: {}", o.describe());
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!has(&o.stdout, MARKER.as_bytes()));
    }

    // another key: a clear error naming both, not garbage
    let other = keys.path().join("other.key");
    let other_id = keygen(&other);
    fs::write(&toml, config(&other)).expect("psm.toml");
    let o = w
        .psm
        .psmctl(&["recordings", "export", &id, "--format", "text"], None);
    assert!(!o.success(), "{}", o.describe());
    assert!(
        o.stderr_str().contains(&format!(
            "encrypted with key {key_id}, not with the given key {other_id}"
        )),
        "{}",
        o.describe()
    );
    assert!(!has(&o.stdout, MARKER.as_bytes()));
}
