"""Logs in with a key, answers psm's keyboard-interactive prompts with ANSWERS (separated by
"|", one per prompt, in order: a menu choice, a TOTP code, a reason), runs COMMAND and prints
its output.

usage: mfa_login.py PORT LOGIN KEYFILE ANSWERS COMMAND [SOURCE_ADDR]
exit: the command's exit status; 3 when authentication was refused.
Prints "prompt: …" for every prompt psm sent, so a test can check what the user was asked.
"""
import asyncio
import sys

import asyncssh


class Client(asyncssh.SSHClient):
    def __init__(self, answers: str) -> None:
        self.answers = answers.split("|")

    def kbdint_auth_requested(self) -> str:
        return ""

    def kbdint_challenge_received(self, name, instructions, lang, prompts):
        if instructions:
            print(f"instructions: {instructions}", flush=True)
        for prompt, _echo in prompts:
            print(f"prompt: {prompt}", flush=True)
        if not prompts:
            return []
        if not self.answers:
            # each answer is tried once, as a user who gives up after a refusal
            return None
        return [self.answers.pop(0) for _ in prompts]


async def main() -> int:
    port, login, keyfile, code, command = sys.argv[1:6]
    source = sys.argv[6] if len(sys.argv) > 6 else None
    try:
        conn, _ = await asyncio.wait_for(
            asyncssh.create_connection(
                lambda: Client(code),
                "127.0.0.1",
                int(port),
                username=login,
                client_keys=[keyfile],
                known_hosts=None,
                agent_path=None,
                preferred_auth="publickey,keyboard-interactive",
                local_addr=(source, 0) if source else None,
            ),
            timeout=30,
        )
    except asyncssh.PermissionDenied as e:
        print(f"refused: {e}", flush=True)
        return 3
    async with conn:
        r = await asyncio.wait_for(conn.run(command), timeout=30)
        sys.stdout.write(r.stdout or "")
        sys.stderr.write(r.stderr or "")
        return r.exit_status if r.exit_status is not None else 255


sys.exit(asyncio.run(main()))
