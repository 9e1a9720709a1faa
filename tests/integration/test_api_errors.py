"""Failures answer clearly: Redis down gives 503 with a JSON error and no stack trace (while
/healthz still answers), and the CLI reports bad input in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from support.api import make_key, running_api, seed_stream
from support.cli import flowcloud, run_flowcloud

from flowcloud.cli.main import main as cli_main
from flowcloud.redis_server import EmbeddedRedis, free_port
from flowcloud.settings import ApiSettings

ADMIN_KEY = "admin-key-for-the-redis-down-test"
ROUTES = [
    ("GET", "/streams"),
    ("GET", "/streams/cam-1"),
    ("GET", "/streams/cam-1/masks"),
    ("GET", "/streams/cam-1/masks/latest"),
    ("GET", "/streams/cam-1/masks/3?format=overlay"),
    ("GET", "/streams/cam-1/stats"),
    ("GET", "/streams/cam-1/live"),
    ("GET", "/devices"),
    ("POST", "/devices"),
    ("DELETE", "/devices/cam-1"),
]


def test_redis_down_answers_503_json_without_a_trace(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    try:
        seed_stream(server.url, "cam-1", "acme", count=5)
        reader = make_key(server.url, "reader", "acme")
        settings = ApiSettings(redis_url=server.url, admin_key=ADMIN_KEY, redis_timeout=1.0)
        with running_api(settings) as base, httpx.Client(base_url=base, timeout=10) as client:
            as_reader = {"Authorization": f"Bearer {reader}"}
            assert client.get("/streams/cam-1", headers=as_reader).status_code == 200
            server.stop()
            # The bootstrap admin key needs no Redis to authenticate, so each route reaches Redis.
            for method, path in ROUTES:
                body = {"device_id": "x", "tenant": "acme"} if method == "POST" else None
                response = client.request(
                    method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json=body
                )
                assert response.status_code == 503, (method, path, response.status_code, response.text)
                assert response.json() == {
                    "detail": "Redis is unavailable; try again shortly",
                    "error": "redis_unavailable",
                }
            # A stored key cannot be checked without Redis: 503 too, never a false 401.
            response = client.get("/streams", headers=as_reader)
            assert response.status_code == 503 and "Traceback" not in response.text
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()


def test_apikeys_cli_add_list_revoke(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One run through the entry point in its own process, the rest in this one.
    added = run_flowcloud(
        "apikeys", "--redis-url", redis_url, "add", "--role", "reader", "--tenant", "acme", "--json"
    )
    assert added.returncode == 0, added.stderr
    key = json.loads(added.stdout)
    assert key["role"] == "reader" and key["tenant"] == "acme" and key["token"].startswith("fck_")
    monkeypatch.setenv("FLOWCLOUD_REDIS_URL", redis_url)
    assert cli_main(["apikeys", "list", "--json"]) == 0
    listed = capsys.readouterr().out
    assert [k["key_id"] for k in json.loads(listed)] == [key["key_id"]]
    assert key["token"] not in listed
    assert cli_main(["apikeys", "--redis-url", redis_url, "list"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["ID", "ROLE", "TENANT", "CREATED", "REVOKED"]
    assert key["key_id"] in table
    assert cli_main(["apikeys", "--redis-url", redis_url, "revoke", key["key_id"]]) == 0
    assert capsys.readouterr().out.strip() == f"API key {key['key_id']} revoked"
    # The revoked token no longer opens the API.
    with running_api(ApiSettings(redis_url=redis_url)) as base:
        response = httpx.get(f"{base}/streams", headers={"Authorization": f"Bearer {key['token']}"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("revoke", "0123456789ab"), "flowcloud apikeys: API key '0123456789ab' does not exist"),
        (("add", "--role", "reader", "--tenant", "*"), "flowcloud apikeys: only an admin key may have"),
        (("add", "--role", "reader", "--tenant", "a b"), "flowcloud apikeys: invalid tenant 'a b'"),
    ],
)
def test_apikeys_cli_reports_bad_input_in_one_line(
    redis_url: str, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["apikeys", "--redis-url", redis_url, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


def test_apikeys_cli_without_redis_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert cli_main(["apikeys", "--redis-url", url, "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"flowcloud apikeys: cannot reach Redis at {url}")
    assert "Traceback" not in err


def test_flowcloud_api_serves_and_stops_on_sigterm(redis_url: str) -> None:
    port = free_port()
    process = subprocess.Popen(
        flowcloud("api", "--host", "127.0.0.1", "--port", str(port)),
        env={**os.environ, "FLOWCLOUD_REDIS_URL": redis_url, "FLOWCLOUD_API_ADMIN_KEY": ADMIN_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/streams", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                )
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "flowcloud api did not start"
                time.sleep(0.1)
        assert response.status_code == 200 and response.json() == {"items": []}
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
        # uvicorn drains, then re-raises the signal it caught so that the exit says why.
        assert process.returncode in (0, -signal.SIGTERM), output
        assert "Application shutdown complete" in output
        assert ADMIN_KEY not in output  # the secret is never logged
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_flowcloud_api_rejects_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["api", "--port", "70000"]) == 1
    assert capsys.readouterr().err.startswith("flowcloud api: invalid settings: port:")
