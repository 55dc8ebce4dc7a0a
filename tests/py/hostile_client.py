"""A hostile SSH client toward the gateway: one protocol abuse per run, chosen by MODE.

usage: hostile_client.py --port P --user LOGIN (--password PW | --key PATH)
                         --mode MODE [--count N] [--max-seconds S]

It connects to 127.0.0.1:P (host key not checked), authenticates as LOGIN and prints exactly
one line on stdout, "result key=value ...", then exits 0. Free-text values (reason=,
output=) come last on the line, with CR/LF written as \\r/\\n; other values hold no spaces.
Exit status is non-zero only for unexpected local errors (2) or when the watchdog ends the
run after --max-seconds (default 60; then the line is "result watchdog=1", status 3). When
the peer refuses or drops something a mode needs before it can report (the login, the
session open), the line is "result failed=1 error=Class reason=..." with status 0.

Modes (COUNT default in brackets):
  env-before-exec   opens a session, sends COUNT [200] "env" requests (VAR0..VARn-1, then
                    LD_PRELOAD and BASH_ENV; want_reply false) and then "exec echo env-ok"
                    without waiting in between. Prints
                    answered=1|0 accepted=1|0 disconnected=1|0 seconds=X output=...
                    (seconds: from sending exec to its reply or to giving up after 10 s).
  window-ignore     opens a session running "sleep 30" (which never reads stdin, so an
                    honest peer's window runs out), then sends COUNT [64] MiB of data in
                    32 KiB writes for at most 12 s, ignoring the send window the server
                    granted (asyncssh's channel._send_window is forced large before each
                    write; packets still respect the peer's maximum packet size), then
                    waits up to 4 s for the peer to disconnect.
                    Prints disconnected=1|0 channel_closed=1|0 granted=W sent_mib=M
                    seconds=X error=Class reason=<disconnect reason text>.
  many-forwards     sends COUNT [5000] "tcpip-forward" global requests for 127.0.0.1:0,
                    COUNT "direct-tcpip" channel opens to 127.0.0.1:9, 10
                    "streamlocal-forward@openssh.com" global requests and 10
                    "direct-streamlocal@openssh.com" channel opens, all at once. Prints
                    tcpip_refused= direct_refused= streamlocal_refused= seconds= plus the
                    *_accepted= and *_unanswered= counts and disconnected=.
  pty-extremes      on a fresh connection for each of the pty sizes (cols x rows)
                    65535x65535, 0x0 and 4294967295x4294967295, sends pty-req (want_reply)
                    then "exec stty size; echo pty-ok". Prints
                    sizes=COLSxROWS=<what stty printed, spaces as _>,... pty_ok=K
                    output=<each session's output, escaped, joined by " | ">
                    (K: sessions that printed pty-ok). A size whose pty-req was refused
                    shows "pty-refused:" before the output; also exec-refused,
                    timeout, disconnected.
  long-login        password (or key) login with a user name of COUNT [200000] 'a' bytes.
                    Prints denied=1|0 answered=1|0 seconds=X error=Class reason=...
                    (denied=1: permission denied or the connection was dropped).
  large-packets     not an abuse: the largest packets the peer allows. Opens a session
                    running "sha256sum" and writes COUNT [4] MiB of random bytes in one write
                    (asyncssh cuts it into packets of the peer's maximum packet size), then
                    EOF, and reads the digest. Prints send_pktsize=N sent_digest=HEX
                    remote_digest=HEX.
  empty-data        opens a session running "sha256sum" and sends 64 KiB of random bytes in
                    64 pieces with COUNT [100000] empty data messages spread among them
                    (they take no window), then EOF, and reads the digest. Prints
                    empties=N sent_digest=HEX remote_digest=HEX.
  stalled-rekey     not an abuse, a slow peer: opens a session running
                    "echo start; head -c COUNT [8] MiB /dev/zero; echo; then six lines
                    'tick N' a second apart", and once "start" has come, starts a key
                    exchange (KEXINIT) and holds it open for --hold seconds [5] before
                    sending its key exchange message (so the gateway's leg toward this client
                    can carry nothing but the key exchange meanwhile), then completes it and
                    reads to the end. Prints held=K (key exchanges held: 1) hold_seconds=X
                    bytes=B zeros_ok=1|0 ticks=T exit=STATUS disconnected=1|0.
  pre-start-data    opens a session and, before any exec, sends COUNT [200] one-byte data
                    messages interleaved with COUNT window-change requests, then
                    "exec cat" (want_reply) and waits up to 2 s for the reply; then sends
                    EOF and counts what cat echoed. Prints
                    answered=1|0 accepted=1|0 seconds=X echoed=BYTES disconnected=1|0.

asyncssh applies SASLprep to user names on the client side; that is bypassed here as in
forged_login.py so the name goes on the wire as given.
"""
import argparse
import asyncio
import hashlib
import os
import sys
import threading
import time

