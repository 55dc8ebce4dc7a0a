//! `psm`: the psm appliance launcher (see the psm_appliance library docs).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    psm_appliance::main_with_args(std::env::args_os())
}
