"""An embedded redis-server: a real Redis on a free loopback port with its own data directory.

Used by `flowcloud up` / `flowcloud demo` when no FLOWCLOUD_REDIS_URL is set, and by the tests.
It runs in a session of its own (the terminal's Ctrl-C goes to the supervisor, which stops it
last) and gets SIGTERM when the process that started it dies (flowcloud.children).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

from flowcloud.children import die_with_parent

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: all bound at once, so the kernel cannot hand one out twice
    (ports taken one after the other, each released before the next, may repeat)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port_run(count: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first of ``count`` consecutive free ports (workers' metrics ports are one per worker
    from a first one): a free port whose ``count - 1`` successors could be bound with it."""
    for _ in range(tries):
        first = free_port(host)
        if first + count - 1 > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).bind((host, port))
            except OSError:
                continue
            return first
    raise OSError(f"no run of {count} free ports on {host} after {tries} tries")


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise FileNotFoundError(
            "redis-server is not on PATH: install it (Debian: apt-get install redis-server) "
            "or set FLOWCLOUD_REDIS_URL to an existing Redis"
        )
    return path


class EmbeddedRedis:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; ``url`` is the client URL."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        appendonly: bool = True,
        options: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()  # redis-server changes into --dir before opening its log
        self.port = port or free_port()
        self.appendonly = appendonly
        self.options = list(options)  # more redis-server options ("--cluster-enabled", "yes", ...)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.options,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        # Ready when this process answers: whatever else listens on the port (the port was free
        # when chosen, but another process may have taken it since) does not count.
        client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = client.info()  # its server and persistence sections: its pid, and loading or not
                if int(info["process_id"]) == self.process.pid and not int(info["loading"]):
                    break
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            finally:
                client.close()
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; see {self.data_dir / 'redis.log'}")
            time.sleep(0.05)
        log.info("embedded redis-server on port %d, data in %s", self.port, self.data_dir)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost machine would end it (no shutdown, nothing saved)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
