//! The recorder daemon in-process: relays connect to its socket and send frames; the
//! recordings it writes are read back with the file format's reader.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use psm_recorder::{RecorderError, RECORDER_SOCKET, RECORDINGS_DIR};
use psm_recorder_format::file::{self, Record, RecordingReader};
use psm_recorder_format::verify::{verify, Report, Status};
use psm_recorder_format::{CloseSummary, Direction, Frame, RecordingMeta, Reply};

struct Daemon {
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), RecorderError>>>,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().to_path_buf();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(psm_recorder::run_until(data_dir, async {
                let _ = rx.await;
            }))
        });
        let daemon = Daemon {
            dir,
            stop: Some(tx),
            thread: Some(thread),
        };
        wait_for("socket", || UnixStream::connect(daemon.socket()).is_ok());
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join(RECORDER_SOCKET)
    }

    fn recordings(&self) -> PathBuf {
        self.dir.path().join(RECORDINGS_DIR)
    }

    fn connect(&self) -> UnixStream {
        UnixStream::connect(self.socket()).expect("connect")
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("recorder thread").expect("recorder result");
        }
        assert!(!self.socket().exists(), "socket removed at shutdown");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn meta(id: &str) -> RecordingMeta {
    RecordingMeta {
        protocol: String::new(),
        recording_id: id.into(),
        session_id: format!("session-{id}"),
        user: "alice".into(),
        target: "db1".into(),
        account: "root".into(),
        source: "192.0.2.7:40000".into(),
        start_ms: 1_700_000_000_000,
    }
}

fn send(conn: &mut UnixStream, frames: &[Frame]) {
    let mut buf = Vec::new();
    for f in frames {
        f.encode(&mut buf);
    }
    conn.write_all(&buf).expect("send");
}

/// Pseudo-random, incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct ReadBack {
    meta: RecordingMeta,
    records: Vec<Record>,
    truncated: bool,
}

impl ReadBack {
    fn output(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for r in &self.records {
            if let Record::Data {
                direction: Direction::Output,
                data,
                ..
            } = r
            {
                out.extend_from_slice(data);
            }
        }
        out
    }

    fn summary(&self) -> Option<&CloseSummary> {
        self.records.iter().find_map(|r| match r {
            Record::Close { summary, .. } => Some(summary),
            _ => None,
        })
    }
}

fn read_back(path: &Path) -> ReadBack {
    let mut reader = RecordingReader::open(std::fs::File::open(path).expect("file")).expect("open");
    let mut records = Vec::new();
    while let Some(r) = reader.next_record().expect("record") {
        records.push(r);
    }
    ReadBack {
        meta: reader.meta().clone(),
        records,
        truncated: reader.truncated(),
    }
}

/// Waits until the recording `id` has its CLOSE record, and reads it.
fn closed(daemon: &Daemon, id: &str) -> ReadBack {
    let path = file::path_for(&daemon.recordings(), id).expect("path");
    wait_for(id, || {
        path.exists()
            && file::info(&path)
                .map(|i| i.summary.is_some())
                .unwrap_or(false)
    });
    read_back(&path)
}

/// Verifies recording `id` against the data directory's evidence key.
fn verified(daemon: &Daemon, id: &str) -> Report {
    let key = psm_evidence::PublicKey::read(&daemon.dir.path().join(psm_evidence::PUB_FILE))
        .expect("evidence.pub");
    let f = std::fs::File::open(daemon.recordings().join(format!("{id}.psmrec"))).expect("open");
    verify(f, id, Some(&key))
}

fn data(stream: u64, ts_us: u64, bytes: &[u8]) -> Frame {
    Frame::Data {
        stream,
        ts_us,
        channel: 0,
        direction: Direction::Output,
        data: Bytes::copy_from_slice(bytes),
    }
}

