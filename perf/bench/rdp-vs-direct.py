#!/usr/bin/env python3
"""rdp-vs-direct.py - what psm costs an RDP session, beside FreeRDP connecting directly.

One run, two routes to the same target (freerdp-shadow-cli /sec:nla sharing an Xvfb display
with an xterm), the same client (xfreerdp under Xvfb):

  direct:  xfreerdp -> tap A -> tap B -> freerdp-shadow
  psm:     xfreerdp -> tap A -> psm (NLA, policy, recording) -> tap B -> freerdp-shadow

Taps A and B are TCP pass-throughs in this process that timestamp every chunk (one clock,
CLOCK_MONOTONIC); both routes have both taps, so their cost cancels out. For each route:

  * input round trip: xdotool presses a key in the client every 120-220 ms (alternately `a`
    and BackSpace, so the xterm echoes); the round trip is the time at tap A from the client's
    input to the next bytes toward the client. It includes the target's screen polling (the
    shadow server captures the screen at its frame rate), which is noise common to both routes.
  * psm's transit (psm route only): for each key, tap A (client's bytes in) to tap B (psm's
    bytes out), and tap B (target's reply in) to tap A (psm's bytes out): the latency psm adds,
    without the target's polling noise.
  * CPU: CPU-seconds of each process (psm-relay, psm-recorder, xfreerdp, freerdp-shadow-cli)
    over the typing phase and over a busy phase (a full-screen xterm scrolling text for
    BUSY_SECS), with the bytes relayed.

Needs: xfreerdp, freerdp-shadow-cli, winpr-hash, Xvfb, xterm, xdotool (scripts/test.sh installs
all but xterm: `apt-get install xterm`) and psm built (BIN, default target/release; build with
`cargo build --release --workspace --bins`). Knobs: KEYS (200), BUSY_SECS (10), JSON_OUT.
Everything is bounded: each wait has a timeout and every process is killed at the end.
"""

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target", "release"))
KEYS = int(os.environ.get("KEYS", "200"))
BUSY_SECS = float(os.environ.get("BUSY_SECS", "10"))
SHADOW_USER, SHADOW_PASSWORD = "psmshadow", "Shad0w-Pass"
ALICE_PASSWORD = "alice-Bench-42"
TICK = os.sysconf("SC_CLK_TCK")
procs = []


class Failed(Exception):
    pass


def die(msg):
    raise Failed(msg)


