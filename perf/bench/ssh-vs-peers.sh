#!/usr/bin/env bash
# ssh-vs-peers.sh - measure psm beside OpenSSH direct and OpenSSH ProxyJump in one run.
#
# Uses the shared peer baselines (../shared/bench: two private sshd on loopback, user sshbench),
# starts a release psm (`psm up`) in a temporary data directory on 127.0.0.1:${PSM_PORT:-2222},
# registers the bench target through psmctl, and runs ssh-baselines.sh with psm as an extra
# route. Everything is bounded (the baseline script has its own MAX_SECONDS); psm is stopped at
# the end. Results print as a table; set JSON_OUT to keep the raw figures.
#
#   cargo build --release --workspace --bins
#   perf/bench/ssh-vs-peers.sh            # env knobs of ssh-baselines.sh pass through
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
shared="${PSM_SHARED:-$root/../shared}/bench"
bin="$root/target/release"
port="${PSM_PORT:-2222}"
export PERFBASE="${PERFBASE:-/tmp/perfbase}"

for b in psm psmctl psm-control psm-recorder psm-relay; do
  [[ -x $bin/$b ]] || { echo "missing $bin/$b: run cargo build --release --workspace --bins" >&2; exit 1; }
done
[[ -x $shared/ssh-baselines.sh ]] || { echo "missing $shared/ssh-baselines.sh" >&2; exit 1; }

# shellcheck source=psm-bench-up.sh
source "$root/perf/bench/psm-bench-up.sh" /tmp/psm-bench.XXXXXX
ssh -F "$PERFBASE/ssh_config" -p "$port" -o "User=alice@sshbench@bench" 127.0.0.1 true

pids="$(pgrep -d' ' -f "$data" || true)"
echo "# psm $(git -C "$root" rev-parse --short HEAD) release, relay workers: $(nproc), data $data"
EXTRA_ROUTES="psm=-p $port -o User=alice@sshbench@bench 127.0.0.1" OUR_PIDS="$pids" \
  MAX_SECONDS="${MAX_SECONDS:-480}" "$shared/ssh-baselines.sh"
