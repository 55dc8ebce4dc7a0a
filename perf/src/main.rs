//! `psm-perf`: operator checks for a psm gateway host (see the library docs).

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod search_bench;

/// Operator performance tool for psm.
#[derive(Parser, Debug)]
#[command(name = "psm-perf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the host's tuning for a gateway (OK/WARN per item, with fixes).
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write N synthetic shell recordings into DIR (which must not exist), index them as
    /// psm-recorder does, and time searches over them (perf/BENCHMARKS.md).
    SearchBench {
        /// Folder to create for the recordings and their index.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// How many recordings.
        #[arg(long, default_value_t = 1000)]
        recordings: usize,
        /// Commands per recording.
        #[arg(long, default_value_t = 100)]
        commands: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::SearchBench {
            dir,
            recordings,
            commands,
        } => search_bench::run(&dir, recordings, commands)?,
        Command::Check { json } => {
            let checks = psm_perf::run_checks(&psm_perf::RealHost);
            let out = if json {
                let mut s = serde_json::to_string_pretty(&psm_perf::render_json(&checks))
                    .context("encoding the report")?;
                s.push('\n');
                s
            } else {
                psm_perf::render_text(&checks)
            };
            std::io::stdout()
                .lock()
                .write_all(out.as_bytes())
                .context("writing the report")?;
        }
    }
    Ok(())
}
