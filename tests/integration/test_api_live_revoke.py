"""A revoked API key stops watching: an open /live view (SSE or MJPEG) of a real `flowcloud api`
process ends within a second of `flowcloud apikeys revoke`, and new requests with the key get 401."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from support.api import api_process, make_key, seed_stream
from support.cli import run_flowcloud

REVOCATION_DEADLINE = 1.0  # the product's promise: revocation ends live views within a second


@pytest.mark.parametrize("fmt", ["sse", "mjpeg"])
def test_revoking_a_key_ends_its_open_live_views(redis_url: str, tmp_path: Path, fmt: str) -> None:
    seed_stream(redis_url, "cam-live", "alpha", count=5)
    token = make_key(redis_url, "reader", "alpha")
    other = make_key(redis_url, "reader", "alpha")  # a second key of the tenant keeps watching
    key_id = token.removeprefix("fck_").split(".")[0]
    env = {"FLOWCLOUD_REDIS_URL": redis_url, "FLOWCLOUD_API_AUTH_CACHE_SECONDS": "30"}
    first_image = b"event: mask" if fmt == "sse" else b"Content-Type: image/jpeg"
    with (
        api_process(tmp_path / "api.log", env) as base,
        httpx.Client(
            base_url=base,
            timeout=httpx.Timeout(30, read=5),  # a view that does not end fails in 5 s
        ) as client,
    ):
        url = f"/streams/cam-live/live?format={fmt}"
        views = {
            name: client.send(
                client.build_request("GET", url, headers={"Authorization": f"Bearer {t}"}), stream=True
            )
            for name, t in (("revoked", token), ("other", other))
        }
        try:
            chunks = {name: view.iter_raw() for name, view in views.items()}
            for name, view in views.items():
                assert view.status_code == 200, (name, view.status_code)
                seen = b""
                while first_image not in seen:  # the tenant's picture arrives
                    seen += next(chunks[name])

            revoked = run_flowcloud("apikeys", "revoke", key_id, env={"FLOWCLOUD_REDIS_URL": redis_url})
            assert revoked.returncode == 0, revoked.stderr
            start = time.monotonic()
            tail = b"".join(chunks["revoked"])  # to the end of the response: the server closed it
            ended_after = time.monotonic() - start
            assert ended_after < REVOCATION_DEADLINE, (
                f"the live view ran {ended_after:.2f} s after revocation"
            )
            if fmt == "sse":
                assert b'"error":"key_revoked"' in tail
            # The tenant's other key still watches: a new result reaches its view.
            seed_stream(redis_url, "cam-live", "alpha", count=7)
            newest = b'"seq":6' if fmt == "sse" else b"X-Frame-Seq: 6"
            seen = b""
            while newest not in seen:
                seen += next(chunks["other"])
        finally:
            for view in views.values():
                view.close()

        # The key is refused from now on, although the API would trust a cached key for 30 s.
        again = client.get("/streams", headers={"Authorization": f"Bearer {token}"})
        assert again.status_code == 401
        assert client.get("/streams", headers={"Authorization": f"Bearer {other}"}).status_code == 200
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {other}"}).text
        assert "flowcloud_api_live_revoked_total 1.0" in metrics