#[test]
fn two_interleaved_streams_are_recorded() {
    let mut daemon = Daemon::start();
    let mut conn = daemon.connect();
    let one = noise(1, 3 * 1024 * 1024 + 17);
    let two = noise(2, 1024 * 1024 + 5);
    send(
        &mut conn,
        &[
            Frame::Open {
                stream: 1,
                meta: meta("one"),
            },
            Frame::Open {
                stream: 2,
                meta: meta("two"),
            },
            Frame::Resize {
                stream: 1,
                ts_us: 1,
                channel: 0,
                cols: 132,
                rows: 43,
            },
        ],
    );
    let chunks_one: Vec<_> = one.chunks(32 * 1024).collect();
    let chunks_two: Vec<_> = two.chunks(7 * 1024).collect();
    for i in 0..chunks_one.len().max(chunks_two.len()) {
        let mut frames = Vec::new();
        if let Some(c) = chunks_one.get(i) {
            frames.push(data(1, 10 + i as u64, c));
        }
        if let Some(c) = chunks_two.get(i) {
            frames.push(data(2, 10 + i as u64, c));
            frames.push(Frame::Data {
                stream: 2,
                ts_us: 10 + i as u64,
                channel: 0,
                direction: Direction::Input,
                data: Bytes::from_static(b"k"),
            });
        }
        send(&mut conn, &frames);
    }
    let summary = |reason: &str, status| CloseSummary {
        end_ms: 1_700_000_009_000,
        exit_status: status,
        exit_signal: None,
        reason: reason.into(),
    };
    send(
        &mut conn,
        &[
            Frame::Close {
                stream: 2,
                ts_us: 5_000,
                summary: summary("client closed", Some(0)),
            },
            Frame::Close {
                stream: 1,
                ts_us: 9_000,
                summary: summary("target closed", Some(2)),
            },
        ],
    );

    let r1 = closed(&daemon, "one");
    assert_eq!(r1.meta, meta("one"));
    assert!(!r1.truncated);
    assert_eq!(r1.output(), one);
    assert_eq!(
        r1.records[0],
        Record::Resize {
            ts_us: 1,
            channel: 0,
            cols: 132,
            rows: 43
        }
    );
    assert_eq!(r1.summary(), Some(&summary("target closed", Some(2))));

    let r2 = closed(&daemon, "two");
    assert_eq!(r2.meta, meta("two"));
    assert!(!r2.truncated);
    assert_eq!(r2.output(), two);
    let inputs = r2
        .records
        .iter()
        .filter(|r| {
            matches!(
                r,
                Record::Data {
                    direction: Direction::Input,
                    ..
                }
            )
        })
        .count();
    assert_eq!(inputs, chunks_two.len());
    assert_eq!(r2.summary(), Some(&summary("client closed", Some(0))));
    assert!(matches!(
        r2.records.last(),
        Some(Record::Close { ts_us: 5_000, .. })
    ));
    // sealed and signed: the 3 MiB stream took several chunks
    for id in ["one", "two"] {
        let rep = verified(&daemon, id);
        assert_eq!(rep.status, Status::Ok, "{rep}");
    }
    assert!(verified(&daemon, "one").chunks >= 2);

    // modes and listing
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&daemon.recordings()), 0o700);
    assert_eq!(mode(&daemon.socket()), 0o600);
    let listed = file::list(&daemon.recordings()).expect("list");
    assert_eq!(listed.len(), 2);
    for info in &listed {
        assert_eq!(mode(&info.path), 0o600);
    }
    daemon.stop();
}

#[test]
fn dropped_connection_closes_its_streams() {
    let mut daemon = Daemon::start();
    let mut conn = daemon.connect();
    let bytes = noise(3, 100_000);
    send(
        &mut conn,
        &[
            Frame::Open {
                stream: 9,
                meta: meta("lost"),
            },
            data(9, 1_000, &bytes),
        ],
    );
    // half a frame, then the relay dies
    let mut partial = Vec::new();
    data(9, 2_000, b"never complete").encode(&mut partial);
    conn.write_all(&partial[..10]).expect("partial");
    drop(conn);

    let r = closed(&daemon, "lost");
    assert!(!r.truncated);
    assert_eq!(r.output(), bytes);
    let s = r.summary().expect("summary");
    assert_eq!(s.reason, psm_recorder::REASON_LINK_LOST);
    assert_eq!(s.exit_status, None);
    // signed as far as the recorder got, and said to be cut short
    let rep = verified(&daemon, "lost");
    assert_eq!(rep.status, Status::Truncated, "{rep}");
    assert!(
        rep.summary
            .contains("the recorder closed it (relay link lost)"),
        "{rep}"
    );
    daemon.stop();
}

