"""Helpers for the alert tests: a real webhook receiver on loopback that checks signatures and can
be down, and a real `flowcloud alerts` process."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from flowcloud.redis_server import free_port
from support.cli import REPO, flowcloud
from support.waiting import wait_for

STARTUP_TIMEOUT = 60.0


@dataclass
class Receipt:
    firing: dict[str, Any]
    signed: bool  # the signature verified with the rule's secret


@dataclass
class WebhookReceiver:
    """Records every POST; answers 503 while ``down`` (counted in ``refused``)."""

    secrets: dict[str, str] = field(default_factory=dict)  # rule id -> webhook secret
    received: list[Receipt] = field(default_factory=list)
    refused: int = 0
    down: bool = False
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ids(self) -> list[str]:
        with self.lock:
            return [r.firing["id"] for r in self.received]


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if receiver.down:
                with receiver.lock:
                    receiver.refused += 1
                self.send_response(503)
                self.end_headers()
                return
            firing = json.loads(body)["firing"]
            secret = receiver.secrets.get(firing["rule"], "")
            stamp = self.headers.get("X-FlowCloud-Timestamp", "")
            expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            signed = hmac.compare_digest(self.headers.get("X-FlowCloud-Signature", ""), f"sha256={expected}")
            signed = signed and self.headers.get("X-FlowCloud-Firing") == firing["id"]
            with receiver.lock:
                receiver.received.append(Receipt(firing, signed))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(receiver))
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


class AlertsProcess(subprocess.Popen[bytes]):
    log_path: Path
    metrics_port: int

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@contextmanager
def running_alerts(
    redis_url: str, name: str, log_dir: Path, *extra: str, control_url: str | None = None
) -> Iterator[AlertsProcess]:
    """A real `flowcloud alerts` process, ready when the block starts; killed at exit if still running."""
    port = free_port()
    log_path = log_dir / f"{name}.log"
    control = {"FLOWCLOUD_CONTROL_REDIS_URL": control_url} if control_url else {}
    command = flowcloud(
        "alerts", "--redis-url", redis_url, "--name", name, "--metrics-port", str(port), *extra
    )
    with log_path.open("ab") as log:
        proc = AlertsProcess(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                **control,
            },
        )
        proc.log_path = log_path
        proc.metrics_port = port
        try:
            wait_for(f"alerts {name} to be ready", lambda: _ready(port), STARTUP_TIMEOUT, proc)
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
