#!/usr/bin/env bash
# psm's run command (the README's): builds every binary in release mode, then runs
# `psm up` with the given arguments (see `psm up --help`), e.g.
#
#   scripts/run.sh --data-dir ./psm-data --listen 0.0.0.0:2222
#
# Relative paths in the arguments are taken from the directory you run it in.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo build --release --workspace --bins --manifest-path "$root/Cargo.toml"
exec "${CARGO_TARGET_DIR:-$root/target}/release/psm" up "$@"