#[test]
fn malformed_frame_drops_only_its_connection() {
    let mut daemon = Daemon::start();
    let mut other = daemon.connect();
    send(
        &mut other,
        &[Frame::Open {
            stream: 1,
            meta: meta("bystander"),
        }],
    );

    let mut bad = daemon.connect();
    send(
        &mut bad,
        &[
            Frame::Open {
                stream: 1,
                meta: meta("victim"),
            },
            data(1, 5, b"before"),
        ],
    );
    bad.write_all(&[0, 0, 0, 1, 99]).expect("garbage");
    bad.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    assert_eq!(replies(&mut bad, 1), vec![Reply::Opened { stream: 1 }]);
    let mut sink = [0u8; 16];
    assert_eq!(bad.read(&mut sink).unwrap_or(0), 0, "recorder hung up");
    let victim = closed(&daemon, "victim");
    assert_eq!(victim.output(), b"before");
    assert_eq!(
        victim.summary().map(|s| s.reason.as_str()),
        Some(psm_recorder::REASON_LINK_LOST)
    );

    // the other connection still works, and so do new ones
    send(
        &mut other,
        &[
            data(1, 6, b"still here"),
            Frame::Close {
                stream: 1,
                ts_us: 7,
                summary: CloseSummary {
                    reason: "done".into(),
                    ..Default::default()
                },
            },
        ],
    );
    assert_eq!(closed(&daemon, "bystander").output(), b"still here");
    let mut fresh = daemon.connect();
    send(
        &mut fresh,
        &[
            Frame::Open {
                stream: 1,
                meta: meta("fresh"),
            },
            data(1, 1, b"ok"),
            Frame::Close {
                stream: 1,
                ts_us: 2,
                summary: CloseSummary::default(),
            },
        ],
    );
    assert_eq!(closed(&daemon, "fresh").output(), b"ok");
    daemon.stop();
}

/// Reads replies from the recorder until `n` arrived (10 s at most).
fn replies(conn: &mut UnixStream, n: usize) -> Vec<Reply> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while got.len() < n {
        let k = conn.read(&mut b).expect("read reply");
        assert!(k > 0, "recorder hung up; replies so far: {got:?}");
        buf.extend_from_slice(&b[..k]);
        while let Some((r, used)) = Reply::decode(&buf).expect("valid reply") {
            got.push(r);
            buf.drain(..used);
        }
    }
    got
}

#[test]
fn a_recording_that_cannot_be_created_is_refused_alone_and_overwrites_nothing() {
    let mut daemon = Daemon::start();
    let path = file::path_for(&daemon.recordings(), "taken").expect("path");
    std::fs::write(&path, b"precious").expect("write");
    let mut conn = daemon.connect();
    // a session id the trailer could not hold whole (it would fail verification for ever)
    let long_session = RecordingMeta {
        session_id: "s".repeat(70_000),
        ..meta("longsession")
    };
    let bad_metas = [meta("taken"), meta("../escape"), long_session];
    for (i, bad) in bad_metas.iter().enumerate() {
        let ok = 10 + 2 * i as u64;
        let refused = ok + 1;
        send(
            &mut conn,
            &[
                Frame::Open {
                    stream: ok,
                    meta: meta(&format!("bystander{i}")),
                },
                Frame::Open {
                    stream: refused,
                    meta: bad.clone(),
                },
                data(refused, 1, b"x"),
                data(ok, 1, b"still here"),
            ],
        );
        let got = replies(&mut conn, 2);
        assert_eq!(got[0], Reply::Opened { stream: ok });
        assert!(
            matches!(&got[1], Reply::Refused { stream, reason } if *stream == refused && !reason.is_empty()),
            "{}: {got:?}",
            bad.recording_id
        );
    }
    // the link stayed up: the bystanders are recorded to their normal end
    for (i, stream) in [10u64, 12, 14].into_iter().enumerate() {
        send(
            &mut conn,
            &[Frame::Close {
                stream,
                ts_us: 5,
                summary: CloseSummary {
                    reason: "client closed".into(),
                    ..Default::default()
                },
            }],
        );
        let by = closed(&daemon, &format!("bystander{i}"));
        assert_eq!(by.output(), b"still here");
        assert_eq!(
            by.summary().map(|s| s.reason.as_str()),
            Some("client closed")
        );
    }
    assert_eq!(std::fs::read(&path).expect("read"), b"precious");
    assert!(!daemon.dir.path().join("escape.psmrec").exists());
    assert!(!daemon.recordings().join("longsession.psmrec").exists());
    drop(conn);
    daemon.stop();
}

