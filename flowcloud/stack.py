"""The one-machine stack: Redis, gateway, worker and API as supervised child processes.

`flowcloud up` and `flowcloud demo` run it; the end-to-end tests use it too. Each service is a
real `flowcloud <service>` process configured through its ``FLOWCLOUD_*`` settings. Children run
in their own sessions and die with their parent (PR_SET_PDEATHSIG), so neither Ctrl-C nor a
killed supervisor leaves orphans. Shutdown goes in data-flow order: the gateway stops taking
frames, the workers drain what they hold, then the API and Redis stop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from flowcloud.redis_server import EmbeddedRedis, free_port

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Service:
    name: str
    args: list[str]
    env: dict[str, str]
    ready_url: str | None = None
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        assert self.log_path is not None
        out = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowcloud", *self.args],
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # the supervisor starts no threads before this
        )
        out.close()
        log.info("started %s (pid %d), log in %s", self.name, self.process.pid, self.log_path)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@dataclass
class StackConfig:
    data_dir: Path
    redis_url: str | None = None  # None: start an embedded redis-server
    gateway_port: int = 7000
    api_port: int = 8000
    gateway_metrics_port: int = 9101
    worker_metrics_port: int = 9102
    workers: int = 1
    admin_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra FLOWCLOUD_* settings for every service
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        # Port 0 means "any free port": pick it here, since the stack must know where to look.
        for name in ("gateway_port", "api_port", "gateway_metrics_port", "worker_metrics_port"):
            if getattr(self, name) == 0:
                setattr(self, name, free_port())

    @classmethod
    def on_free_ports(cls, data_dir: Path, **kwargs: object) -> StackConfig:
        ports = dict.fromkeys(("gateway_port", "api_port", "gateway_metrics_port", "worker_metrics_port"), 0)
        return cls(data_dir=data_dir, **{**ports, **kwargs})  # type: ignore[arg-type]


class Stack:
    """Start with ``start()`` (or ``with``), watch with ``check()``, stop with ``stop()``."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.redis: EmbeddedRedis | None = None
        self.services: list[Service] = []

    @property
    def redis_url(self) -> str:
        if self.config.redis_url:
            return self.config.redis_url
        assert self.redis is not None, "stack not started"
        return self.redis.url

    @property
    def api_url(self) -> str:
        return f"http://{self.config.host}:{self.config.api_port}"

    @property
    def gateway_address(self) -> str:
        return f"{self.config.host}:{self.config.gateway_port}"

    def _services(self) -> list[Service]:
        c = self.config
        common = {"FLOWCLOUD_REDIS_URL": self.redis_url, **c.env}
        api_env = {**common, "FLOWCLOUD_API_HOST": c.host, "FLOWCLOUD_API_PORT": str(c.api_port)}
        if c.admin_key:
            api_env["FLOWCLOUD_API_ADMIN_KEY"] = c.admin_key
        services = [
            Service(
                "gateway",
                ["gateway"],
                {
                    **common,
                    "FLOWCLOUD_GATEWAY_HOST": c.host,
                    "FLOWCLOUD_GATEWAY_PORT": str(c.gateway_port),
                    "FLOWCLOUD_GATEWAY_METRICS_PORT": str(c.gateway_metrics_port),
                },
                ready_url=f"http://127.0.0.1:{c.gateway_metrics_port}/readyz",
            )
        ]
        for i in range(c.workers):
            port = c.worker_metrics_port + i
            services.append(
                Service(
                    f"worker-{i}",
                    ["worker"],
                    {
                        **common,
                        "FLOWCLOUD_WORKER_METRICS_PORT": str(port),
                        "FLOWCLOUD_WORKER_NAME": f"local-{i}",
                    },
                    ready_url=f"http://127.0.0.1:{port}/readyz",
                )
            )
        services.append(Service("api", ["api"], api_env, ready_url=f"{self.api_url}/healthz"))
        return services

    def start(self, ready_timeout: float = 180.0) -> Stack:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.redis_url:
            self.redis = EmbeddedRedis(self.config.data_dir / "redis").start()
        self.services = self._services()
        for service in self.services:
            service.log_path = self.config.data_dir / f"{service.name}.log"
            service.start()
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [s for s in self.services if s.ready_url]
        while pending:
            for service in list(pending):
                if not service.alive():
                    raise RuntimeError(f"{service.name} exited during start-up; see {service.log_path}")
                if _ready(service.ready_url or ""):
                    log.info("%s is ready", service.name)
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"not ready after {timeout:.0f} s: {names}; see {self.config.data_dir}")
            time.sleep(0.3)

    def check(self, restart: bool = True, max_restarts: int = 5) -> None:
        """Restart a service that died (a supervisor's job), up to ``max_restarts`` times each."""
        for service in self.services:
            if service.alive():
                continue
            code = service.process.returncode if service.process else None
            if not restart or service.restarts >= max_restarts:
                raise RuntimeError(f"{service.name} exited with status {code}; see {service.log_path}")
            service.restarts += 1
            log.warning("%s exited with status %s; restarting (%d)", service.name, code, service.restarts)
            service.start()

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        codes = {service.name: service.stop(timeout) for service in self.services}
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        return codes

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
