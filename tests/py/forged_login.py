"""Tries a password login whose user name holds a newline, ESC, NUL and a bidi override.

asyncssh normalises user names with SASLprep, which refuses such characters; a hostile client
does not, so the check is bypassed here to send the name as an attacker would.

usage: forged_login.py PORT LOGIN_HEX
"""
import asyncio
import sys

import asyncssh
import asyncssh.connection

asyncssh.connection.saslprep = lambda s: s


async def main() -> None:
    port = int(sys.argv[1])
    login = bytes.fromhex(sys.argv[2]).decode("utf-8")
    try:
        conn = await asyncio.wait_for(
            asyncssh.connect(
                "127.0.0.1",
                port,
                username=login,
                password="not-the-password",
                known_hosts=None,
                client_keys=None,
                agent_path=None,
                preferred_auth="password",
            ),
            20,
        )
        conn.close()
        print("LOGGED-IN")
    except asyncssh.PermissionDenied:
        print("DENIED")


asyncio.run(main())