#[test]
fn a_discarded_recording_leaves_no_file() {
    let mut daemon = Daemon::start();
    let mut conn = daemon.connect();
    send(
        &mut conn,
        &[Frame::Open {
            stream: 1,
            meta: meta("never-started"),
        }],
    );
    assert_eq!(replies(&mut conn, 1), vec![Reply::Opened { stream: 1 }]);
    let path = file::path_for(&daemon.recordings(), "never-started").expect("path");
    assert!(path.exists(), "created on open");
    send(&mut conn, &[Frame::Discard { stream: 1 }]);
    wait_for("discarded file removed", || !path.exists());
    drop(conn);
    daemon.stop();
}

/// A discard for a recording that holds session data (a relay that is wrong, or worse) keeps
/// it: it is finished, signed and said to be closed by the recorder.
#[test]
fn a_discard_keeps_a_recording_that_holds_data() {
    let mut daemon = Daemon::start();
    let mut conn = daemon.connect();
    send(
        &mut conn,
        &[
            Frame::Open {
                stream: 1,
                meta: meta("had-data"),
            },
            data(1, 10, b"rm -rf /srv"),
            Frame::Discard { stream: 1 },
        ],
    );
    assert_eq!(replies(&mut conn, 1), vec![Reply::Opened { stream: 1 }]);
    let r = closed(&daemon, "had-data");
    assert_eq!(r.output(), b"rm -rf /srv");
    assert_eq!(
        r.summary().map(|s| s.reason.as_str()),
        Some(psm_recorder::REASON_DISCARDED_WITH_DATA)
    );
    let rep = verified(&daemon, "had-data");
    assert_eq!(rep.status, Status::Truncated, "{rep}");
    drop(conn);
    daemon.stop();
}

#[test]
fn a_peer_that_does_not_own_the_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("d");
    std::fs::create_dir(&data_dir).expect("mkdir");
    // The test runs as some uid; the directory now belongs to another one.
    let me = std::fs::metadata(dir.path()).expect("meta");
    let other = if std::os::unix::fs::MetadataExt::uid(&me) == 4242 {
        4343
    } else {
        4242
    };
    if std::os::unix::fs::chown(&data_dir, Some(other), None).is_err() {
        panic!("this test must run as root (it chowns a directory to uid {other})");
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let dd = data_dir.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(psm_recorder::run_until(dd, async {
            let _ = rx.await;
        }))
    });
    let sock = data_dir.join(RECORDER_SOCKET);
    wait_for("socket", || UnixStream::connect(&sock).is_ok());
    let mut conn = UnixStream::connect(&sock).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // a forged recording: the recorder must hang up without creating it
    let mut buf = Vec::new();
    Frame::Open {
        stream: 1,
        meta: meta("forged"),
    }
    .encode(&mut buf);
    let _ = conn.write_all(&buf);
    let mut b = [0u8; 16];
    assert_eq!(conn.read(&mut b).unwrap_or(0), 0, "connection refused");
    let forged = file::path_for(&data_dir.join(RECORDINGS_DIR), "forged").expect("path");
    assert!(!forged.exists(), "no recording forged");
    let _ = tx.send(());
    thread.join().expect("thread").expect("recorder");
}

