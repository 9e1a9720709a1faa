"""Polling until something holds: ``eventually`` in async tests (True or False for an assert),
``wait_for`` in sync ones (fails with what it waited for, and the log of a process that died),
``wait_listening`` until a TCP port on loopback accepts connections."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, step: float = 0.05
) -> bool:
    """Poll ``predicate`` (plain or async) until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[Any] | None = None,
    step: float = 0.02,
) -> None:
    """Poll ``check`` until true; fail on a timeout, or as soon as ``proc`` exits, with the tail of
    the process's log when it names one (``log_path``, as ``support.worker.WorkerProcess`` does)."""
    deadline = time.monotonic() + timeout
    while not check():
        problem = None
        if proc is not None and proc.poll() is not None:
            problem = f"the process exited with {proc.returncode} while waiting for {what}"
        elif time.monotonic() > deadline:
            problem = f"timed out after {timeout:.0f}s waiting for {what}"
        if problem:
            log = getattr(proc, "log_path", None)
            tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-40:]) if log else ""
            raise AssertionError(f"{problem}\n--- process log ---\n{tail}" if tail else problem)
        time.sleep(step)


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port`` (the probe sends nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")
