#!/usr/bin/env bash
# Runs every cargo-fuzz target (or those named) for a bounded time each, on the committed
# corpus, and says which found a crash. Not part of CI: a benchmark-style run for a machine
# with time to spare.
#
#   perf/fuzz-run.sh                 # every target, 60 s each
#   SECS=300 perf/fuzz-run.sh rdp_frame rdp_engine_client
#
# Needs `cargo install cargo-fuzz` and a nightly toolchain (or RUSTC_BOOTSTRAP=1 with stable).
# New inputs go to fuzz/corpus/<target>/ (commit the interesting ones after `cargo fuzz cmin`);
# crashes to fuzz/artifacts/<target>/. Exit status: 0 when no target crashed.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
SECS="${SECS:-60}"
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  FUZZ=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  FUZZ=(cargo fuzz)
fi
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${FUZZ[@]}" list)
fi
for t in "${targets[@]}"; do "${FUZZ[@]}" build "$t" || exit 2; done
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log="$(mktemp)"
  start=$(date +%s)
  if "${FUZZ[@]}" run "$t" "corpus/$t" -- -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
      >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    [ -n "$runs" ] || runs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
    echo "ok      $t  $(( $(date +%s) - start )) s  ${runs:-?} runs"
  else
    echo "CRASH   $t  (see fuzz/artifacts/$t/; last lines below)"
    tail -20 "$log" | sed 's/^/    /'
    failed+=("$t")
  fi
  rm -f "$log"
done
[ "${#failed[@]}" -eq 0 ] || { echo "crashed: ${failed[*]}"; exit 1; }