#[test]
fn open_recordings_are_flushed_and_finished_at_shutdown() {
    let mut daemon = Daemon::start();
    let mut conn = daemon.connect();
    let bytes = noise(4, 50_000);
    send(
        &mut conn,
        &[
            Frame::Open {
                stream: 1,
                meta: meta("running"),
            },
            data(1, 1, &bytes),
        ],
    );
    // within about a second the data is readable from the file, the recording still open
    let path = file::path_for(&daemon.recordings(), "running").expect("path");
    wait_for("periodic flush", || {
        path.exists() && {
            let r = read_back(&path);
            r.truncated && r.output() == bytes
        }
    });
    daemon.stop();
    let r = read_back(&path);
    assert!(!r.truncated);
    assert_eq!(r.output(), bytes);
    assert_eq!(
        r.summary().map(|s| s.reason.as_str()),
        Some(psm_recorder::REASON_SHUTDOWN)
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join(RECORDER_SOCKET);
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    let data_dir = dir.path().to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(psm_recorder::run_until(data_dir, async {
            let _ = rx.await;
        }))
    });
    wait_for("socket", || UnixStream::connect(&sock).is_ok());
    let _ = tx.send(());
    thread.join().expect("thread").expect("result");
    assert!(!sock.exists());
}

#[test]
#[ignore = "throughput check: cargo test -p psm-recorder --test daemon -- --ignored --nocapture"]
fn throughput_random_256_mib() {
    let mut daemon = Daemon::start();
    let total = 256 * 1024 * 1024;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut all = vec![0u8; total];
    for b in all.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let all = Bytes::from(all);
    let mut conn = daemon.connect();
    let started = Instant::now();
    send(
        &mut conn,
        &[Frame::Open {
            stream: 1,
            meta: meta("bulk"),
        }],
    );
    let mut buf = Vec::with_capacity(1 << 20);
    for (i, at) in (0..total).step_by(32 * 1024).enumerate() {
        Frame::Data {
            stream: 1,
            ts_us: i as u64,
            channel: 0,
            direction: Direction::Output,
            data: all.slice(at..at + 32 * 1024),
        }
        .encode(&mut buf);
        if buf.len() >= 1 << 20 {
            conn.write_all(&buf).expect("send");
            buf.clear();
        }
    }
    Frame::Close {
        stream: 1,
        ts_us: u64::MAX / 2,
        summary: CloseSummary::default(),
    }
    .encode(&mut buf);
    conn.write_all(&buf).expect("send");
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    // the recorder hangs up once it has handled (and fsynced) everything
    let mut sink = [0u8; 1];
    let _ = conn.read(&mut sink);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "recorded {} MiB in {secs:.2} s: {:.0} MB/s",
        total >> 20,
        total as f64 / secs / 1e6
    );
    let r = read_back(&file::path_for(&daemon.recordings(), "bulk").expect("path"));
    assert!(!r.truncated);
    assert_eq!(r.output().len(), total);
    assert!(r.output() == all[..]);
    daemon.stop();
}

