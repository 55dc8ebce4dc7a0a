#!/usr/bin/env python3
"""tcp-vs-socat.py - psm's TCP pass-through beside socat, in one run on one machine.

Three routes from the same client to the same sink (a TCP server that discards what it reads):

  direct:  client -> sink
  socat:   client -> socat TCP-LISTEN (one connection, no fork) -> sink
  psm:     client -> psm's port for a `tcp` target (lease held by `ssh alice@tcp@sink@psm`,
           spliced, unrecorded) -> sink

Each run moves GIB GiB (default 2) from the client; the routes take turns, ROUNDS times (3).
For each route: throughput (median), and the forwarder's CPU-seconds per GiB (socat's process;
psm's relay, control and recorder together), from /proc/PID/stat before and after the run. The
client and the sink are this Python process (socket calls on 1 MiB buffers: the kernel does the
copying, and their cost is the same on every route).

Needs: socat, ssh and ssh-keygen, psm built (BIN, default target/release:
`cargo build --release --workspace --bins`). Knobs: GIB, ROUNDS, PSM_PORT (2242), JSON_OUT.
Everything is bounded: each wait has a timeout, each transfer a deadline, and every process is
killed at the end.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target", "release"))
GIB = float(os.environ.get("GIB", "2"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
PSM_PORT = int(os.environ.get("PSM_PORT", "2242"))
TICK = os.sysconf("SC_CLK_TCK")
CHUNK = 1 << 20
procs = []


def spawn(args, log=None, **kw):
    out = open(log, "wb") if log else subprocess.DEVNULL
    p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kw)
    procs.append(p)
    return p


def cleanup():
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(what, cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime, stime, cutime, cstime (fields 14-17 of stat)
            total += sum(int(x) for x in fields[11:15])
        except OSError:
            pass
    return total / TICK


def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


class Sink:
    """Accepts connections and discards what they send; counts bytes per connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.done = {}
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        n = 0
        while True:
            c, _ = self.sock.accept()
            n += 1
            threading.Thread(target=self.drain, args=(c, n), daemon=True).start()

    def drain(self, c, n):
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        got = 0
        while True:
            k = c.recv_into(view)
            if k == 0:
                break
            got += k
        c.close()
        self.done[n] = got


def transfer(port, nbytes, deadline_s):
    """Sends nbytes to 127.0.0.1:port and waits for the far end to close; seconds taken."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(deadline_s)
    data = memoryview(bytes(CHUNK))
    start = time.monotonic()
    sent = 0
    while sent < nbytes:
        sent += s.send(data[: min(CHUNK, nbytes - sent)])
    s.shutdown(socket.SHUT_WR)
    # the forwarder passes the end on; the sink closes, and so does the route back to us
    while s.recv(65536):
        pass
    took = time.monotonic() - start
    s.close()
    return took


def main():
    for tool in ("socat", "ssh", "ssh-keygen"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise SystemExit(f"missing {tool}")
    for b in ("psm", "psmctl", "psm-relay", "psm-control", "psm-recorder"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            raise SystemExit(f"missing {BIN}/{b}: cargo build --release --workspace --bins")
    tmp = tempfile.mkdtemp(prefix="psm-tcp-bench.")
    data = os.path.join(tmp, "data")
    sink = Sink()
    nbytes = int(GIB * (1 << 30))
    deadline = max(60.0, GIB * 60)

    # psm with a tcp target in front of the sink, and alice's lease on it
    key = os.path.join(tmp, "alice")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    psm = spawn([os.path.join(BIN, "psm"), "up", "--data-dir", data, "--listen",
                 f"127.0.0.1:{PSM_PORT}"], log=os.path.join(tmp, "psm.log"))

    def ctl(*args):
        return subprocess.run([os.path.join(BIN, "psmctl"), "--data-dir", data, *args],
                              capture_output=True, text=True, timeout=30)

    wait_until("psm", lambda: ctl("user", "list").returncode == 0 and port_open(PSM_PORT))
    psm_port = free_port()
    for args in (["user", "add", "alice", "--ssh-key", key + ".pub"],
                 ["target", "add", "sink", "--protocol", "tcp", "--address",
                  f"127.0.0.1:{sink.port}", "--listen", f"127.0.0.1:{psm_port}"],
                 ["grant", "add", "alice", "tcp@sink", "--unrecorded-tcp"]):
        r = ctl(*args)
        if r.returncode != 0:
            raise SystemExit(f"psmctl {' '.join(args)}: {r.stderr}")
    wait_until("psm port", lambda: port_open(psm_port))
    lease = subprocess.Popen(
        ["ssh", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
         "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", key, "-p",
         str(PSM_PORT), "alice@tcp@sink@127.0.0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(lease)
    line = lease.stdout.readline().decode(errors="replace").strip()
    if "is open to" not in line:
        raise SystemExit(f"no lease: {line!r}")
    psm_pids = [int(p) for p in subprocess.run(
        ["pgrep", "-f", data], capture_output=True, text=True).stdout.split()]

    results = {"direct": [], "socat": [], "psm": []}
    for _ in range(ROUNDS):
        for route in ("direct", "socat", "psm"):
            pids = []
            if route == "direct":
                port = sink.port
            elif route == "socat":
                port = free_port()
                p = spawn(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                           f"TCP:127.0.0.1:{sink.port}"])
                wait_until("socat", lambda: any(
                    f":{port:04X} " in l for l in open("/proc/net/tcp").read().splitlines()))
                pids = [p.pid]
            else:
                port = psm_port
                pids = psm_pids
            before = cpu_seconds(pids)
            took = transfer(port, nbytes, deadline)
            if route == "socat":
                # read its CPU as a zombie, before reaping it takes /proc/PID away
                wait_until("socat to exit", lambda: state(p.pid) in ("Z", None), 10)
            after = cpu_seconds(pids)
            if route == "socat":
                p.wait(timeout=10)
            results[route].append({"seconds": took, "cpu": after - before})

    def summary(route):
        runs = results[route]
        mbps = statistics.median(nbytes / r["seconds"] / 1e6 for r in runs)
        cpu = statistics.median(r["cpu"] / GIB for r in runs)
        return mbps, cpu

    head = f"# psm {subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()} release, {GIB:g} GiB x {ROUNDS} rounds, {os.cpu_count()} cpus"
    print(head)
    print(f"{'route':8} {'MB/s':>8} {'fwd CPU-s/GiB':>14}")
    table = {}
    for route in ("direct", "socat", "psm"):
        mbps, cpu = summary(route)
        table[route] = {"mb_per_s": mbps, "cpu_s_per_gib": cpu, "runs": results[route]}
        cpu_txt = "-" if route == "direct" else f"{cpu:.3f}"
        print(f"{route:8} {mbps:8.0f} {cpu_txt:>14}")
    ps, ss = table["psm"], table["socat"]
    ratio_t = ps["mb_per_s"] / ss["mb_per_s"]
    ratio_c = ps["cpu_s_per_gib"] / ss["cpu_s_per_gib"] if ss["cpu_s_per_gib"] > 0 else float("nan")
    print(f"psm/socat: throughput {ratio_t:.2f}x, CPU per GiB {ratio_c:.2f}x "
          f"(target: >= 0.9x throughput at <= 0.5x CPU)")
    if os.environ.get("JSON_OUT"):
        with open(os.environ["JSON_OUT"], "w") as f:
            json.dump(table, f, indent=1)
    lease.stdin.close()


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
