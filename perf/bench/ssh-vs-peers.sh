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

"$shared/setup-sshd.sh" start >/dev/null
data="$(mktemp -d /tmp/psm-bench.XXXXXX)"
log="$data.log"
"$bin/psm" up --data-dir "$data" --listen "127.0.0.1:$port" >"$log" 2>&1 &
psm_pid=$!
cleanup() { kill -TERM "$psm_pid" 2>/dev/null || true; wait "$psm_pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT

for _ in $(seq 1 100); do
  "$bin/psmctl" --data-dir "$data" user list >/dev/null 2>&1 && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
ctl() { "$bin/psmctl" --data-dir "$data" "$@" >/dev/null; }
ctl user add alice --ssh-key "$PERFBASE/keys/id_ed25519.pub"
ctl target add bench --address 127.0.0.1:22022 --scan
ctl account add sshbench@bench --private-key "$PERFBASE/keys/id_ed25519"
ctl grant add alice sshbench@bench
# trust psm's host key in the bench client config's known_hosts
echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 < <(ssh-keygen -y -f "$data/ssh_host_ed25519_key"))" >> "$PERFBASE/known_hosts"
ssh -F "$PERFBASE/ssh_config" -p "$port" -o "User=alice@sshbench@bench" 127.0.0.1 true

pids="$(pgrep -d' ' -f "$data" || true)"
echo "# psm $(git -C "$root" rev-parse --short HEAD) release, relay workers: $(nproc), data $data"
EXTRA_ROUTES="psm=-p $port -o User=alice@sshbench@bench 127.0.0.1" OUR_PIDS="$pids" \
  MAX_SECONDS="${MAX_SECONDS:-480}" "$shared/ssh-baselines.sh"
