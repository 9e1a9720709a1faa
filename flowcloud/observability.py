"""Prometheus metrics and health endpoints for the services that are not HTTP servers.

`serve_health_and_metrics(port, ready)` starts a small threaded HTTP server answering
``/metrics`` (Prometheus text format), ``/healthz`` (the process is alive) and ``/readyz``
(200 only while ``ready()`` is true: a worker is ready once its model is loaded and warmed up).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def _handler(ready: Callable[[], bool], registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ok = ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("health/metrics: " + format, *args)

    return Handler


class HealthServer:
    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_health_and_metrics(
    port: int,
    ready: Callable[[], bool] = lambda: True,
    host: str = "0.0.0.0",
    registry: CollectorRegistry = REGISTRY,
) -> HealthServer:
    """Serve /metrics, /healthz and /readyz on ``port`` (0 picks a free port) in a daemon thread."""
    server = ThreadingHTTPServer((host, port), _handler(ready, registry))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"health:{port}", daemon=True)
    thread.start()
    log.info("metrics and health on http://%s:%d/metrics", host, server.server_address[1])
    return HealthServer(server, thread)
