#!/usr/bin/env bash
# psm-relay's CPU per new session: runs `psm-perf bench --only sessions` with the daemons of
# BINDIR and reads psm-relay's CPU time (/proc/<pid>/stat, user + system) at the start and end of
# the psm route's two phases (200 sessions one after another, then 32 at once for 5 s).
#   perf/bench/sessions-cpu.sh BINDIR [PSM_PERF]
# Alternate two builds' folders, a few rounds each: this machine's noise is large.
set -euo pipefail
bin=${1:?usage: sessions-cpu.sh BINDIR [PSM_PERF]}
perf_bin=${2:-$(dirname "$0")/../../target/release/psm-perf}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$perf_bin" bench --bin "$bin" --only sessions > "$out" 2>&1 &
bench=$!
pid=""
for _ in $(seq 1 300); do
  pid=$(pgrep -n -x psm-relay || true)
  [ -n "$pid" ] && break
  sleep 0.1
done
[ -n "$pid" ] || { echo "psm-relay did not start" >&2; exit 1; }
s0="" s1="" s2=""
while kill -0 "$bench" 2>/dev/null; do
  v=$(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || true)
  if [ -n "$v" ]; then
    [ -z "$s0" ] && grep -q "sessions via psm$" "$out" && s0=$v
    [ -z "$s1" ] && grep -q "sequential via psm:" "$out" && s1=$v
    [ -z "$s2" ] && grep -q "at once via psm:" "$out" && s2=$v
  fi
  sleep 0.02
done
wait "$bench"
seq_rate=$(grep "sequential via psm:" "$out" | awk '{print $(NF-1)}')
par_rate=$(grep "32 at once via psm:" "$out" | awk '{print $(NF-1)}')
python3 - "$bin" "$(getconf CLK_TCK)" "$s0" "$s1" "$s2" "$seq_rate" "$par_rate" <<'PY'
import sys
b, tck, s0, s1, s2, seq, par = sys.argv[1], *map(float, sys.argv[2:])
print(f"{b}: sequential {seq:.0f}/s, {1000*(s1-s0)/tck/200:.3f} ms of relay CPU per session; "
      f"32 at once {par:.0f}/s, {1000*(s2-s1)/tck/(par*5):.3f} ms per session")
PY
