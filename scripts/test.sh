#!/usr/bin/env bash
# psm's test command (the README's): installs what the integration tests need when it is
# missing, builds every binary of the workspace, then runs the whole suite.
#
#   scripts/test.sh [ARGS...]    ARGS go to `cargo nextest run` (or `cargo test` without nextest)
#
# Needs: /usr/sbin/sshd, ssh, scp, sftp, asciinema, /usr/bin/python3 with asyncssh (the hostile
# peers of tests/py) and seccomp (a relay where io_uring is refused), setpriv and mount, plink (PuTTY answering the TOTP prompt),
# /usr/sbin/rsyslogd with its gtls driver (the SIEM tests' syslog receiver; the tests run it
# themselves, no system service), the RDP peers (xrdp with xorgxrdp, the FreeRDP 2 client and
# shadow server, winpr-hash, Xvfb, xdotool, xlogo, ffmpeg: the RDP tests start them themselves),
# socat (psm-perf bench's pass-through baseline)
# (Debian: openssh-server openssh-client asciinema procps python3 python3-asyncssh python3-seccomp util-linux
# mount putty-tools rsyslog rsyslog-gnutls xrdp xorgxrdp freerdp2-x11 freerdp2-shadow-x11
# winpr-utils xvfb xdotool x11-apps ffmpeg socat). As root they are
# installed with apt when missing; otherwise the script says what to install and exits 1. Some tests mount a tmpfs and switch
# uids: run the suite as root.
# Every step is bounded (timeouts, overridable: PSM_APT_TIMEOUT, PSM_BUILD_TIMEOUT,
# PSM_TEST_TIMEOUT, in seconds).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

apt_timeout="${PSM_APT_TIMEOUT:-600}"
build_timeout="${PSM_BUILD_TIMEOUT:-2700}"
test_timeout="${PSM_TEST_TIMEOUT:-2700}"
packages=(openssh-server openssh-client asciinema procps python3 python3-asyncssh python3-seccomp util-linux mount
  putty-tools rsyslog rsyslog-gnutls xrdp xorgxrdp freerdp2-x11 freerdp2-shadow-x11 winpr-utils xvfb
  xdotool x11-apps ffmpeg socat)

say() { printf 'scripts/test.sh: %s\n' "$*" >&2; }

# Interactive: keep the command in the terminal's foreground so Ctrl-C reaches it. Otherwise
# (CI) let timeout kill the command's whole process group, test processes included.
bounded=(timeout --kill-after=30)
if [[ -t 0 ]]; then
  bounded+=(--foreground)
fi