def cleanup():
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def spawn(args, env=None, log=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    out = open(log, "wb") if log else subprocess.DEVNULL
    p = subprocess.Popen(args, env=e, stdout=out, stderr=subprocess.STDOUT, **kw)
    procs.append(p)
    return p


def wait_until(what, cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    die(f"timed out waiting for {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def xvfb(tmp):
    r, w = os.pipe()
    spawn(["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
          pass_fds=[w], log=os.path.join(tmp, f"xvfb{w}.log"))
    os.close(w)
    buf = b""
    end = time.monotonic() + 10
    while not buf.endswith(b"\n") and time.monotonic() < end:
        chunk = os.read(r, 16)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    if not buf.strip():
        die("Xvfb did not start")
    return ":" + buf.decode().strip()


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


class Tap:
    """A TCP pass-through that timestamps every chunk: (ns, 'up'|'down', bytes)."""

    def __init__(self, loop, listen, upstream):
        self.events, self.upstream, self.loop = [], upstream, loop
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.conn, "127.0.0.1", listen), loop).result(5)

    async def conn(self, cr, cw):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cw.close()
            return
        for s in (cw, uw):
            s.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def pump(r, w, d):
            try:
                while True:
                    b = await r.read(65536)
                    if not b:
                        break
                    self.events.append((time.monotonic_ns(), d, len(b)))
                    w.write(b)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(cr, uw, "up"), pump(ur, cw, "down"))

    def since(self, t):
        return [e for e in list(self.events) if e[0] >= t]

    def close(self):
        self.server.close()


def first(events, after, d):
    for e in events:
        if e[0] > after and e[1] == d:
            return e[0]
    return None


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def route(name, loop, tmp, client_dpy, target_dpy, shadow_port, psm=None):
    """Runs one route and returns its figures."""
    port_b = free_port()
    tap_b = Tap(loop, port_b, shadow_port)
    if psm:
        ctl = psm["ctl"]
        ctl("target", "add", "shadow01", "--protocol", "rdp", "--address",
            f"127.0.0.1:{port_b}", "--scan")
        ctl("account", "add", f"{SHADOW_USER}@shadow01", "--password-stdin",
            stdin=SHADOW_PASSWORD + "\n")
        ctl("grant", "add", "alice", f"{SHADOW_USER}@shadow01")
        time.sleep(1.5)  # the policy push reaches the relay (psmctl has no wait flag)
        upstream, user, password = psm["rdp_port"], f"alice@{SHADOW_USER}@shadow01", ALICE_PASSWORD
    else:
        upstream, user, password = port_b, SHADOW_USER, SHADOW_PASSWORD
    port_a = free_port()
    tap_a = Tap(loop, port_a, upstream)
    t0 = time.monotonic_ns()
    client = spawn(["xfreerdp", f"/v:127.0.0.1:{port_a}", f"/u:{user}", f"/p:{password}",
                    "/cert:ignore", "/size:1024x768", "-wallpaper", "/bpp:32", "/sec:nla"],
                   env={"DISPLAY": client_dpy, "HOME": tmp}, log=os.path.join(tmp, f"{name}.xfreerdp.log"))

    def settled():
        # the desktop has arrived and the screen is quiet (under 5 KB in the last second)
        ev = tap_a.since(t0)
        down = sum(e[2] for e in ev if e[1] == "down")
        recent = sum(e[2] for e in ev if e[0] > time.monotonic_ns() - 1_000_000_000)
        return down > 2_000 and time.monotonic_ns() - t0 > 3_000_000_000 and recent < 5_000
    wait_until(f"{name}: the client's desktop", settled, 60)
    if client.poll() is not None:
        die(f"{name}: xfreerdp exited {client.returncode}")
    watched = {"xfreerdp": client.pid, "freerdp-shadow": psm_shadow_pid[0]}
    if psm:
        watched.update(psm["children"])
    # typing
    cpu0 = {k: cpu_seconds(p) for k, p in watched.items()}
    presses = []
    ts = time.monotonic_ns()
    for i in range(KEYS):
        key = "a" if i % 2 == 0 else "BackSpace"
        presses.append(time.monotonic_ns())
        subprocess.run(["xdotool", "key", key], env=dict(os.environ, DISPLAY=client_dpy), check=False,
                       timeout=10)
        time.sleep(random.uniform(0.12, 0.22))
    te = time.monotonic_ns()
    cpu1 = {k: cpu_seconds(p) for k, p in watched.items()}
    ea, eb = tap_a.since(ts), tap_b.since(ts)
    rtt, t_in, t_out = [], [], []
    for i, k in enumerate(presses):
        nxt = presses[i + 1] if i + 1 < len(presses) else te
        t1 = first(ea, k, "up")
        if t1 is None or t1 > nxt:
            continue
        t4 = first(ea, t1, "down")
        if t4 is None or t4 > nxt:
            continue
        rtt.append((t4 - t1) / 1e6)
        if psm:
            t2 = first(eb, t1, "up")
            t3 = first(eb, t2 or t1, "down")
            t4b = first(ea, t3, "down") if t3 else None
            if t2 and t2 < nxt and t3 and t4b and t4b < nxt:
                t_in.append((t2 - t1) / 1e6)
                t_out.append((t4b - t3) / 1e6)
    typing_secs = (te - ts) / 1e9
    # busy: a scrolling full-screen xterm on the target's display
    busy = spawn(["xterm", "-geometry", "160x48+0+0", "-e", "sh", "-c",
                  f"timeout {BUSY_SECS} sh -c 'while :; do ls -lR /usr/share; done'"],
                 env={"DISPLAY": target_dpy})
    b0 = time.monotonic_ns()
    cpu2 = {k: cpu_seconds(p) for k, p in watched.items()}
    try:
        busy.wait(timeout=BUSY_SECS + 20)
    except subprocess.TimeoutExpired:
        busy.kill()
    b1 = time.monotonic_ns()
    cpu3 = {k: cpu_seconds(p) for k, p in watched.items()}
    busy_bytes = sum(e[2] for e in tap_a.since(b0) if e[0] <= b1)
    client.terminate()
    try:
        client.wait(timeout=10)
    except subprocess.TimeoutExpired:
        client.kill()
    tap_a.close()
    tap_b.close()
    return {
        "route": name,
        "keys": KEYS,
        "answered": len(rtt),
        "rtt_ms": {"p50": pct(rtt, 50), "p90": pct(rtt, 90), "p99": pct(rtt, 99),
                   "mean": statistics.fmean(rtt) if rtt else float("nan")},
        "transit_ms": {
            "in_p50": pct(t_in, 50), "in_p99": pct(t_in, 99),
            "out_p50": pct(t_out, 50), "out_p99": pct(t_out, 99),
            "samples": len(t_in),
        } if psm else None,
        "typing": {"secs": typing_secs,
                   "cpu": {k: cpu1[k] - cpu0[k] for k in watched}},
        "busy": {"secs": (b1 - b0) / 1e9, "bytes": busy_bytes,
                 "cpu": {k: cpu3[k] - cpu2[k] for k in watched}},
    }


psm_shadow_pid = [0]


def main():
    for tool in ["xfreerdp", "freerdp-shadow-cli", "winpr-hash", "Xvfb", "xterm", "xdotool"]:
        if not shutil.which(tool):
            die(f"{tool} is missing")
    for b in ["psm", "psmctl", "psm-relay", "psm-recorder", "psm-control"]:
        if not os.access(os.path.join(BIN, b), os.X_OK):
            die(f"{BIN}/{b} missing: cargo build --release --workspace --bins (or set BIN)")
    tmp = tempfile.mkdtemp(prefix="psm-rdp-bench.")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        target_dpy, client_dpy = xvfb(tmp), xvfb(tmp)
        spawn(["xterm", "-geometry", "100x30+0+0", "-e", "bash", "--norc", "--noprofile"],
              env={"DISPLAY": target_dpy, "PS1": "$ "})
        sam = os.path.join(tmp, "shadow.sam")
        with open(sam, "wb") as f:
            f.write(subprocess.run(["winpr-hash", "-u", SHADOW_USER, "-p", SHADOW_PASSWORD, "-f", "sam"],
                                   check=True, capture_output=True, timeout=10).stdout)
        shadow_port = free_port()
        sh = spawn(["freerdp-shadow-cli", f"/port:{shadow_port}", "/bind-address:127.0.0.1", "/sec:nla",
                    f"/sam-file:{sam}"], env={"DISPLAY": target_dpy}, log=os.path.join(tmp, "shadow.log"))
        psm_shadow_pid[0] = sh.pid
        wait_until("freerdp-shadow-cli", lambda: port_open(shadow_port), 15)
        results = [route("direct", loop, tmp, client_dpy, target_dpy, shadow_port)]
        # psm
        data = os.path.join(tmp, "data")
        ssh_port, rdp_port = free_port(), free_port()
        up = spawn([os.path.join(BIN, "psm"), "up", "--data-dir", data, "--listen", f"127.0.0.1:{ssh_port}",
                    "--rdp-listen", f"127.0.0.1:{rdp_port}"], log=os.path.join(tmp, "psm.log"))

        def ctl(*args, stdin=None):
            r = subprocess.run([os.path.join(BIN, "psmctl"), "--data-dir", data, *args], input=stdin,
                               text=True, capture_output=True, timeout=60)
            if r.returncode != 0:
                die(f"psmctl {' '.join(args)}: {r.stderr.strip()}")
            return r.stdout

        wait_until("psm up", lambda: port_open(rdp_port) and subprocess.run(
            [os.path.join(BIN, "psmctl"), "--data-dir", data, "user", "list"],
            capture_output=True, timeout=10).returncode == 0, 60)
        children = {}
        for line in subprocess.run(["pgrep", "-a", "-P", str(up.pid)], capture_output=True,
                                   text=True).stdout.splitlines():
            pid, cmd = line.split(" ", 1)
            for n in ["psm-relay", "psm-recorder", "psm-control"]:
                if os.path.basename(cmd.split()[0]) == n:
                    children[n] = int(pid)
        ctl("user", "add", "alice", "--password-stdin", stdin=ALICE_PASSWORD + "\n")
        results.append(route("psm", loop, tmp, client_dpy, target_dpy, shadow_port,
                             psm={"ctl": ctl, "rdp_port": rdp_port, "children": children}))
        report(results)
        if os.environ.get("JSON_OUT"):
            with open(os.environ["JSON_OUT"], "w") as f:
                json.dump(results, f, indent=2)
    finally:
        cleanup()
        loop.call_soon_threadsafe(loop.stop)
        if os.environ.get("KEEP"):
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(results):
    d, p = results
    print(f"input round trip at the client, {KEYS} keys (ms)    p50      p90      p99     mean  answered")
    for r in results:
        m = r["rtt_ms"]
        print(f"  {r['route']:<44} {m['p50']:8.2f} {m['p90']:8.2f} {m['p99']:8.2f} {m['mean']:8.2f}  {r['answered']}")
    print(f"  added by psm (p50 / mean)                    {p['rtt_ms']['p50'] - d['rtt_ms']['p50']:8.2f}"
          f"          {'':8} {p['rtt_ms']['mean'] - d['rtt_ms']['mean']:8.2f}")
    t = p["transit_ms"]
    print(f"psm transit per key (ms, {t['samples']} keys): client->target p50 {t['in_p50']:.3f} p99 {t['in_p99']:.3f};"
          f" target->client p50 {t['out_p50']:.3f} p99 {t['out_p99']:.3f}; round trip added p50 "
          f"{t['in_p50'] + t['out_p50']:.3f}")
    for phase in ["typing", "busy"]:
        print(f"CPU-seconds, {phase} phase:")
        for r in results:
            ph = r[phase]
            cpu = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ph["cpu"].items()))
            extra = f", {ph['bytes'] / 1e6:.1f} MB to the client" if phase == "busy" else ""
            print(f"  {r['route']:<7} {ph['secs']:6.1f} s: {cpu}{extra}")
    pb = p["busy"]
    relay = pb["cpu"].get("psm-relay", 0) + pb["cpu"].get("psm-recorder", 0)
    client = pb["cpu"].get("xfreerdp", 0)
    if pb["bytes"] and client:
        print(f"busy: psm-relay+psm-recorder {100 * relay / pb['secs']:.1f}% of a core for one session,"
              f" {relay / (pb['bytes'] / 2**20) * 1000:.1f} CPU-ms per MiB; {relay / client:.2f}x the client's CPU")
    pt = p["typing"]
    relay_t = pt["cpu"].get("psm-relay", 0) + pt["cpu"].get("psm-recorder", 0)
    print(f"typing: psm-relay+psm-recorder {100 * relay_t / pt['secs']:.2f}% of a core for one session")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    try:
        main()
    except Failed as e:
        print(f"rdp-vs-direct: {e}", file=sys.stderr)
        sys.exit(1)
