//! `psm`: the psm appliance launcher (see the psm_appliance library docs).

fn main() -> std::process::ExitCode {
    psm_appliance::main_with_args(std::env::args_os())
}
