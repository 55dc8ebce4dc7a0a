# psm-bench-up.sh - sourced by the bench scripts: starts the shared baselines' target sshd and a
# release `psm up` on 127.0.0.1:$port with data in $data (made from the mktemp template
# $1), registers the bench target (127.0.0.1:22022, account sshbench, alice's grant), trusts psm's
# host key in $PERFBASE/known_hosts, and stops psm on exit. Needs $bin, $shared, $port,
# $PERFBASE; extra `psm up` flags in $PSM_UP_FLAGS (word-split). Sets $data and $psm_pid.
"$shared/setup-sshd.sh" start >/dev/null
data="$(mktemp -d "$1")"
# shellcheck disable=SC2086
"$bin/psm" up --data-dir "$data" --listen "127.0.0.1:$port" ${PSM_UP_FLAGS:-} >"$data.log" 2>&1 &
psm_pid=$!
psm_bench_cleanup() {
  kill -TERM "$psm_pid" 2>/dev/null || true
  wait "$psm_pid" 2>/dev/null || true
  [[ -n ${KEEP:-} ]] || rm -rf "$data" "$data.log"
}
trap 'psm_bench_cleanup; ${extra_cleanup:-true}' EXIT
for _ in $(seq 1 100); do
  "$bin/psmctl" --data-dir "$data" user list >/dev/null 2>&1 && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
ctl() { "$bin/psmctl" --data-dir "$data" "$@" >/dev/null; }
ctl user add alice --ssh-key "$PERFBASE/keys/id_ed25519.pub"
ctl target add bench --address 127.0.0.1:22022 --scan
ctl account add sshbench@bench --private-key "$PERFBASE/keys/id_ed25519"
ctl grant add alice sshbench@bench
echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 < <(ssh-keygen -y -f "$data/ssh_host_ed25519_key"))" >> "$PERFBASE/known_hosts"
