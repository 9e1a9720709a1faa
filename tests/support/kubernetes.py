"""A local HTTP server that speaks the Kubernetes API's JSON for the few endpoints the API's cluster
view reads (pods, nodes, deployments, horizontal pod autoscalers), so that the real `kubernetes`
client is tested against the wire format rather than mocked. It records each request as the RBAC
permission it needs (API group, resource, verb), and answers 403 for the resources it is told to
refuse, as an API server does when a Role does not grant them."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# path -> (group, resource, verb); the names in the path are captured but not part of the permission.
ROUTES: list[tuple[re.Pattern[str], tuple[str, str, str]]] = [
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$"), ("", "pods", "list")),
    (re.compile(r"^/api/v1/nodes/(?P<name>[^/]+)$"), ("", "nodes", "get")),
    (
        re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)$"),
        ("apps", "deployments", "get"),
    ),
    (
        re.compile(r"^/apis/autoscaling/v2/namespaces/(?P<ns>[^/]+)/horizontalpodautoscalers$"),
        ("autoscaling", "horizontalpodautoscalers", "list"),
    ),
]


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Cluster:
    """What the fake API server holds, by namespace where namespaced."""

    pods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    hpas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)  # resources answered with 403
    requests: list[tuple[tuple[str, str, str], dict[str, list[str]]]] = field(default_factory=list)

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        for pattern, permission in ROUTES:
            match = pattern.match(path)
            if match is None:
                continue
            self.requests.append((permission, query))
            names = match.groupdict()
            _group, resource, _verb = permission
            if resource in self.refused:
                who = "system:serviceaccount:fc:flowcloud-api"
                return 403, status_body(403, "Forbidden", f'{resource} is forbidden: User "{who}" cannot')
            if resource == "pods":
                selector = dict(
                    kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv
                )
                items = [
                    p
                    for p in self.pods.get(names["ns"], [])
                    if selector.items() <= p["metadata"]["labels"].items()
                ]
                return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
            if resource == "nodes" and names["name"] in self.nodes:
                return 200, self.nodes[names["name"]]
            if resource == "deployments" and (names["ns"], names["name"]) in self.deployments:
                return 200, self.deployments[(names["ns"], names["name"])]
            if resource == "horizontalpodautoscalers":
                items = self.hpas.get(names["ns"], [])
                return 200, {
                    "kind": "HorizontalPodAutoscalerList",
                    "apiVersion": "autoscaling/v2",
                    "metadata": {},
                    "items": items,
                }
            return 404, status_body(404, "NotFound", f"{resource} {names.get('name')!r} not found")
        return 404, status_body(404, "NotFound", f"the server could not find the requested resource {path}")


@contextmanager
def kubernetes_api(cluster: Cluster) -> Iterator[str]:
    """Serve ``cluster`` on a free loopback port; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            code, body = cluster.answer(url.path, parse_qs(url.query))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="kubernetes-api", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
