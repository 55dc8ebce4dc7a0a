//! `psm-verify`: checks psm recordings and audit logs with nothing but the files and the
//! evidence public key, for auditors who do not run psm.
//!
//! ```text
//! psm-verify --pubkey ed25519:<hex>|FILE [--audit FILE|DIR]... [REC.psmrec | DIR]...
//! ```
//!
//! Each recording (a `.psmrec` file, or every one in a directory) is checked with
//! `psm_recorder_format::verify`. The `--audit` files are the segments of one audit log, in
//! the order given, checked as one chain with `psm_evidence::audit::ChainVerifier`; a
//! directory stands for its segments: the data directory (its `audit/audit-*.jsonl`, then its
//! `audit.jsonl`) or its `audit/` directory (the same). Segments deleted by retention are
//! reported as such (from the `retention` events), and so are recordings: a recording named on
//! the command line that is absent but that a `retention` event names is reported "deleted by
//! retention", not as an error. One report per log and per recording goes to standard output.
//! Exit status 0 when everything is OK, 1 when anything is not (tampered, truncated, missing,
//! unsealed, or signed by another key), 2 on a usage error or a file that cannot be read.
#![forbid(unsafe_code)]

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use psm_evidence::audit::{ChainVerifier, DeletedRecording};
use psm_evidence::PublicKey;

/// mimalloc, as in every psm process (ARCHITECTURE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use psm_recorder_format::file::EXTENSION;

const USAGE: &str =
    "usage: psm-verify --pubkey ed25519:<hex>|FILE [--audit FILE|DIR]... [RECORDING.psmrec|DIR]...

Checks psm recordings (seal chain and signed trailer) and the audit log (hash chain and signed
checkpoints) against the evidence public key (`psmctl recordings pubkey`, or the data
directory's evidence.pub). The --audit files are one log's segments in order; a directory (the
data directory, or its audit/) stands for all of them. Exit status: 0 all OK, 1 something is
not, 2 usage or I/O error.";

struct Args {
    key: PublicKey,
    audits: Vec<PathBuf>,
    recordings: Vec<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut key = None;
    let mut audits = Vec::new();
    let mut recordings = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--pubkey" => {
                let v = args.next().ok_or("--pubkey needs a value")?;
                key = Some(match PublicKey::parse(&v) {
                    Ok(k) => k,
                    Err(_) => PublicKey::read(Path::new(&v)).map_err(|e| e.to_string())?,
                });
            }
            "--audit" => audits.push(PathBuf::from(args.next().ok_or("--audit needs a file")?)),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => recordings.push(PathBuf::from(a)),
        }
    }
    let key = key.ok_or("--pubkey is required")?;
    if audits.is_empty() && recordings.is_empty() {
        return Err("nothing to verify: name recordings, directories or --audit logs".into());
    }
    Ok(Args {
        key,
        audits,
        recordings,
    })
}

/// The audit segments a `--audit` path names, oldest first: the file itself, or for a
/// directory its closed segments (`audit-*.jsonl`, in `audit/` when it is the data directory)
/// followed by the live `audit.jsonl` (in it, or beside it when it is `audit/`).
fn audit_segments(path: &Path) -> io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let (closed_dir, live) = if path.join("audit.jsonl").is_file() || path.join("audit").is_dir() {
        (path.join("audit"), path.join("audit.jsonl"))
    } else {
        (
            path.to_path_buf(),
            path.parent().unwrap_or(Path::new(".")).join("audit.jsonl"),
        )
    };
    let mut out = Vec::new();
    if closed_dir.is_dir() {
        for e in fs::read_dir(&closed_dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("audit-") && name.ends_with(".jsonl") {
                out.push(p);
            }
        }
    }
    out.sort();
    if live.is_file() {
        out.push(live);
    }
    if out.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no audit segments (audit.jsonl, audit/audit-*.jsonl) in this directory",
        ));
    }
    Ok(out)
}

