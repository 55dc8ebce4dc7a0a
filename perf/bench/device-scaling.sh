#!/usr/bin/env bash
# device-scaling.sh - issue #9's multi-core scaling run, for a machine with many cores and none
# of the tools (no cargo, sshd or socat): the release binaries travel stripped in
# target/devbin.tar.xz, made here with
#
#   cargo build --release --workspace --bins
#   mkdir -p target/devbin && for b in psm psmctl psm-relay psm-control psm-recorder psm-perf; do
#     strip -o target/devbin/$b target/release/$b; done
#   tar -C target -cJf target/devbin.tar.xz devbin
#
# and on the machine: psm on the first half of the CPUs (PSM_BENCH_PSM_CPUS), the client and the
# light target on the other half; `psm-perf bench --scaling` with 1, 2, 4 and half-1 workers
# (2 uploads per worker, MIB MiB each), on the default back end and again with PSM_RELAY_IO=epoll,
# then the whole bench table with WORKERS workers and IDLE idle sessions. Each
# step is bounded; results go to $OUT (or ./device-out).
set -euo pipefail
out="${OUT:-$PWD/device-out}"
mkdir -p "$out"
tar -C /tmp -xJf target/devbin.tar.xz
b=/tmp/devbin
cpus=$(nproc)
half=$((cpus / 2))
{ echo "# $(uname -r), $cpus cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"; "$b/psm-perf" check || true; } > "$out/host.txt" 2>&1
export PSM_BENCH_PSM_CPUS="0-$((half - 1))"
ulimit -n "$(ulimit -Hn)" || true
run_scaling() { # $1: file name; then the timeout; the relay's back end comes from PSM_RELAY_IO
  timeout "$2" taskset -c "$half-$((cpus - 1))" "$b/psm-perf" bench --bin "$b" \
    --scaling "1,2,4,$((half - 1))" --mib "${MIB:-1024}" --client-threads "$half" \
    > "$out/$1.txt" 2> "$out/$1.err" || echo "$1 rc=$?" >> "$out/$1.txt"
}
run_scaling scaling 120
PSM_RELAY_IO=epoll run_scaling scaling-epoll 100
timeout 240 taskset -c "$half-$((cpus - 1))" "$b/psm-perf" bench --bin "$b" --workers "${WORKERS:-4}" \
  --mib "${BENCH_MIB:-256}" --idle "${IDLE:-10000}" > "$out/bench.txt" 2> "$out/bench.err" || echo "bench rc=$?" >> "$out/bench.txt"
cat "$out/host.txt" "$out/scaling.txt" "$out/scaling-epoll.txt" "$out/bench.txt"
