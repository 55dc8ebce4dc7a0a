//! `psm-verify`: checks psm recordings and audit logs with nothing but the files and the
//! evidence public key, for auditors who do not run psm.
//!
//! ```text
//! psm-verify --pubkey ed25519:<hex>|FILE [--audit audit.jsonl]... [REC.psmrec | DIR]...
//! ```
//!
//! Each recording (a `.psmrec` file, or every one in a directory) is checked with
//! `psm_recorder_format::verify`, each audit log with `psm_evidence::audit::verify_log`; one
//! report per file goes to standard output. Exit status 0 when everything is OK, 1 when
//! anything is not (tampered, truncated, unsealed, or signed by another key), 2 on a usage
//! error or a file that cannot be read.
#![forbid(unsafe_code)]

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use psm_evidence::PublicKey;
use psm_recorder_format::file::EXTENSION;

const USAGE: &str =
    "usage: psm-verify --pubkey ed25519:<hex>|FILE [--audit FILE]... [RECORDING.psmrec|DIR]...

Checks psm recordings (seal chain and signed trailer) and audit logs (hash chain and signed
checkpoints) against the evidence public key (`psmctl recordings pubkey`, or the data
directory's evidence.pub). Exit status: 0 all OK, 1 something is not, 2 usage or I/O error.";

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
    for path in &args.audits {
        let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let report = psm_evidence::audit::verify_log(BufReader::new(f), Some(&args.key))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(out, "{}: {report}", path.display()).map_err(|e| e.to_string())?;
        all_ok &= report.ok();
    }
    let mut n = 0;
    let mut bad = 0;
    for given in &args.recordings {
        for path in expand(given).map_err(|e| format!("{}: {e}", given.display()))? {
            let f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
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
}
