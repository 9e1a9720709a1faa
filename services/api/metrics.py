"""Prometheus metrics of the API and the ASGI middleware that counts and times every request.

Requests are labelled by route template (``/streams/{stream_id}/masks``), never by raw path, so
the number of series stays bounded whatever clients ask for.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("flowcloud_api_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "flowcloud_api_request_seconds",
    "time to the response's first byte",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
REDIS_ERRORS = Counter("flowcloud_api_redis_errors_total", "requests answered 503 because Redis failed")
AUTH_FAILURES = Counter(
    "flowcloud_api_auth_failures_total", "requests refused for their key", ["reason"]
)  # reason: missing, invalid (unknown, revoked or malformed), forbidden (wrong role)
LIVE_VIEWERS = Gauge("flowcloud_api_live_viewers", "open /streams/{id}/live responses")
LIVE_REVOKED = Counter(
    "flowcloud_api_live_revoked_total", "/live responses ended because their key was revoked"
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: "OTHER"
UNMATCHED = "unmatched"  # the route label of requests no route matched (404s of unknown paths)


class RequestMetrics:
    """Pure ASGI middleware (no per-request task or body buffering, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Bounded: methods x route templates x status codes.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        started = False

        def record(status_code: int) -> None:
            label = getattr(scope.get("route"), "path", UNMATCHED)
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            key = (method, label, status_code)
            children = self._children.get(key)
            if children is None:  # labels() costs a lock and a lookup; keep the children
                children = (LATENCY.labels(key[0], label), REQUESTS.labels(key[0], label, str(status_code)))
                self._children[key] = children
            children[0].observe(time.perf_counter() - start)
            children[1].inc()

        async def send_and_time(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_and_time)
        except BaseException:
            if not started:
                record(500)  # the server's error handler, outside this middleware, answers 500
            raise