import asyncssh
import asyncssh.connection
from asyncssh.channel import SSHClientChannel
from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_FAILURE, MSG_CHANNEL_SUCCESS,
                                MSG_REQUEST_SUCCESS)
from asyncssh.packet import String, UInt32

asyncssh.connection.saslprep = lambda s: s

MODES = (
    "env-before-exec",
    "window-ignore",
    "many-forwards",
    "pty-extremes",
    "long-login",
    "pre-start-data",
    "open-close-channels",
    "large-packets",
    "stalled-rekey",
    "empty-data",
)
DEFAULT_COUNT = {
    "env-before-exec": 200,
    "window-ignore": 64,
    "many-forwards": 5000,
    "pty-extremes": 0,
    "long-login": 200000,
    "pre-start-data": 200,
    "large-packets": 4,
    "stalled-rekey": 8,
    "empty-data": 100000,
}
PTY_SIZES = ((65535, 65535), (0, 0), (4294967295, 4294967295))
STREAMLOCAL_COUNT = 10
# Never reads its stdin, so an honest peer stops granting window once it has buffered.
WINDOW_IGNORE_COMMAND = "sleep 30"
MIB = 1024 * 1024
WRITE_BUFFER_LIMIT = 8 * MIB
START = time.monotonic()


def log(msg: str) -> None:
    print(f"hostile_client[{time.monotonic() - START:7.3f}]: {msg}", file=sys.stderr, flush=True)


def text(value) -> str:
    """A free-text value for the end of the result line."""
    s = str(value).strip()
    return s.replace("\r", "\\r").replace("\n", "\\n")


def token(value) -> str:
    """A value without spaces."""
    return text(value).replace(" ", "_") or "none"


_printed = threading.Lock()


