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
# light target on the other half. For each relay back end (io_uring, then epoll):
# `psm-perf bench --scaling` with 1, 2, 4 and half-1 workers (2 uploads per worker, MIB MiB
# each); then the bulk table, then echo and IDLE idle sessions, with WORKERS workers. Each step
# is bounded and writes its own file to $OUT (or ./device-out); progress goes to log.txt.
set -uo pipefail
out="${OUT:-$PWD/device-out}"
mkdir -p "$out"
tar -C /tmp -xJf target/devbin.tar.xz
b=/tmp/devbin
cpus=$(nproc)
half=$((cpus / 2))
{ echo "# $(uname -r), $cpus cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"; "$b/psm-perf" check || true; } > "$out/host.txt" 2>&1
export PSM_BENCH_PSM_CPUS="0-$((half - 1))"
ulimit -n "$(ulimit -Hn)" || true
step() { # file, timeout, bench arguments...
  local file=$1 limit=$2
  shift 2
  echo "== $file (PSM_RELAY_IO=${PSM_RELAY_IO:-auto}) $(date +%T)" >> "$out/log.txt"
  timeout "$limit" taskset -c "$half-$((cpus - 1))" "$b/psm-perf" bench --bin "$b" "$@" \
    > "$out/$file.txt" 2>> "$out/log.txt" || echo "$file rc=$?" >> "$out/$file.txt"
}
for io in uring epoll; do
  PSM_RELAY_IO=$io step "scaling-$io" 80 --scaling "1,2,4,$((half - 1))" --mib "${MIB:-1024}" \
    --client-threads "$half"
done
for io in uring epoll; do
  PSM_RELAY_IO=$io step "bulk-$io" 60 --workers "${WORKERS:-4}" --mib "${BENCH_MIB:-256}" --only bulk
done
for io in uring epoll; do
  PSM_RELAY_IO=$io step "echo-idle-$io" 90 --workers "${WORKERS:-4}" --idle "${IDLE:-4000}" \
    --only echo,idle
done
cd "$out" && for f in host scaling-uring scaling-epoll bulk-uring bulk-epoll echo-idle-uring echo-idle-epoll; do
  echo "### $f"; cat "$f.txt"; done
