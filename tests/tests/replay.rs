//! Replaying and exporting what a hostile session printed: `psmctl recordings play` drops the
//! escape sequences that reach outside the screen (clipboard, title, terminal queries, C1
//! controls) and keeps the text and its colours, `--raw` gives the bytes as recorded; and
//! exporting 256 MiB of output without a single newline stays within a fixed memory bound
//! (peak RSS of psmctl, measured by the parent's `getrusage`) for text, asciicast and replay.

use psm_tests::*;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
/// What psmctl may use at its peak to render any recording.
const PSMCTL_RSS_LIMIT_KIB: u64 = 64 * 1024;
/// The text export wraps at this many columns when there is no terminal (an exec session).
const MAX_COLUMNS: usize = 1024;

/// Runs `cmd` (an exec session through psm) and returns the recording id of its session.
fn record_exec(w: &World, cmd: &mut Command, timeout: Duration) -> String {
    let mark = w.psm.audit_mark();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh failed ({status:?}): {err}"
    );
    let end = w
        .psm
        .wait_audit_after(mark, "session_end", Duration::from_secs(10), |e| {
            jstr(e, "event") == "session_end"
        });
    let id = jstr(&end, "recording_id").to_string();
    assert!(!id.is_empty(), "session_end without recording_id: {end}");
    id
}

/// Runs psmctl under python3, which reports the peak RSS of its child (`ru_maxrss`, KiB) on
/// its last stderr line; stdout goes to `stdout_to`. Returns (success, peak KiB, stderr).
fn psmctl_peak(w: &World, args: &[&str], stdout_to: &Path) -> (bool, u64, String) {
    let script = "import resource, subprocess, sys\n\
                  with open(sys.argv[1], 'wb') as out:\n    \
                      code = subprocess.run(sys.argv[2:], stdout=out).returncode\n\
                  print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n\
                  sys.exit(code)\n";
    let mut cmd = Command::new(python3());
    cmd.arg("-c")
        .arg(script)
        .arg(stdout_to)
        .arg(bin("psmctl"))
        .arg("--data-dir")
        .arg(w.psm.data_dir())
        .args(args)
        .env_remove("PSM_DATA_DIR");
    let out = run_cmd(&mut cmd, None, Duration::from_secs(120));
    let err = out.stderr_str();
    let peak = err
        .lines()
        .last()
        .and_then(|l| l.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no ru_maxrss from the wrapper:\n{}", out.describe()));
    (out.success(), peak, err)
}

#[test]
fn replay_drops_what_reaches_outside_the_screen() {
    let w = World::new();
    // clipboard write, two title sets, a DECRQSS request, a cursor position request, a raw C1
    // CSI with a device status request, coloured text, then U+009B (CSI) and U+202E in UTF-8
    let script = r"printf '\033]52;c;SGVsbG8=\007\033]0;pwned\007\033]2;pwned2\033\\\033P$q m\033\\\033[6n\2335n\033[1;32mGREEN-OK\033[0m plain-text\n\302\2331m\342\200\256txt\n'";
    let id = record_exec(&w, w.ssh().arg(script), T);

    let safe = w.psm.psmctl_timeout(
        &["recordings", "play", &id, "--speed", "100"],
        None,
        Duration::from_secs(60),
    );
    assert!(safe.success(), "play:\n{}", safe.describe());
    let out = &safe.stdout;
    let has = |needle: &[u8]| out.windows(needle.len()).any(|w| w == needle);
    for bad in [
        &b"\x1b]"[..],
        b"52;c;",
        b"SGVsbG8=",
        b"pwned",
        b"\x1bP",
        b"$q",
        b"\x1b[6n",
        b"5n",
        b"\x07",
    ] {
        assert!(
            !has(bad),
            "replay has {:?}:\n{}",
            String::from_utf8_lossy(bad),
            safe.describe()
        );
    }
    // a raw C1 byte would make it invalid UTF-8
    let shown = std::str::from_utf8(out)
        .unwrap_or_else(|e| panic!("replay is not UTF-8 ({e}):\n{}", safe.describe()));
    assert!(
        !shown.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
        "replay has a C1 control:\n{}",
        safe.describe()
    );
    assert!(
        has(b"\x1b[1;32mGREEN-OK\x1b[0m plain-text"),
        "replay lacks the coloured text:\n{}",
        safe.describe()
    );

    let raw = w.psm.psmctl_timeout(
        &["recordings", "play", &id, "--speed", "100", "--raw"],
        None,
        Duration::from_secs(60),
    );
    assert!(raw.success(), "play --raw:\n{}", raw.describe());
    let out = &raw.stdout;
    let has = |needle: &[u8]| out.windows(needle.len()).any(|w| w == needle);
    for kept in [
        &b"\x1b]52;c;SGVsbG8=\x07"[..],
        b"\x1b]0;pwned\x07",
        b"\x1b]2;pwned2\x1b\\",
        b"\x1bP$q m\x1b\\",
        b"\x1b[6n\x9b5n",
        b"\x1b[1;32mGREEN-OK\x1b[0m plain-text\n",
    ] {
        assert!(
            has(kept),
            "raw replay lacks {:?}:\n{}",
            String::from_utf8_lossy(kept),
            raw.describe()
        );
    }

    // asciicast: C1 and bidi controls are escapes in the file, and asciinema still reads it
    let cast = w.psm.work_dir().join("hostile.cast");
    w.psm.psmctl_ok(
        &[
            "recordings",
            "export",
            &id,
            "--format",
            "asciicast",
            "-o",
            &cast.display().to_string(),
        ],
        None,
    );
    let cast_text = std::fs::read_to_string(&cast).expect("read asciicast export");
    assert!(
        !cast_text
            .chars()
            .any(|c| ('\u{80}'..='\u{9f}').contains(&c) || c == '\u{202e}'),
        "raw C1 or bidi control in the asciicast: {cast_text:?}"
    );
    assert!(
        cast_text.contains("\\u009b1m") && cast_text.contains("\\u202e"),
        "{cast_text:?}"
    );
    if run_cmd(
        Command::new("sh").args(["-c", "command -v asciinema"]),
        None,
        T,
    )
    .success()
    {
        // asciinema 2.x `cat` opens /dev/tty: give it a terminal
        let mut cat = Command::new("asciinema");
        cat.arg("cat").arg(&cast);
        let mut term = PtySession::spawn(&cat, &[("TERM", "xterm")], 24, 80);
        assert_eq!(term.wait(T), Some(0), "asciinema cat:\n{}", term.output());
        assert!(term.output().contains("GREEN-OK"), "{}", term.output());
    } else {
        panic!("asciinema is not installed: scripts/test.sh installs it");
    }

    // the text export shows the text; the raw C1 byte is no UTF-8: U+FFFD, never a raw control
    let text = w
        .psm
        .psmctl_ok(&["recordings", "export", &id, "--format", "text"], None);
    assert!(text.contains("GREEN-OK plain-text"), "{text}");
    assert!(text.contains("\\u{9b}1m\\u{202e}txt"), "{text}");
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "text export has a raw control: {text:?}"
    );
}

