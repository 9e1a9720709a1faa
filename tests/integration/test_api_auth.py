"""Auth walks every route of the OpenAPI document: 401 without a valid key, 403 for a reader on
admin routes, 404 for another tenant's stream, and success for the right key. The document itself
needs a key, and the public probes say nothing about the workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from support.api import make_key, running_api, seed_stream

from flowcloud import keys
from flowcloud.alerts import AlertRule
from flowcloud.registry import DeviceRegistry
from flowcloud.settings import ApiSettings
from services.api.apikeys import ApiKeyStore
from services.api.main import create_app

ADMIN_KEY = "bootstrap-admin-key-for-tests"
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/"),
    ("GET", "/dashboard"),
    ("GET", "/dashboard/{asset}"),
}
EXPECTED = PUBLIC | {
    ("GET", "/metrics"),
    ("GET", "/streams"),
    ("GET", "/streams/{stream_id}"),
    ("GET", "/streams/{stream_id}/masks"),
    ("GET", "/streams/{stream_id}/masks/latest"),
    ("GET", "/streams/{stream_id}/masks/{frame}"),
    ("GET", "/streams/{stream_id}/stats"),
    ("GET", "/streams/{stream_id}/live"),
    ("GET", "/streams/{stream_id}/aggregates"),
    ("GET", "/streams/{stream_id}/edge-masks"),
    ("GET", "/search"),
    ("POST", "/alerts/rules"),
    ("GET", "/alerts/rules"),
    ("DELETE", "/alerts/rules/{rule_id}"),
    ("GET", "/alerts/firings"),
    ("POST", "/devices"),
    ("GET", "/devices"),
    ("DELETE", "/devices/{device_id}"),
    ("POST", "/devices/{device_id}/rotate"),
    ("GET", "/workers"),
    ("GET", "/cluster"),
}
ADMIN_ONLY = {r for r in EXPECTED if r[1].startswith(("/devices", "/alerts/rules"))} | {
    ("GET", "/workers"),
    ("GET", "/cluster"),
}


RULE_ID = "rauth"  # an alert rule of tenant beta, made by the fixture
QUERIES = {"/search": "?class=person", "/alerts/rules/{rule_id}": "?tenant=beta"}
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/devices"): {"device_id": "cam-new", "tenant": "beta"},
    ("POST", "/alerts/rules"): {"tenant": "beta", "class_name": "car", "op": "above", "threshold": 0.3},
}


def documented_routes() -> set[tuple[str, str]]:
    schema = create_app(ApiSettings()).openapi()
    return {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}


@dataclass
class Setup:
    client: httpx.Client
    redis_url: str
    reader_alpha: str
    reader_beta: str
    admin: str  # a stored admin key (the bootstrap key is ADMIN_KEY)


@pytest.fixture
def api(redis_url: str) -> Iterator[Setup]:
    seed_stream(redis_url, "cam-alpha", "alpha", count=12)
    seed_stream(redis_url, "cam-beta", "beta", count=12)

    async def devices() -> None:
        redis = Redis.from_url(redis_url)
        registry = DeviceRegistry(redis)
        for device_id in ("cam-rotate", "cam-delete"):
            await registry.add(device_id, "beta")
        rule = AlertRule(id=RULE_ID, tenant="beta", class_name="person", op="above", threshold=0.1)
        await redis.hset(keys.alert_rules("beta"), RULE_ID, json.dumps(asdict(rule)))
        await redis.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(devices())
    settings = ApiSettings(redis_url=redis_url, admin_key=ADMIN_KEY, auth_cache_seconds=0)
    with running_api(settings) as base, httpx.Client(base_url=base, timeout=10) as client:
        yield Setup(
            client,
            redis_url,
            make_key(redis_url, "reader", "alpha"),
            make_key(redis_url, "reader", "beta"),
            make_key(redis_url, "admin", "alpha"),
        )


def concrete(method: str, path: str, stream: str = "cam-beta") -> tuple[str, dict[str, Any] | None]:
    """A URL for a route template, and the JSON body it needs."""
    device = "cam-delete" if method == "DELETE" else "cam-rotate"
    url = (
        path.replace("{stream_id}", stream)
        .replace("{frame}", "11")
        .replace("{device_id}", device)
        .replace("{asset}", "dashboard.js")
        .replace("{rule_id}", RULE_ID)
    )
    url += QUERIES.get(path, "")
    return url, BODIES.get((method, path))


def call(
    client: httpx.Client, method: str, path: str, token: str | None, stream: str = "cam-beta"
) -> httpx.Response:
    url, body = concrete(method, path, stream)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = client.build_request(method, url, headers=headers, json=body)
    response = client.send(request, stream=True)  # /live never ends by itself
    try:
        if not response.headers.get("content-type", "").startswith(("text/event-stream", "multipart/")):
            response.read()
    finally:
        response.close()
    return response


def test_the_document_lists_every_route() -> None:
    assert documented_routes() == EXPECTED


def test_every_route_but_health_and_the_page_needs_a_valid_key(api: Setup) -> None:
    revoked = make_key(api.redis_url, "admin", "alpha")

    async def revoke() -> None:
        redis = Redis.from_url(api.redis_url)
        store = ApiKeyStore(redis)
        await store.revoke(revoked.removeprefix("fck_").split(".")[0])
        await redis.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(revoke())
    key_id = api.admin.removeprefix("fck_").split(".")[0]
    bad_tokens = {
        "no key": None,
        "garbage": "not-a-key",
        "wrong secret": f"fck_{key_id}.{'x' * 43}",
        "unknown id": f"fck_{'0' * 12}.{'x' * 43}",
        "revoked": revoked,
        "oversized": "fck_" + "a" * 5000,
    }
    for method, path in sorted(documented_routes()):
        for what, token in bad_tokens.items():
            response = call(api.client, method, path, token)
            if (method, path) in PUBLIC:
                assert response.status_code in (200, 307), (method, path, what, response.status_code)
            else:
                assert response.status_code == 401, (method, path, what, response.status_code)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["detail"]
    # A non-bearer scheme is no key either.
    response = api.client.get("/streams", headers={"Authorization": f"Basic {api.admin}"})
    assert response.status_code == 401


def _forbidden(client: httpx.Client) -> float:
    for row in client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text.splitlines():
        if row.startswith('flowcloud_api_auth_failures_total{reason="forbidden"}'):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def test_admin_routes_refuse_readers(api: Setup) -> None:
    before = _forbidden(api.client)
    for method, path in sorted(ADMIN_ONLY):
        response = call(api.client, method, path, api.reader_beta)
        assert response.status_code == 403, (method, path, response.status_code)
        assert response.json()["detail"] == "this route needs an admin key"
    assert _forbidden(api.client) - before == len(ADMIN_ONLY) == 9  # counted for the operators


def test_the_openapi_document_needs_a_key_and_no_docs_page_is_served(api: Setup) -> None:
    for token in (None, "not-a-key", f"fck_{'0' * 12}.{'x' * 43}"):
        response = call(api.client, "GET", "/openapi.json", token)
        assert response.status_code == 401, (token, response.status_code)
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert api.client.get(page).status_code == 404, page
    for token in (api.reader_alpha, ADMIN_KEY):
        document = api.client.get("/openapi.json", headers={"Authorization": f"Bearer {token}"})
        assert document.status_code == 200
        assert {(m.upper(), p) for p, ops in document.json()["paths"].items() for m in ops} == EXPECTED


def test_another_tenants_stream_answers_404_on_every_stream_route(api: Setup) -> None:
    stream_routes = sorted(r for r in documented_routes() if "{stream_id}" in r[1])
    assert len(stream_routes) == 8
    for method, path in stream_routes:
        other = call(api.client, method, path, api.reader_alpha, stream="cam-beta")
        unknown = call(api.client, method, path, api.reader_alpha, stream="cam-nowhere")
        own = call(api.client, method, path, api.reader_beta, stream="cam-beta")
        assert other.status_code == 404, (path, other.status_code)
        assert unknown.status_code == 404, (path, unknown.status_code)
        # Nothing tells another tenant's stream from one that does not exist.
        assert other.json()["detail"].replace("cam-beta", "X") == unknown.json()["detail"].replace(
            "cam-nowhere", "X"
        )
        assert own.status_code == 200, (path, own.status_code)


def test_readers_list_only_their_tenant_and_admins_see_all(api: Setup) -> None:
    seen = {}
    for name, token in (("alpha", api.reader_alpha), ("beta", api.reader_beta), ("admin", api.admin)):
        response = api.client.get("/streams", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        seen[name] = {s["stream_id"] for s in response.json()["items"]}
    assert seen == {"alpha": {"cam-alpha"}, "beta": {"cam-beta"}, "admin": {"cam-alpha", "cam-beta"}}


@pytest.mark.parametrize("token_kind", ["bootstrap", "stored"])
def test_admin_keys_reach_every_route(api: Setup, token_kind: str) -> None:
    token = ADMIN_KEY if token_kind == "bootstrap" else api.admin
    for method, path in sorted(documented_routes(), key=lambda r: (r[0] == "DELETE", r)):
        response = call(api.client, method, path, token)
        # /cluster: admitted, and off outside a cluster (tests/integration/test_api_cluster.py).
        expected = {
            ("POST", "/devices"): 201,
            ("GET", "/"): 307,
            ("GET", "/cluster"): 404,
            ("POST", "/alerts/rules"): 201,
            ("DELETE", "/alerts/rules/{rule_id}"): 204,
        }.get((method, path), 200)
        assert response.status_code == expected, (method, path, response.status_code)


def test_metrics_can_be_opened_to_plain_scrapers(redis_url: str) -> None:
    with running_api(ApiSettings(redis_url=redis_url, metrics_public=True)) as base:
        response = httpx.get(f"{base}/metrics")
    assert response.status_code == 200
    assert "flowcloud_api_requests_total" in response.text