missing_tools() {
  local tool
  for tool in /usr/sbin/sshd ssh scp sftp asciinema /usr/bin/python3 setpriv mount plink /usr/sbin/rsyslogd \
    /usr/sbin/xrdp /usr/sbin/xrdp-sesman /usr/bin/xfreerdp /usr/bin/freerdp-shadow-cli /usr/bin/winpr-hash \
    /usr/bin/Xvfb /usr/bin/xdotool /usr/bin/xlogo /usr/bin/ffmpeg /usr/bin/ffprobe socat; do
    if [[ $tool == /* ]]; then
      [[ -x $tool ]] || printf '%s\n' "$tool"
    else
      command -v "$tool" >/dev/null 2>&1 || printf '%s\n' "$tool"
    fi
  done
  if [[ -x /usr/bin/python3 ]] && ! /usr/bin/python3 -c 'import asyncssh' >/dev/null 2>&1; then
    printf '%s\n' "python3 asyncssh"
  fi
  if [[ -x /usr/bin/python3 ]] && ! /usr/bin/python3 -c 'import seccomp' >/dev/null 2>&1; then
    printf '%s\n' "python3 seccomp (python3-seccomp)"
  fi
  if [[ ! -e /usr/lib/xorg/modules/drivers/xrdpdev_drv.so ]]; then
    printf '%s\n' "xorgxrdp"
  fi
  if ! compgen -G '/usr/lib/*/rsyslog/lmnsd_gtls.so' >/dev/null; then
    printf '%s\n' "rsyslog gtls driver (rsyslog-gnutls)"
  fi
}

mapfile -t missing < <(missing_tools)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    say "missing: ${missing[*]}"
    say "install them first, as root: apt-get install ${packages[*]}"
    exit 1
  fi
  say "missing: ${missing[*]}; installing ${packages[*]} with apt"
  "${bounded[@]}" "$apt_timeout" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${bounded[@]}" "$apt_timeout" \
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 "${packages[@]}"
  mapfile -t missing < <(missing_tools)
  if ((${#missing[@]})); then
    say "still missing after apt-get install: ${missing[*]}"
    exit 1
  fi
fi

# One clean build, so incremental compilation only costs disk (gigabytes of session caches);
# a developer who wants it back sets CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

say "building the workspace"
"${bounded[@]}" "$build_timeout" cargo build --workspace --bins

# The whole suite on the relay's default back end (io_uring where the kernel allows it, else
# epoll), then the tests of the relay's sessions again on epoll: the data paths, their ends and
# failures, hostile peers, RDP with the FreeRDP peers, command control, denials, policy and the
# relay's counters (PSM_RELAY_IO reaches every psm-relay the tests start, and the harness checks
# each relay says it runs on epoll), governance included (one of its tests failed once in 13
# epoll runs, its log lost, before a recorder link's lost answer was found to drop what the
# relay had queued, 2734fb1; none of 9 runs on epoll since). Left to the first run: the tests of
# psm-control's and psm-recorder's own work (evidence, search, replay, SIEM, retention, audit
# rotation, operator commands, encryption at rest), the harness's own, the back-end test (which
# names its back ends) and psm-perf bench (its own relays).
# Arguments go to the first run only.
epoll_names=(exec files stream interactive forwarding passthrough transfers recording
  recorder_down lifecycle hardening hostile rdp rdp_peers commands denials policy metrics
  governance)
epoll_tests=()
epoll_filter=""
for t in "${epoll_names[@]}"; do
  epoll_tests+=(--test "$t")
  epoll_filter+="${epoll_filter:+ | }binary_id(psm-tests::$t)"
done
# russh's own tests on the fork psm carries (vendor/russh, patches in PSM-FORK.md): its unit
# and integration tests with ring, RSA and zlib (the features its tests need; psm builds it with
# ring alone), in a target directory of their own, resolved by vendor/russh/Cargo.lock.
russh_fork_tests() {
  say "running russh's own tests on the fork in vendor/russh"
  (cd vendor/russh && "${bounded[@]}" "$test_timeout" cargo test --locked \
    --no-default-features --features ring,rsa,flate2 --lib --tests \
    --target-dir ../../target/russh-own)
}

if cargo nextest --version >/dev/null 2>&1; then
  say "running the suite with cargo nextest"
  status=0
  "${bounded[@]}" "$test_timeout" cargo nextest run --workspace --no-fail-fast "$@" || status=$?
  if ((status == 0 && $# == 0)); then
    say "running the relay's leg tests again on the epoll back end"
    # the same build as the first run (a -p selection would unify features anew and rebuild)
    PSM_RELAY_IO=epoll "${bounded[@]}" "$test_timeout" \
      cargo nextest run --workspace --no-fail-fast -E "$epoll_filter" || status=$?
    russh_fork_tests || status=$?
  fi
  exit "$status"
else
  say "running the suite with cargo test (cargo-nextest is not installed)"
  status=0
  "${bounded[@]}" "$test_timeout" cargo test --workspace --no-fail-fast "$@" || status=$?
  if ((status == 0 && $# == 0)); then
    say "running the relay's leg tests again on the epoll back end"
    PSM_RELAY_IO=epoll "${bounded[@]}" "$test_timeout" \
      cargo test -p psm-tests "${epoll_tests[@]}" --no-fail-fast || status=$?
    russh_fork_tests || status=$?
  fi
  exit "$status"
fi
