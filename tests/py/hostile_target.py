"""A hostile SSH server (the "target") that the gateway logs in to.

It accepts password authentication for one user name and password only and, for every
session channel that requests exec or shell, misbehaves as MODE says:

  normal              writes "ok\\n" to stdout and exits with status 0 (sanity check).
  exit-signal-flood   writes "flood-start\\n", then sends COUNT (default 8000) exit-signal
                      channel requests (signal TERM, ~240 KB error message each, want_reply
                      false) as fast as the peer reads them, then closes the channel.
  unasked-channels    writes "opened\\n", then tries to open COUNT (default 200) channels of
                      each kind toward the gateway: forwarded-tcpip, x11,
                      auth-agent@openssh.com, session and direct-tcpip; prints
                      "accepted=A refused=R unanswered=U disconnected=0|1" on this script's
                      stdout, then writes "done\\n" on the session, exits it with status 0
                      and ends this process (status 0) once the connection has closed
                      (waiting at most 3 s for that).
  rst-after-output    writes "before-reset\\n", waits 0.3 s and aborts the TCP connection with
                      a RST (SO_LINGER 0, then close).
  oversized-packet    writes "before-big\\n", then sends a properly encrypted packet header
                      whose length field is 0x7fffffff, followed by a few bytes of garbage,
                      and then nothing more.
  large-packets       not an abuse: writes COUNT (default 4) MiB of "0123456789abcdef" repeated
                      in one write, which asyncssh cuts into packets of the largest size the
                      gateway allows, then exits with status 0.
  stall               writes "stalled\\n", then stops reading from the socket and never
                      answers anything again.
  empty-data          sends COUNT (default 100000) empty data messages on stdout and as many
                      on stderr (SSH_MSG_CHANNEL_DATA and _EXTENDED_DATA carrying no byte,
                      which take no window), writing "line I\\n" on stdout every 1000th, then
                      "done\\n", and exits with status 0.

usage: hostile_target.py --port-file PATH --host-key PATH --user U --password P
                         --mode MODE [--count N] [--max-seconds S]

It listens on 127.0.0.1 on a port the kernel picks and writes that port and a newline to
--port-file (write to PATH.tmp, then rename) once it is listening. Except for
unasked-channels, it runs until killed or until --max-seconds (default 60) have passed,
whichever comes first; a watchdog thread ends the process with os._exit at that deadline
even if the event loop is busy. Logs go to
stderr; stdout carries only the unasked-channels result line.
"""
import argparse
import asyncio
import os
import socket
import struct
import sys
import threading
import time

import asyncssh
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.packet import Boolean, String, UInt32

MODES = (
    "normal",
    "exit-signal-flood",
    "unasked-channels",
    "rst-after-output",
    "oversized-packet",
    "stall",
    "large-packets",
    "empty-data",
)
DEFAULT_COUNT = {
    "exit-signal-flood": 8000,
    "unasked-channels": 200,
    "large-packets": 4,
    "empty-data": 100000,
}
CHANNEL_KINDS = ("forwarded-tcpip", "x11", "auth-agent@openssh.com", "session", "direct-tcpip")
# Most bytes queued in the kernel-side transport buffer before the flood waits for the peer.
FLOOD_BUFFER_LIMIT = 8 * 1024 * 1024
OPEN_TIMEOUT = 10.0
START = time.monotonic()