/// Reads `path` in chunks: (number of `a`, number of newlines, longest line), and checks it
/// holds nothing else.
fn scan_text(path: &Path) -> (u64, u64, usize) {
    let mut r = BufReader::new(File::open(path).expect("open export"));
    let mut buf = vec![0u8; 1 << 20];
    let (mut a, mut nl, mut run, mut longest) = (0u64, 0u64, 0usize, 0usize);
    loop {
        let n = r.read(&mut buf).expect("read export");
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            match b {
                b'a' => {
                    a += 1;
                    run += 1;
                    longest = longest.max(run);
                }
                b'\n' => {
                    nl += 1;
                    run = 0;
                }
                other => panic!("unexpected byte {other:#04x} in the text export"),
            }
        }
    }
    (a, nl, longest)
}

#[test]
fn exports_of_one_endless_line_use_bounded_memory() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let w = World::new();
    let id = record_exec(
        &w,
        w.ssh()
            .arg(format!("head -c {SIZE} /dev/zero | tr '\\0' a")),
        Duration::from_secs(120),
    );
    let rec = w
        .psm
        .data_dir()
        .join("recordings")
        .join(format!("{id}.psmrec"));
    let on_disk = std::fs::metadata(&rec).expect("recording file").len();
    assert!(on_disk < SIZE / 64, "recording of {on_disk} bytes");

    let work = w.psm.work_dir();
    let text_out = work.join("endless.txt");
    let (ok, peak, err) = psmctl_peak(
        &w,
        &["recordings", "export", &id, "--format", "text"],
        &text_out,
    );
    eprintln!("text export: psmctl peak RSS {peak} KiB");
    assert!(ok, "text export failed: {err}");
    assert!(
        peak < PSMCTL_RSS_LIMIT_KIB,
        "text export peak RSS {peak} KiB >= {PSMCTL_RSS_LIMIT_KIB} KiB"
    );
    let (a, nl, longest) = scan_text(&text_out);
    assert_eq!(a, SIZE, "every character is in the text export");
    assert_eq!(longest, MAX_COLUMNS, "lines wrap at {MAX_COLUMNS} columns");
    assert_eq!(nl, SIZE / MAX_COLUMNS as u64 - 1);
    std::fs::remove_file(&text_out).expect("remove text export");

    let cast_out = work.join("endless.cast");
    let (ok, peak, err) = psmctl_peak(
        &w,
        &["recordings", "export", &id, "--format", "asciicast"],
        &cast_out,
    );
    eprintln!("asciicast export: psmctl peak RSS {peak} KiB");
    assert!(ok, "asciicast export failed: {err}");
    assert!(
        peak < PSMCTL_RSS_LIMIT_KIB,
        "asciicast export peak RSS {peak} KiB >= {PSMCTL_RSS_LIMIT_KIB} KiB"
    );
    let cast_len = std::fs::metadata(&cast_out).expect("cast").len();
    assert!(cast_len > SIZE, "asciicast of {cast_len} bytes");
    std::fs::remove_file(&cast_out).expect("remove asciicast export");

    let (ok, peak, err) = psmctl_peak(
        &w,
        &["recordings", "play", &id, "--speed", "1000"],
        Path::new("/dev/null"),
    );
    eprintln!("replay: psmctl peak RSS {peak} KiB");
    assert!(ok, "replay failed: {err}");
    assert!(
        peak < PSMCTL_RSS_LIMIT_KIB,
        "replay peak RSS {peak} KiB >= {PSMCTL_RSS_LIMIT_KIB} KiB"
    );
}