def result(*fields: str) -> None:
    with _printed:
        print("result " + " ".join(fields), flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="hostile SSH client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    cred = p.add_mutually_exclusive_group(required=True)
    cred.add_argument("--password")
    cred.add_argument("--key")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--hold", type=float, default=5.0)
    args = p.parse_args()
    if args.count is None:
        args.count = DEFAULT_COUNT[args.mode]
    if args.count < 0 or args.max_seconds <= 0:
        p.error("--count must be >= 0 and --max-seconds > 0")
    return args


def start_watchdog(seconds: float) -> None:
    def fire() -> None:
        log(f"watchdog: {seconds:g} s passed, exiting")
        if _printed.acquire(timeout=1):
            print("result watchdog=1", flush=True)
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


class Budget:
    """Time left before the watchdog, less a margin to print the result."""

    def __init__(self, seconds: float) -> None:
        self.end = START + seconds - 3.0

    def cap(self, seconds: float) -> float:
        return max(0.1, min(seconds, self.end - time.monotonic()))


class Tracker(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.exc = None
        self.lost = asyncio.Event()

    def connection_lost(self, exc) -> None:
        log(f"connection lost: {exc!r}")
        self.exc = exc
        self.lost.set()


def describe(exc) -> tuple:
    """(error class, reason text) of a connection-level exception."""
    if exc is None:
        return "none", ""
    return type(exc).__name__, getattr(exc, "reason", None) or str(exc)


async def connect(cfg: argparse.Namespace, budget: Budget, username: str = None):
    tracker = Tracker()
    kwargs = dict(
        username=cfg.user if username is None else username,
        known_hosts=None,
        agent_path=None,
        client_factory=lambda: tracker,
        rekey_bytes=1 << 40,
        rekey_seconds=0,
        keepalive_interval=0,
        compression_algs=None,  # no zlib: every byte counted here goes on the wire as is
    )
    if cfg.password is not None:
        kwargs.update(password=cfg.password, client_keys=None, preferred_auth="password")
    else:
        kwargs.update(client_keys=[cfg.key], password=None, preferred_auth="publickey")
    conn = await asyncio.wait_for(asyncssh.connect("127.0.0.1", cfg.port, **kwargs),
                                  budget.cap(20))
    return conn, tracker


class RawChannel(SSHClientChannel):
    """A client session channel driven by hand, recording real SUCCESS/FAILURE replies."""

    def __init__(self, conn, encoding=None, window=2 * MIB, max_pktsize=32768) -> None:
        super().__init__(conn, asyncio.get_running_loop(), encoding, "replace", window,
                         max_pktsize)
        self.replies = []

    def _note_response(self, pkttype, pktid, packet) -> None:
        self.replies.append(pkttype)
        SSHClientChannel._process_response(self, pkttype, pktid, packet)

    _packet_handlers = {
        **SSHClientChannel._packet_handlers,
        MSG_CHANNEL_SUCCESS: _note_response,
        MSG_CHANNEL_FAILURE: _note_response,
    }


class Collector(asyncssh.SSHClientSession):
    def __init__(self) -> None:
        self.out = []
        self.closed = asyncio.Event()
        self.exc = None

    def data_received(self, data, datatype) -> None:
        self.out.append(data)

    def connection_lost(self, exc) -> None:
        self.exc = exc
        self.closed.set()

    def output(self):
        if not self.out:
            return ""
        return type(self.out[0])().join(self.out)


async def open_raw_session(conn, encoding=None, **channel_args):
    chan = RawChannel(conn, encoding, **channel_args)
    packet = await chan._open(b"session")
    packet.check_end()
    sess = Collector()
    chan._session = sess
    sess.connection_made(chan)
    return chan, sess


async def request(chan: RawChannel, budget: Budget, timeout: float, name: bytes, *args):
    """Send a want_reply channel request: (answered, accepted, seconds)."""
    before = len(chan.replies)
    t0 = time.monotonic()
    try:
        ok = await asyncio.wait_for(chan._make_request(name, *args), budget.cap(timeout))
    except asyncio.TimeoutError:
        ok = False
    except (OSError, asyncssh.Error) as exc:
        log(f"{name!r} request failed: {exc!r}")
        ok = False
    seconds = time.monotonic() - t0
    answered = len(chan.replies) > before
    return answered, bool(ok) and answered, seconds


def start_reading(conn, chan: RawChannel) -> None:
    chan._session.session_started()
    conn.create_task(chan._start_reading())


async def wait_event(event: asyncio.Event, budget: Budget, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), budget.cap(timeout))
        return True
    except asyncio.TimeoutError:
        return False


# --- modes -----------------------------------------------------------------------------


async def mode_env_before_exec(cfg, budget) -> None:
    conn, tracker = await connect(cfg, budget)
    chan, sess = await open_raw_session(conn, "utf-8")
    env = [(f"VAR{i}", f"value{i}") for i in range(cfg.count)]
    env += [("LD_PRELOAD", "/tmp/psm-hostile-preload.so"), ("BASH_ENV", "/tmp/psm-hostile-bash-env")]
    for name, value in env:
        chan._send_request(b"env", String(name), String(value))  # want_reply false
    answered, accepted, seconds = await request(chan, budget, 10, b"exec", String("echo env-ok"))
    if accepted:
        start_reading(conn, chan)
        await wait_event(sess.closed, budget, 5)
    result(f"answered={int(answered)}", f"accepted={int(accepted)}",
           f"disconnected={int(tracker.lost.is_set())}", f"seconds={seconds:.3f}",
           f"output={text(sess.output())}")
    conn.abort()


async def mode_window_ignore(cfg, budget) -> None:
    conn, tracker = await connect(cfg, budget)
    chan, sess = await open_raw_session(conn, None)
    answered, accepted, _ = await request(chan, budget, 10, b"exec", String(WINDOW_IGNORE_COMMAND))
    if accepted:
        start_reading(conn, chan)
        # OpenSSH opens session channels with a zero window and adjusts it once the
        # command runs: give the peer a moment so that "granted" is the real grant.
        settle = time.monotonic() + 0.5
        while chan._send_window == 0 and time.monotonic() < settle:
            await asyncio.sleep(0.01)
    granted = chan._send_window
    log(f"exec answered={answered} accepted={accepted}, window granted {granted}, "
        f"max packet {chan._send_pktsize}")
    chunk = os.urandom(32768)
    total = cfg.count * MIB
    sent = 0
    t0 = time.monotonic()
    send_end = time.monotonic() + budget.cap(12)
    transport = conn._transport
    while sent < total and time.monotonic() < send_end and accepted:
        if tracker.lost.is_set() or chan.is_closing() or transport.is_closing():
            break
        while (transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT
               and time.monotonic() < send_end and not transport.is_closing()):
            await asyncio.sleep(0.002)
        if transport.is_closing() or chan.is_closing():
            break
        chan._send_window = 1 << 30  # ignore the window the peer granted
        chan.write(chunk)
        sent += len(chunk)
        if (sent // len(chunk)) % 16 == 0:
            await asyncio.sleep(0)
    seconds = time.monotonic() - t0
    log(f"sent {sent} bytes in {seconds:.2f} s; waiting for the peer's verdict")
    await wait_event(tracker.lost, budget, 4)
    err, reason = describe(tracker.exc)
    result(f"disconnected={int(tracker.lost.is_set())}",
           f"channel_closed={int(sess.closed.is_set())}", f"granted={granted}",
           f"sent_mib={sent / MIB:.2f}", f"seconds={seconds:.3f}", f"error={err}",
           f"reason={text(reason)}")
    conn.abort()


async def _global(conn, name: bytes, *args) -> str:
    pkttype, _ = await conn._make_global_request(name, *args)
    return "accepted" if pkttype == MSG_REQUEST_SUCCESS else "refused"


async def _direct_tcp(conn) -> str:
    chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 9)
    chan.close()
    return "accepted"


async def _direct_unix(conn, path: str) -> str:
    chan, _ = await conn.create_unix_connection(asyncssh.SSHUNIXSession, path)
    chan.close()
    return "accepted"


async def _outcome(coro) -> str:
    try:
        return await coro
    except asyncssh.ChannelOpenError as exc:
        return "closed" if exc.reason == "SSH connection closed" else "refused"
    except (OSError, asyncssh.Error) as exc:
        log(f"request failed: {exc!r}")
        return "closed"


async def mode_many_forwards(cfg, budget) -> None:
    conn, tracker = await connect(cfg, budget)
    base = f"/tmp/psm-hostile-{os.getpid()}"
    groups = {
        "tcpip": [_global(conn, b"tcpip-forward", String("127.0.0.1"), UInt32(0))
                  for _ in range(cfg.count)],
        "direct": [_direct_tcp(conn) for _ in range(cfg.count)],
        "streamlocal": (
            [_global(conn, b"streamlocal-forward@openssh.com", String(f"{base}-fwd{i}.sock"))
             for i in range(STREAMLOCAL_COUNT)]
            + [_direct_unix(conn, f"{base}-direct{i}.sock") for i in range(STREAMLOCAL_COUNT)]),
    }
    t0 = time.monotonic()
    tasks = {g: [asyncio.ensure_future(_outcome(c)) for c in coros]
             for g, coros in groups.items()}
    everything = [t for ts in tasks.values() for t in ts]
    await asyncio.wait(everything, timeout=budget.cap(15))
    seconds = time.monotonic() - t0
    fields = []
    extra = []
    for g, ts in tasks.items():
        outcomes = [t.result() if t.done() else "unanswered" for t in ts]
        refused = outcomes.count("refused") + outcomes.count("closed")
        fields.append(f"{g}_refused={refused}")
        extra.append(f"{g}_accepted={outcomes.count('accepted')}")
        extra.append(f"{g}_unanswered={outcomes.count('unanswered')}")
        log(f"{g}: {len(ts)} sent, {outcomes.count('closed')} ended by the connection closing")
    for t in everything:
        t.cancel()
    result(*fields, f"seconds={seconds:.3f}", *extra,
           f"disconnected={int(tracker.lost.is_set())}")
    conn.abort()


async def _one_pty(cfg, budget, cols: int, rows: int) -> tuple:
    """(size value, what the session printed)"""
    try:
        conn, tracker = await connect(cfg, budget)
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        return f"connect-failed:{type(exc).__name__}", ""
    try:
        chan, sess = await open_raw_session(conn, "utf-8")
        answered, pty_ok, _ = await request(
            chan, budget, 10, b"pty-req", String("xterm"), UInt32(cols), UInt32(rows),
            UInt32(0), UInt32(0), String(b"\0"))
        prefix = "" if pty_ok else ("pty-refused:" if answered else "pty-unanswered:")
        answered, ok, _ = await request(chan, budget, 10, b"exec",
                                        String("stty size; echo pty-ok"))
        if not ok:
            state = "disconnected" if tracker.lost.is_set() else (
                "exec-refused" if answered else "exec-unanswered")
            return prefix + state, ""
        start_reading(conn, chan)
        closed = await wait_event(sess.closed, budget, 10)
        out = sess.output()
        first = out.replace("\r", "").split("\n")[0].strip()
        value = prefix + (token(first) if first and first != "pty-ok" else "none")
        if not closed:
            value += ":timeout"
        return value, out
    except asyncssh.ChannelOpenError as exc:
        return f"open-refused:{token(exc.reason)}", ""
    finally:
        conn.abort()


async def mode_pty_extremes(cfg, budget) -> None:
    sizes = []
    outputs = []
    oks = 0
    for cols, rows in PTY_SIZES:
        value, out = await _one_pty(cfg, budget, cols, rows)
        log(f"pty {cols}x{rows}: {value} output={out!r}")
        sizes.append(f"{cols}x{rows}={value}")
        outputs.append(text(out))
        oks += int("pty-ok" in out)
    result("sizes=" + ",".join(sizes), f"pty_ok={oks}", "output=" + " | ".join(outputs))


async def mode_long_login(cfg, budget) -> None:
    t0 = time.monotonic()
    try:
        conn, _ = await connect(cfg, budget, username="a" * cfg.count)
    except asyncssh.PermissionDenied as exc:
        denied, answered, err, reason = 1, 1, type(exc).__name__, exc.reason
    except asyncssh.DisconnectError as exc:  # includes ConnectionLost
        denied, answered, err, reason = 1, 1, type(exc).__name__, exc.reason
    except (ConnectionError, EOFError) as exc:
        denied, answered, err, reason = 1, 1, type(exc).__name__, str(exc)
    except asyncio.TimeoutError:
        denied, answered, err, reason = 0, 0, "TimeoutError", "no answer to the login"
    else:
        denied, answered, err, reason = 0, 1, "none", "logged in"
        conn.abort()
    result(f"denied={denied}", f"answered={answered}", f"seconds={time.monotonic() - t0:.3f}",
           f"error={err}", f"reason={text(reason)}")


async def mode_pre_start_data(cfg, budget) -> None:
    conn, tracker = await connect(cfg, budget)
    chan, sess = await open_raw_session(conn, None)
    for i in range(cfg.count):
        chan.write(b"x")
        chan._send_request(b"window-change", UInt32(80 + i % 40), UInt32(24 + i % 10),
                           UInt32(0), UInt32(0))
    answered, accepted, seconds = await request(chan, budget, 2, b"exec", String("cat"))
    if accepted:
        start_reading(conn, chan)
        try:
            chan.write_eof()
        except OSError:
            pass
        await wait_event(sess.closed, budget, 3)
    result(f"answered={int(answered)}", f"accepted={int(accepted)}", f"seconds={seconds:.3f}",
           f"echoed={len(sess.output())}", f"disconnected={int(tracker.lost.is_set())}")
    conn.abort()


async def mode_open_close_channels(cfg, budget) -> None:
    """Opens COUNT session channels one after another and closes each before any request, then
    holds the connection (until killed, or the budget ends) for the caller to count what the
    relay keeps toward the target meanwhile."""
    conn, tracker = await connect(cfg, budget)
    for _ in range(cfg.count):
        chan, _sess = await open_raw_session(conn, None)
        chan.close()
    result(f"opened={cfg.count}", f"disconnected={int(tracker.lost.is_set())}")
    await asyncio.sleep(budget.cap(3600))
    conn.abort()


async def mode_large_packets(cfg, budget) -> None:
    conn, _tracker = await connect(cfg, budget)
    chan, sess = await open_raw_session(conn, None, window=8 * MIB)
    _, accepted, _ = await request(chan, budget, 10, b"exec", String("sha256sum"))
    payload = os.urandom(cfg.count * MIB)
    if accepted:
        start_reading(conn, chan)
        chan.write(payload)
        chan.write_eof()
        await wait_event(sess.closed, budget, 30)
    remote = bytes(sess.output()).decode("ascii", "replace").split(" ")[0]
    result(f"send_pktsize={chan._send_pktsize}",
           f"sent_digest={hashlib.sha256(payload).hexdigest()}",
           f"remote_digest={token(remote)}")
    conn.abort()


async def mode_empty_data(cfg, budget) -> None:
    conn, _tracker = await connect(cfg, budget)
    chan, sess = await open_raw_session(conn, None)
    _, accepted, _ = await request(chan, budget, 10, b"exec", String("sha256sum"))
    payload = os.urandom(64 * 1024)
    piece = len(payload) // 64
    sent = 0
    if accepted:
        start_reading(conn, chan)
        transport = conn._transport
        for k in range(64):
            chan.write(payload[k * piece:(k + 1) * piece])
            for _ in range(cfg.count // 64 + (1 if k < cfg.count % 64 else 0)):
                chan.send_packet(MSG_CHANNEL_DATA, String(b""))
                sent += 1
            # the empty messages take no window: wait on the socket instead
            while transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                if budget.cap(3600) < 2 or transport.is_closing():
                    break
                await asyncio.sleep(0.002)
        chan.write_eof()
        await wait_event(sess.closed, budget, 30)
    remote = bytes(sess.output()).decode("ascii", "replace").split(" ")[0]
    result(f"empties={sent}",
           f"sent_digest={hashlib.sha256(payload).hexdigest()}",
           f"remote_digest={token(remote)}")
    conn.abort()


async def mode_stalled_rekey(cfg, budget) -> None:
    import asyncssh.kex_dh as kex_dh

    conn, tracker = await connect(cfg, budget)
    chan, sess = await open_raw_session(conn, None)
    size = cfg.count * MIB
    command = (f"echo start; head -c {size} /dev/zero; echo; "
               "for i in 1 2 3 4 5 6; do sleep 1; echo tick $i; done")
    _, accepted, _ = await request(chan, budget, 10, b"exec", String(command))
    if not accepted:
        result("failed=1", "error=exec", "reason=exec refused")
        conn.abort()
        return
    start_reading(conn, chan)
    got_start = asyncio.Event()
    received = sess.data_received

    def watch(data, datatype) -> None:
        received(data, datatype)
        if b"start\n" in bytes(sess.output()):
            got_start.set()

    sess.data_received = watch
    await wait_event(got_start, budget, 10)
    # Hold the key exchange: each DH/ECDH exchange's start (the client's first key exchange
    # message) is kept back until the hold ends. asyncssh defers every other packet meanwhile.
    held = []
    holding = True
    for cls in (kex_dh._KexDHBase, kex_dh._KexDHGex, kex_dh._KexECDH):
        original = cls.__dict__.get("start")
        if original is None:
            continue

        def start(self, original=original):
            if holding:
                held.append((self, original))
                log("key exchange held")
                return
            original(self)

        cls.start = start
    log("sending KEXINIT")
    conn._send_kexinit()
    conn._kexinit_sent = True
    t0 = time.monotonic()
    await asyncio.sleep(budget.cap(cfg.hold))
    holding = False
    hold_seconds = time.monotonic() - t0
    for kex, original in held:
        original(kex)
    log(f"key exchange released after {hold_seconds:.1f} s")
    await wait_event(sess.closed, budget, 30)
    out = bytes(sess.output())
    head = b"start\n"
    zeros = out[len(head):len(head) + size]
    ticks = [l for l in out[len(head) + size:].split(b"\n") if l.startswith(b"tick ")]
    want_ticks = [f"tick {i}".encode() for i in range(1, 7)]
    status = chan.get_exit_status()
    result(f"held={len(held)}", f"hold_seconds={hold_seconds:.1f}", f"bytes={len(out)}",
           f"zeros_ok={int(out.startswith(head) and zeros == bytes(size))}",
           f"ticks={len(ticks) if ticks == want_ticks else -1}",
           f"exit={status if status is not None else 'none'}",
           f"disconnected={int(tracker.lost.is_set())}")
    conn.abort()


async def main() -> int:
    cfg = parse_args()
    start_watchdog(cfg.max_seconds)
    budget = Budget(cfg.max_seconds)
    try:
        await globals()["mode_" + cfg.mode.replace("-", "_")](cfg, budget)
    except (asyncssh.Error, ConnectionError, asyncio.TimeoutError) as exc:
        # The peer refused or dropped something this mode needed (login, session open):
        # a finding about the peer, reported like any other.
        err, reason = describe(exc)
        result("failed=1", f"error={err}", f"reason={text(reason)}")
    return 0


if __name__ == "__main__":
    try:
        code = asyncio.run(main())
    except Exception as exc:  # pylint: disable=broad-except
        log(f"unexpected local error: {exc!r}")
        code = 2
    sys.stdout.flush()
    os._exit(code)