def log(msg: str) -> None:
    print(f"hostile_target[{time.monotonic() - START:7.3f}]: {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="hostile SSH target server")
    p.add_argument("--port-file", required=True)
    p.add_argument("--host-key", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--window", type=int, default=2 * 1024 * 1024,
                   help="the receive window the target offers on each channel")
    args = p.parse_args()
    if args.count is None:
        args.count = DEFAULT_COUNT.get(args.mode, 0)
    if args.count < 0 or args.max_seconds <= 0:
        p.error("--count must be >= 0 and --max-seconds > 0")
    return args


def start_watchdog(seconds: float) -> None:
    def fire() -> None:
        log(f"watchdog: {seconds:g} s passed, exiting")
        sys.stdout.flush()
        os._exit(0)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = START + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class NullTCPSession(asyncssh.SSHTCPSession):
    pass


class NullUNIXSession(asyncssh.SSHUNIXSession):
    pass


class HostileSession(asyncssh.SSHServerSession):
    def __init__(self, cfg: argparse.Namespace, deadline: Deadline) -> None:
        self.cfg = cfg
        self.deadline = deadline
        self.chan = None
        self.command = None

    def connection_made(self, chan) -> None:
        self.chan = chan

    def pty_requested(self, term_type, term_size, term_modes) -> bool:
        return True

    def shell_requested(self) -> bool:
        log("shell requested")
        return True

    def exec_requested(self, command: str) -> bool:
        log(f"exec requested: {command!r}")
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def data_received(self, data, datatype) -> None:
        pass

    def eof_received(self) -> bool:
        return True  # keep our side open; the mode decides when to close

    def connection_lost(self, exc) -> None:
        log(f"session channel closed: {exc!r}")

    def session_started(self) -> None:
        asyncio.get_running_loop().create_task(self.run_mode())

    async def run_mode(self) -> None:
        mode = self.cfg.mode
        try:
            await getattr(self, "mode_" + mode.replace("-", "_"))()
        except Exception as exc:  # a hostile peer may make anything fail; keep serving
            log(f"mode {mode} raised {exc!r}")
        finally:
            if mode == "unasked-channels":
                self.cfg.finished.set()  # this mode ends the whole process once done

    # --- modes -------------------------------------------------------------------------

    async def mode_normal(self) -> None:
        self.chan.write("ok\n")
        self.chan.exit(0)

    async def mode_exit_signal_flood(self) -> None:
        chan = self.chan
        conn = chan.get_extra_info("connection")
        transport = conn._transport
        chan.write("flood-start\n")
        msg = String("x" * 240000)
        sent = 0
        t0 = time.monotonic()
        for _ in range(self.cfg.count):
            # Stop when the peer has closed the channel or the connection: send_packet
            # silently drops packets on a channel without a remote id.
            if chan._send_chan is None or conn._transport is None or transport.is_closing():
                break
            while (transport.get_write_buffer_size() > FLOOD_BUFFER_LIMIT
                   or not conn._kex_complete):
                if self.deadline.left() < 2 or transport.is_closing():
                    break
                await asyncio.sleep(0.002)
            if self.deadline.left() < 2 or transport.is_closing():
                break
            # channel.exit_with_signal() sends exit-signal once and closes the channel;
            # _send_request is the raw SSH_MSG_CHANNEL_REQUEST it uses underneath.
            chan._send_request(b"exit-signal", String("TERM"), Boolean(False), msg, String(""))
            sent += 1
            if sent % 64 == 0:
                await asyncio.sleep(0)  # let the loop flush and read
        log(f"exit-signal flood: sent {sent} of {self.cfg.count} in "
            f"{time.monotonic() - t0:.2f} s")
        if chan._send_chan is not None:
            chan.close()

    async def _open_one(self, conn, kind: str) -> str:
        if kind == "forwarded-tcpip":
            chan, _ = await conn.create_connection(
                NullTCPSession, "127.0.0.1", 2222, "127.0.0.1", 40000)
        elif kind == "x11":
            chan, _ = await conn.create_x11_connection(NullTCPSession, "127.0.0.1", 40001)
        elif kind == "auth-agent@openssh.com":
            # create_agent_connection() refuses unless the client asked for agent forwarding.
            chan = conn.create_agent_channel()
            await chan.open(NullUNIXSession)
        elif kind == "session":
            # A server never opens "session" channels; send the raw CHANNEL_OPEN anyway.
            chan = conn.create_tcp_channel()
            await chan._open_forward(NullTCPSession, b"session")
        elif kind == "direct-tcpip":
            # direct-tcpip is a client-to-server channel type; send it the wrong way.
            chan = conn.create_tcp_channel()
            await chan.connect(NullTCPSession, "127.0.0.1", 22, "127.0.0.1", 40002)
        else:
            raise AssertionError(kind)
        chan.close()
        return "accepted"

    async def _try_open(self, conn, kind: str, sem: asyncio.Semaphore) -> str:
        async with sem:
            left = min(OPEN_TIMEOUT, self.deadline.left() - 3)
            if left <= 0 or conn._transport is None:
                return "unanswered"
            try:
                return await asyncio.wait_for(self._open_one(conn, kind), left)
            except asyncssh.ChannelOpenError as exc:
                if exc.reason == "SSH connection closed":
                    return "closed"
                return "refused"
            except asyncio.TimeoutError:
                return "unanswered"
            except (OSError, asyncssh.Error) as exc:
                log(f"open {kind} failed locally: {exc!r}")
                return "closed"

    async def mode_unasked_channels(self) -> None:
        chan = self.chan
        conn = chan.get_extra_info("connection")
        chan.write("opened\n")
        sem = asyncio.Semaphore(64)
        totals = {"accepted": 0, "refused": 0, "unanswered": 0, "closed": 0}
        for kind in CHANNEL_KINDS:
            results = await asyncio.gather(
                *(self._try_open(conn, kind, sem) for _ in range(self.cfg.count)))
            per = {k: results.count(k) for k in totals}
            log(f"{kind}: {per}")
            for k in totals:
                totals[k] += per[k]
        disconnected = int(conn._transport is None or totals["closed"] > 0)
        print(f"accepted={totals['accepted']} refused={totals['refused']} "
              f"unanswered={totals['unanswered']} disconnected={disconnected}", flush=True)
        if not chan.is_closing():
            chan.write("done\n")
            chan.exit(0)

    async def mode_rst_after_output(self) -> None:
        self.chan.write("before-reset\n")
        await asyncio.sleep(0.3)
        conn = self.chan.get_extra_info("connection")
        transport = conn._transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        log("aborting the TCP connection with SO_LINGER 0 (RST)")
        transport.abort()

    async def mode_oversized_packet(self) -> None:
        self.chan.write("before-big\n")
        await asyncio.sleep(0.1)
        conn = self.chan.get_extra_info("connection")
        hdr = UInt32(0x7FFFFFFF)
        body = os.urandom(60)
        data = None
        enc = conn._send_encryption
        if enc is not None:
            try:
                pkt, mac = enc.encrypt_packet(conn._send_seq, hdr, body)
                data = pkt + mac
            except Exception as exc:
                log(f"could not encrypt the bogus header ({exc!r}); sending it in clear")
        if data is None:
            data = hdr + body
        conn._send_seq = (conn._send_seq + 1) & 0xFFFFFFFF
        conn._transport.write(data)
        log(f"sent a packet header claiming 0x7fffffff bytes ({len(data)} bytes on the wire)")

    async def mode_large_packets(self) -> None:
        chan = self.chan
        log(f"writing {self.cfg.count} MiB; the gateway's maximum packet is {chan._send_pktsize}")
        chan.write("0123456789abcdef" * (self.cfg.count * 65536))  # the session's encoding is UTF-8
        chan.exit(0)

    async def mode_empty_data(self) -> None:
        chan = self.chan
        transport = chan.get_extra_info("connection")._transport
        for i in range(self.cfg.count):
            if i % 1000 == 0:
                chan.write(f"line {i}\n")
                # the empty messages take no window: wait on the socket instead
                while transport.get_write_buffer_size() > FLOOD_BUFFER_LIMIT:
                    if self.deadline.left() < 2 or transport.is_closing():
                        return
                    await asyncio.sleep(0.002)
            chan.send_packet(MSG_CHANNEL_DATA, String(b""))
            chan.send_packet(MSG_CHANNEL_EXTENDED_DATA, UInt32(1), String(b""))
        log(f"sent {self.cfg.count} empty data messages on stdout and on stderr")
        chan.write("done\n")
        chan.exit(0)

    async def mode_stall(self) -> None:
        self.chan.write("stalled\n")
        await asyncio.sleep(0.1)
        conn = self.chan.get_extra_info("connection")
        conn._transport.pause_reading()
        log("stopped reading; stalling until killed")


class HostileServer(asyncssh.SSHServer):
    def __init__(self, cfg: argparse.Namespace, deadline: Deadline) -> None:
        self.cfg = cfg
        self.deadline = deadline

    def connection_made(self, conn) -> None:
        self.cfg.active += 1
        log(f"connection from {conn.get_extra_info('peername')}")

    def connection_lost(self, exc) -> None:
        self.cfg.active -= 1
        log(f"connection lost: {exc!r}")

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        ok = username == self.cfg.user and password == self.cfg.password
        log(f"password auth for {username[:64]!r}: {'ok' if ok else 'denied'}")
        return ok

    def session_requested(self):
        return HostileSession(self.cfg, self.deadline)


async def main() -> None:
    cfg = parse_args()
    cfg.finished = asyncio.Event()
    cfg.active = 0
    start_watchdog(cfg.max_seconds)
    deadline = Deadline(cfg.max_seconds)
    key = asyncssh.read_private_key(cfg.host_key)
    server = await asyncssh.create_server(
        lambda: HostileServer(cfg, deadline),
        "127.0.0.1",
        0,
        server_host_keys=[key],
        rekey_bytes=1 << 40,
        rekey_seconds=0,  # rekey_seconds <= 0 disables time-based rekeying
        login_timeout=cfg.max_seconds,
        keepalive_interval=0,
        window=cfg.window,
        allow_pty=True,
        x11_forwarding=False,
        agent_forwarding=False,
    )
    port = server.sockets[0].getsockname()[1]
    tmp = cfg.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, cfg.port_file)
    log(f"listening on 127.0.0.1:{port}, mode {cfg.mode}, count {cfg.count}")
    try:
        await asyncio.wait_for(cfg.finished.wait(), max(0.1, deadline.left()))
    except asyncio.TimeoutError:
        log("deadline reached, exiting")
        return
    # unasked-channels: give the peer up to 3 s to close, then exit 0.
    end = time.monotonic() + min(3.0, max(0.0, deadline.left() - 1))
    while cfg.active > 0 and time.monotonic() < end:
        await asyncio.sleep(0.05)
    server.close()
    log("mode finished, exiting")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
