"""Child processes a supervisor starts: each in a session of its own, each dying with its parent.

A child in the terminal's session gets the terminal's Ctrl-C (SIGINT) at the same instant as its
supervisor, so it stops before the supervisor can order the shutdown. ``die_with_parent`` (a
``preexec_fn``) puts the child in its own session and asks the kernel for SIGTERM when the
supervisor dies (PR_SET_PDEATHSIG), so a killed supervisor leaves no orphan either. Linux only.

``listens_on(pid, port)`` says whether a process holds the listening TCP socket on a port, so that
a supervisor takes a readiness answer only from the process it started.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def die_with_parent() -> None:
    """``preexec_fn``: a session of the child's own, and SIGTERM when the parent dies.

    The parent-death signal follows the thread that forks, so fork from a long-lived thread.
    """
    parent = os.getppid()
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port`` (any address)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False