/// `psmctl recordings play` under a real terminal takes keys while it plays: `+` speeds it up,
/// space pauses and resumes, `q` quits at once. The recording's gaps, slowed 20 times, are
/// far longer than every bound below, so only the keys can make the replay meet them.
#[test]
fn play_takes_keys_while_playing() {
    let w = World::new();
    let id = record_exec(
        &w,
        w.ssh()
            .arg("echo PLAY-ONE; sleep 1; echo PLAY-TWO; sleep 3; echo PLAY-THREE"),
        T,
    );
    let play = |speed: &str| {
        let mut cmd = Command::new(bin("psmctl"));
        cmd.arg("--data-dir")
            .arg(w.psm.data_dir())
            .args(["recordings", "play", &id, "--speed", speed])
            .args(["--idle-limit", "60"])
            .env_remove("PSM_DATA_DIR");
        PtySession::spawn(&cmd, &[("TERM", "xterm")], 24, 80)
    };

    // at 1/20 speed PLAY-TWO is due 20 s after PLAY-ONE; four `+` make it 0.8x (1.25 s left)
    let mut pty = play("0.05");
    pty.expect("PLAY-ONE", T);
    pty.send("++++");
    pty.expect("PLAY-TWO", Duration::from_secs(8));
    // PLAY-THREE is now due 3.75 s later: paused, it does not come; resumed, it does
    pty.send(" ");
    assert!(
        !wait_for(Duration::from_secs(6), || pty
            .output()
            .contains("PLAY-THREE")),
        "paused, the replay went on:\n{}",
        pty.output()
    );
    pty.send(" ");
    pty.expect("PLAY-THREE", Duration::from_secs(10));
    assert_eq!(pty.wait(T), Some(0), "{}", pty.output());

    // q quits in the middle of a 20 s gap
    let mut pty = play("0.05");
    pty.expect("PLAY-ONE", T);
    pty.send("q");
    assert_eq!(
        pty.wait(Duration::from_secs(5)),
        Some(0),
        "q did not end the replay:\n{}",
        pty.output()
    );
    assert!(!pty.output().contains("PLAY-TWO"), "{}", pty.output());
}