#[test]
fn a_recording_that_cannot_be_written_fails_alone_and_the_link_stays_up() {
    let mut daemon = Daemon::start();
    // A 1 MiB file system under recordings/: the first big write cannot fit.
    let rec_dir = daemon.recordings();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "psm-test"])
        .arg(&rec_dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(mounted, "this test mounts a tmpfs and must run as root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(rec_dir);
    let mut conn = daemon.connect();
    send(
        &mut conn,
        &[Frame::Open {
            stream: 1,
            meta: meta("too-big"),
        }],
    );
    assert_eq!(replies(&mut conn, 1), vec![Reply::Opened { stream: 1 }]);
    for i in 0..8 {
        send(&mut conn, &[data(1, i, &noise(i, 1 << 20))]);
    }
    let got = replies(&mut conn, 1);
    assert!(
        matches!(&got[0], Reply::Failed { stream: 1, reason } if reason.contains("cannot")),
        "{got:?}"
    );
    // the link is still served: a later frame of the failed stream is ignored, a new stream
    // is answered
    send(
        &mut conn,
        &[
            data(1, 9, b"dropped"),
            Frame::Open {
                stream: 2,
                meta: meta("next"),
            },
        ],
    );
    let next = replies(&mut conn, 1);
    assert_eq!(next[0].stream(), 2, "{next:?}");
    drop(conn);
    daemon.stop();
}

/// `Frame::Packed` of `payloads` (one stream's DATA, packed as the relay's link does).
fn packed(stream: u64, payloads: &[(u64, &[u8])]) -> Frame {
    let mut packer = file::pack::Packer::new().expect("packer");
    let list: Vec<file::pack::Payload<'_>> = payloads
        .iter()
        .map(|(ts_us, data)| file::pack::Payload {
            ts_us: *ts_us,
            channel: 0,
            direction: Direction::Output,
            data,
        })
        .collect();
    let p = packer.pack(stream, &list).expect("pack");
    Frame::Packed {
        stream,
        ts_us: p.last_ts_us,
        plain_len: p.plain_len,
        data_len: p.data_len,
        frame: Bytes::from(p.frame),
    }
}

#[test]
fn packed_frames_are_recorded_as_their_data_and_a_bad_one_fails_its_stream_alone() {
    let mut daemon = Daemon::start();
    let mut conn = daemon.connect();
    let zeros = vec![0u8; 64 * 1024];
    let random = noise(7, 100_000);
    send(
        &mut conn,
        &[
            Frame::Open {
                stream: 1,
                meta: meta("packed"),
            },
            Frame::Open {
                stream: 2,
                meta: meta("forged"),
            },
            Frame::Open {
                stream: 3,
                meta: meta("inflated"),
            },
        ],
    );
    assert_eq!(
        replies(&mut conn, 3),
        [
            Reply::Opened { stream: 1 },
            Reply::Opened { stream: 2 },
            Reply::Opened { stream: 3 }
        ]
    );
    let good = packed(1, &[(2, &zeros), (3, &random)]);
    // a frame that claims one byte more than it holds
    let Frame::Packed {
        ts_us,
        plain_len,
        data_len,
        frame,
        ..
    } = packed(2, &[(2, &zeros)])
    else {
        unreachable!()
    };
    let forged = Frame::Packed {
        stream: 2,
        ts_us,
        plain_len: plain_len + 1,
        data_len,
        frame: frame.clone(),
    };
    // one that claims more payload than it holds (it would move the durable count past what
    // was sent)
    let inflated = Frame::Packed {
        stream: 3,
        ts_us,
        plain_len,
        data_len: data_len + 1,
        frame,
    };
    send(
        &mut conn,
        &[
            data(1, 1, b"$ cat file\r\n"),
            good,
            forged,
            inflated,
            data(1, 4, b"$ "),
            Frame::Close {
                stream: 1,
                ts_us: 5,
                summary: CloseSummary {
                    reason: "client closed".into(),
                    ..Default::default()
                },
            },
        ],
    );
    // streams 2 and 3 fail on their forged frames; every payload byte of stream 1 is counted durable
    // at its close (replies come as they come: read until both are in)
    let total = (12 + zeros.len() + random.len() + 2) as u64;
    let failed = |r: &Reply, s: u64| matches!(r, Reply::Failed { stream, reason } if *stream == s && reason.contains("packed"));
    let mut got = Vec::new();
    while !(got.iter().any(|r| failed(r, 2))
        && got.iter().any(|r| failed(r, 3))
        && got.contains(&Reply::Durable {
            stream: 1,
            bytes: total,
        }))
    {
        assert!(got.len() < 20, "{got:?}");
        got.extend(replies(&mut conn, 1));
    }
    let back = closed(&daemon, "packed");
    let mut want = b"$ cat file\r\n".to_vec();
    want.extend_from_slice(&zeros);
    want.extend_from_slice(&random);
    want.extend_from_slice(b"$ ");
    assert_eq!(back.output(), want);
    assert!(!back.truncated);
    let report = verified(&daemon, "packed");
    assert_eq!(report.status, Status::Ok, "{report}");
    drop(conn);
    daemon.stop();
}
