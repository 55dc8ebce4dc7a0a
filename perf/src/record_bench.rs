//! `psm-perf record-bench`: what recording costs per GiB, by kind of data, with the recorder's
//! adaptive zstd level beside a fixed level, and the seals of each format version written
//! (SHA-256 over the decompressed bytes in version 1, BLAKE3 over them in version 3, BLAKE3
//! over the bytes as written in version 5), in the same run (perf/BENCHMARKS.md).

use std::io;
use std::time::Instant;

use bytes::Bytes;
use psm_recorder_format::file::{ChainHash, Record, RecordingWriter};
use psm_recorder_format::{Direction, RecordingMeta};

/// CPU seconds this thread has used (user + system).
fn thread_cpu() -> f64 {
    let text = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let tick = 100.0; // USER_HZ on Linux
    let f: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / tick
}

fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut v = vec![0u8; len];
    for b in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    v
}

fn text(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 128);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(
            format!(
                "-rw-r--r-- 1 root root {:>8} Dec  4 09:{:02} file-{i}.log\r\n",
                i * 7919 % 100_000,
                i % 60
            )
            .as_bytes(),
        );
        i += 1;
    }
    v.truncate(len);
    v
}

/// The seals of a format version.
#[derive(Clone, Copy)]
enum Seals {
    /// Version 1: SHA-256 over the decompressed bytes.
    Sha256,
    /// Version 3: BLAKE3 over the decompressed bytes.
    Blake3Stream,
    /// Version 5 (what psm-recorder writes): BLAKE3 over the bytes as written.
    Blake3Chunks,
}

impl Seals {
    fn name(self) -> &'static str {
        match self {
            Seals::Sha256 => "v1 SHA-256",
            Seals::Blake3Stream => "v3 BLAKE3",
            Seals::Blake3Chunks => "v5 BLAKE3",
        }
    }
}

/// One line: MB/s, CPU-seconds per GiB and output share, writing `total` bytes of `data`
/// (repeated) as the recorder does (32 KiB records, a chunk every 256 KiB).
fn run_one(data: &Bytes, total: usize, adaptive: bool, seals: Seals) -> (f64, f64, f64) {
    let meta = RecordingMeta {
        protocol: String::new(),
        recording_id: "bench".into(),
        session_id: "bench".into(),
        user: "bench".into(),
        target: "bench".into(),
        account: "bench".into(),
        source: "127.0.0.1:1".into(),
        start_ms: 0,
    };
    let mut w = match seals {
        Seals::Sha256 => {
            RecordingWriter::with_hash(Counting::default(), &meta, None, ChainHash::Sha256)
        }
        Seals::Blake3Stream => RecordingWriter::new_stream(Counting::default(), &meta),
        Seals::Blake3Chunks => RecordingWriter::new(Counting::default(), &meta),
    }
    .expect("writer");
    if !adaptive {
        w.fixed_level();
    }
    let piece = 32 * 1024;
    let (t0, c0) = (Instant::now(), thread_cpu());
    let mut done = 0;
    while done < total {
        let at = done % (data.len() - piece);
        w.write(&Record::Data {
            ts_us: done as u64,
            channel: 0,
            direction: Direction::Output,
            data: data.slice(at..at + piece),
        })
        .expect("write");
        done += piece;
        if w.pending_bytes() >= 256 * 1024 {
            w.flush().expect("flush");
        }
    }
    let out = w.finish().expect("finish").0;
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu() - c0);
    let gib = total as f64 / (1u64 << 30) as f64;
    (
        total as f64 / secs / 1e6,
        cpu / gib,
        out as f64 / total as f64,
    )
}

#[derive(Default)]
struct Counting(u64);

impl io::Write for Counting {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Prints the table for `mib` MiB of each kind of data.
pub fn run(mib: usize) {
    let total = mib << 20;
    println!(
        "{:<8} {:<9} {:<10} {:>9} {:>12} {:>8}",
        "data", "level", "seals", "MB/s", "CPU-s/GiB", "output"
    );
    for (name, data) in [
        ("random", Bytes::from(random(8 << 20))),
        ("text", Bytes::from(text(8 << 20))),
        ("zeros", Bytes::from(vec![0u8; 8 << 20])),
    ] {
        for (adaptive, seals) in [
            (false, Seals::Sha256),
            (true, Seals::Sha256),
            (true, Seals::Blake3Stream),
            (true, Seals::Blake3Chunks),
        ] {
            let (mbs, cpu, share) = run_one(&data, total, adaptive, seals);
            println!(
                "{name:<8} {:<9} {:<10} {mbs:>9.0} {cpu:>12.2} {:>7.1}%",
                if adaptive { "adaptive" } else { "fixed 1" },
                seals.name(),
                share * 100.0
            );
        }
    }
}
