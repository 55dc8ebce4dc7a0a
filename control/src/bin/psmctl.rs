//! `psmctl`: the psm admin CLI. All logic lives in `psm_control::cli`.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match psm_control::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 1 like any
            // other psmctl error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let res = psm_control::cli::run(cli, &mut stdin, &mut out)
        .and_then(|()| out.flush().map_err(psm_control::cli::CliError::Output));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(psm_control::cli::CliError::Denied | psm_control::cli::CliError::Unverified) => {
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("psmctl: {e}");
            ExitCode::FAILURE
        }
    }
}