/// The recordings a path names: the file itself, or every `*.psmrec` in a directory (sorted).
fn expand(path: &Path) -> io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for e in fs::read_dir(path)? {
        let p = e?.path();
        if p.extension().and_then(|e| e.to_str()) == Some(EXTENSION) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn run(args: Args, out: &mut dyn Write) -> Result<bool, String> {
    let mut all_ok = true;
    let mut deleted: Vec<DeletedRecording> = Vec::new();
    if !args.audits.is_empty() {
        let mut segments = Vec::new();
        for given in &args.audits {
            segments
                .extend(audit_segments(given).map_err(|e| format!("{}: {e}", given.display()))?);
        }
        let mut v = ChainVerifier::new(Some(&args.key));
        let named = segments.len() > 1;
        for path in &segments {
            let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let name = path.display().to_string();
            v.read(named.then_some(name.as_str()), BufReader::new(f))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let report = v.finish();
        let what = if named {
            format!("audit log ({} segments)", segments.len())
        } else {
            segments[0].display().to_string()
        };
        writeln!(out, "{what}: {report}").map_err(|e| e.to_string())?;
        all_ok &= report.ok();
        deleted = report.deleted_recordings;
    }
    let mut n = 0;
    let mut bad = 0;
    let mut gone = 0;
    for given in &args.recordings {
        for path in expand(given).map_err(|e| format!("{}: {e}", given.display()))? {
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match deleted.iter().rev().find(|d| d.recording_id == id) {
                        Some(d) => {
                            writeln!(
                                out,
                                "{id}: DELETED: deleted by retention at {} ({}), per the audit log",
                                psm_evidence::utc(d.deleted_ms),
                                d.reason
                            )
                            .map_err(|e| e.to_string())?;
                            gone += 1;
                            continue;
                        }
                        None => return Err(format!("{}: {e}", path.display())),
                    }
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            };
            let report = psm_recorder_format::verify::verify(f, &id, Some(&args.key));
            writeln!(out, "{report}").map_err(|e| e.to_string())?;
            n += 1;
            if !report.ok() {
                bad += 1;
            }
        }
    }
    if n > 1 {
        writeln!(out, "{n} recording(s): {} OK, {bad} not OK", n - bad)
            .map_err(|e| e.to_string())?;
    }
    if !deleted.is_empty() && !args.recordings.is_empty() {
        let named = if gone > 0 {
            format!(" ({gone} of them named here)")
        } else {
            String::new()
        };
        writeln!(
            out,
            "{} recording(s) deleted by retention per the audit log{named}",
            deleted.len()
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(all_ok && bad == 0)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("psm-verify: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(args, &mut out) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let _ = out.flush();
            eprintln!("psm-verify: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let key = format!("ed25519:{}", "ab".repeat(32));
        let a = parse(&["--pubkey", &key, "--audit", "a.jsonl", "r.psmrec"]).expect("ok");
        assert_eq!(a.audits, [PathBuf::from("a.jsonl")]);
        assert_eq!(a.recordings, [PathBuf::from("r.psmrec")]);
        assert!(parse(&["r.psmrec"]).is_err());
        assert!(parse(&["--pubkey", &key]).is_err());
        assert!(parse(&["--pubkey", "/nonexistent/key", "x"]).is_err());
        assert!(parse(&["--pubkey", &key, "--bogus", "x"]).is_err());
    }

    #[test]
    fn an_audit_directory_stands_for_its_segments_in_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path();
        let closed = data.join("audit");
        fs::create_dir(&closed).expect("mkdir");
        for n in [
            "audit-00000000000000000011.jsonl",
            "audit-00000000000000000001.jsonl",
        ] {
            fs::write(closed.join(n), "").expect("write");
        }
        fs::write(closed.join("notes.txt"), "").expect("write");
        fs::write(data.join("audit.jsonl"), "").expect("write");
        let want = vec![
            closed.join("audit-00000000000000000001.jsonl"),
            closed.join("audit-00000000000000000011.jsonl"),
            data.join("audit.jsonl"),
        ];
        assert_eq!(audit_segments(data).expect("data dir"), want);
        assert_eq!(audit_segments(&closed).expect("audit dir"), want);
        let one = data.join("audit.jsonl");
        assert_eq!(
            audit_segments(&one).expect("file"),
            std::slice::from_ref(&one)
        );
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(audit_segments(empty.path()).is_err());
    }
}
