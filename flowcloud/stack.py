"""The one-machine stack: Redis, gateway, worker, alert evaluator and API as supervised child processes.

`flowcloud up` and `flowcloud demo` run it; the end-to-end tests use it too. Each service is a
real `flowcloud <service>` process configured through its ``FLOWCLOUD_*`` settings. Children,
the embedded redis-server included, run in their own sessions and die with their parent
(flowcloud.children), so the terminal's Ctrl-C reaches only the supervisor and a killed
supervisor leaves no orphan. Shutdown goes in data-flow order: the gateway stops taking frames,
the workers drain what they hold, then the alert evaluator and the API stop, and Redis last.

Every port is checked before anything starts (one line naming the port and its setting when one
is taken), and a service is ready only when the process the stack started holds the listening
socket of its health port and answers ready there: never whatever else answers on that port.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from flowcloud.children import die_with_parent, listens_on
from flowcloud.redis_server import EmbeddedRedis, free_port_run

log = logging.getLogger(__name__)


ANY = "0.0.0.0"  # where the services serve /metrics (flowcloud.observability)


class PortInUse(RuntimeError):
    """A port the stack needs is taken, or given to two services."""


@dataclass
class Port:
    """A port a service will listen on, and the setting that chose it (for the error message)."""

    owner: str
    setting: str
    number: int
    host: str


@dataclass
class Service:
    name: str
    args: list[str]
    env: dict[str, str]
    ready_url: str | None = None
    ready_port: int | None = None  # the port of ready_url, which the started process must hold
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
            preexec_fn=die_with_parent,  # the supervisor starts no threads before this
        )
        out.close()
        log.info("started %s (pid %d), log in %s", self.name, self.process.pid, self.log_path)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """Answers ready on ``ready_url``, from the socket of this service's own process."""
        if self.ready_url is None:
            return self.alive()
        if not self.alive():
            return False
        assert self.process is not None
        if self.ready_port is not None and not listens_on(self.process.pid, self.ready_port):
            return False
        return _ready(self.ready_url)

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


PORTS = ("gateway_port", "api_port", "gateway_metrics_port", "worker_metrics_port", "alerts_metrics_port")


@dataclass
class StackConfig:
    data_dir: Path
    redis_url: str | None = None  # None: start an embedded redis-server
    gateway_port: int = 7000
    api_port: int = 8000
    gateway_metrics_port: int = 9101
    worker_metrics_port: int = 9102
    alerts_metrics_port: int = 9104
    workers: int = 1
    admin_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra FLOWCLOUD_* settings for every service
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        # Port 0 means "any free port": pick it here, since the stack must know where to look.
        for name in PORTS:
            number = getattr(self, name)
            if not 0 <= number <= 65535:
                raise ValueError(f"{name} {number} is not a TCP port (0-65535)")
            if number == 0:
                # One metrics port per worker from the first: all of them free, not only the first.
                run = self.workers if name == "worker_metrics_port" else 1
                setattr(self, name, free_port_run(run))
        if self.worker_metrics_port + self.workers - 1 > 65535:
            raise ValueError(
                f"{self.workers} workers from metrics port {self.worker_metrics_port} pass 65535"
            )

    def ports(self) -> list[Port]:
        """Every port the stack's services will listen on (metrics ports on all addresses)."""
        ports = [
            Port("the gateway", "FLOWCLOUD_GATEWAY_PORT", self.gateway_port, self.host),
            Port("the gateway's metrics", "FLOWCLOUD_GATEWAY_METRICS_PORT", self.gateway_metrics_port, ANY),
            Port("the API", "FLOWCLOUD_API_PORT", self.api_port, self.host),
            Port(
                "the alert evaluator's metrics",
                "FLOWCLOUD_ALERTS_METRICS_PORT",
                self.alerts_metrics_port,
                ANY,
            ),
        ]
        ports += [
            Port(f"worker-{i}'s metrics", "FLOWCLOUD_WORKER_METRICS_PORT", self.worker_metrics_port + i, ANY)
            for i in range(self.workers)
        ]
        return ports

    def check_ports(self) -> None:
        """Raise PortInUse, naming the port and its setting, if two services share a port or one is taken."""
        seen: dict[int, Port] = {}
        for port in self.ports():
            other = seen.setdefault(port.number, port)
            if other is not port:
                raise PortInUse(
                    f"port {port.number} is given to both {other.owner} ({other.setting}) "
                    f"and {port.owner} ({port.setting})"
                )
            problem = _bind_problem(port.host, port.number)
            if problem:
                raise PortInUse(
                    f"port {port.number} for {port.owner} is in use on {port.host} "
                    f"({problem}); choose another with {port.setting}"
                )

    @classmethod
    def on_free_ports(cls, data_dir: Path, **kwargs: object) -> StackConfig:
        ports = dict.fromkeys(PORTS, 0)
        return cls(data_dir=data_dir, **{**ports, **kwargs})  # type: ignore[arg-type]


def _bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now, or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


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
                ready_port=c.gateway_metrics_port,
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
                    ready_port=port,
                )
            )
        services.append(
            Service(
                "alerts",
                ["alerts"],
                {**common, "FLOWCLOUD_ALERTS_METRICS_PORT": str(c.alerts_metrics_port)},
                ready_url=f"http://127.0.0.1:{c.alerts_metrics_port}/readyz",
                ready_port=c.alerts_metrics_port,
            )
        )
        services.append(
            Service("api", ["api"], api_env, ready_url=f"{self.api_url}/healthz", ready_port=c.api_port)
        )
        return services

    def start(self, ready_timeout: float = 180.0) -> Stack:
        self.config.check_ports()
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
                if service.ready():
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
        """Stop the services in data-flow order, each within ``timeout``, then Redis."""
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
