"""Runs a command where io_uring is refused, as in a container whose seccomp profile denies it.

    python3 no_io_uring.py PROGRAM [ARGS...]

Loads a seccomp filter (libseccomp's Python binding, Debian python3-seccomp) under which
io_uring_setup, io_uring_enter and io_uring_register fail with EPERM (the answer of Docker's and
Podman's default profiles) and every other system call is allowed, then replaces itself with
PROGRAM. The filter is inherited by PROGRAM and by every process it starts.
"""

import errno
import os
import sys

import seccomp


def main() -> None:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: no_io_uring.py PROGRAM [ARGS...]\n")
        sys.exit(2)
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for call in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        f.add_rule(seccomp.ERRNO(errno.EPERM), call)
    f.load()
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
