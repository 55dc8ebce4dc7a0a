#!/usr/bin/env bash
# profile-relay.sh - where psm's CPU goes during a bulk SSH transfer (perf, software clock).
#
# Starts the shared peer baselines' target sshd (127.0.0.1:22022), a release `psm up` in a
# temporary data directory on 127.0.0.1:${PSM_PORT:-2222}, warms the page cache with one
# transfer, then records `perf record -e cpu-clock -g` on psm-relay and psm-recorder while
# MIB MiB (default 1024) of random bytes go down (target -> user) and the same up, and prints
# the top symbols of each process and the CPU-seconds per GiB of psm's processes beside the
# OpenSSH client's and sshd's own. Bounded: every transfer has a timeout; psm stops at the end.
#
#   cargo build --release --workspace --bins
#   perf/bench/profile-relay.sh            # MIB=1024 CIPHER=aes128-gcm@openssh.com
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
shared="${PSM_SHARED:-$root/../shared}/bench"
bin="$root/target/release"
port="${PSM_PORT:-2222}"
mib="${MIB:-1024}"
cipher="${CIPHER:-aes128-gcm@openssh.com}"
export PERFBASE="${PERFBASE:-/tmp/perfbase}"
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
extra_cleanup='rm -f /tmp/psm-prof-rand'
PSM_UP_FLAGS="--rdp-listen off ${PSM_UP_FLAGS:-}"
# shellcheck source=psm-bench-up.sh
source "$root/perf/bench/psm-bench-up.sh" /tmp/psm-prof.XXXXXX
head -c $((mib << 20)) /dev/urandom > /tmp/psm-prof-rand
chmod 644 /tmp/psm-prof-rand
ssh_psm() { timeout 300 ssh -F "$PERFBASE/ssh_config" -c "$cipher" -p "$port" -o "User=alice@sshbench@bench" 127.0.0.1 "$@"; }
ssh_direct() { timeout 300 ssh -F "$PERFBASE/ssh_config" -c "$cipher" -p 22022 -o User=sshbench 127.0.0.1 "$@"; }
ssh_psm true
# warm-up: touch the page cache the recordings will use
ssh_psm "cat /tmp/psm-prof-rand" >/dev/null
relay=$(pgrep -f "psm-relay.*$data" | head -1)
recorder=$(pgrep -f "psm-recorder.*$data" | head -1)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n}'; }
hz=$(getconf CLK_TCK)
run() { # label, command...
  local label=$1; shift
  local r0 c0 t0 r1 c1 t1 s0 s1
  r0=$(ticks "$relay"); c0=$(ticks "$recorder"); t0=$(date +%s.%N)
  s0=$(( $(switches "$relay") + $(switches "$recorder") ))
  "$@"
  r1=$(ticks "$relay"); c1=$(ticks "$recorder"); t1=$(date +%s.%N)
  s1=$(( $(switches "$relay") + $(switches "$recorder") ))
  awk -v l="$label" -v r=$((r1-r0)) -v c=$((c1-c0)) -v hz="$hz" -v t0="$t0" -v t1="$t1" -v mib="$mib" -v sw=$((s1-s0)) \
    'BEGIN { g = mib / 1024; printf "%-6s %6.0f MB/s   relay %.2f + recorder %.2f CPU-s per GiB, %.0f context switches per MiB\n", l, mib*1.048576/(t1-t0), r/hz/g, c/hz/g, sw/mib }'
}
echo "# psm $(git -C "$root" rev-parse --short HEAD) release, $mib MiB of random bytes each way, $cipher"
if [[ ${PERF:-1} == 1 ]]; then
  perf record -q -e cpu-clock -g -o "$data/perf.data" -p "$relay,$recorder" -- sleep 3600 >/dev/null 2>&1 &
  perf_pid=$!
  sleep 1
fi
down() { ssh_psm "cat /tmp/psm-prof-rand" >/dev/null; }
up() { ssh_psm "cat > /dev/null" </tmp/psm-prof-rand; }
[[ ${DIRS:-down up} == *down* ]] && run down down
[[ ${DIRS:-down up} == *up* ]] && run up up
t0=$(date +%s.%N); ssh_direct "cat /tmp/psm-prof-rand" >/dev/null; t1=$(date +%s.%N)
awk -v t0="$t0" -v t1="$t1" -v mib="$mib" 'BEGIN { printf "direct down %6.0f MB/s (OpenSSH, no psm)\n", mib*1.048576/(t1-t0) }'
[[ ${PERF:-1} == 1 ]] || exit 0
kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
echo
echo "## top symbols, psm-relay (share of its samples)"
perf report -q -i "$data/perf.data" --no-children --pid "$relay" --sort dso,sym --percent-limit 1.5 2>/dev/null | grep -v '^$' | head -25
echo
echo "## top symbols, psm-recorder"
perf report -q -i "$data/perf.data" --no-children --pid "$recorder" --sort dso,sym --percent-limit 1.5 2>/dev/null | grep -v '^$' | head -25
