"""The control plane (devices, API keys) lives apart from the frames: a frames Redis restarted
empty, without persistence, forgets frames and results but no device and no key. Devices and keys
are made with the real CLI, a real gateway and a real API read them, and revocation events travel
on the control-plane Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import redis
from support.api import running_api
from support.cli import run_flowcloud
from support.frames import frames_on_redis
from support.gateway import connect, gateway_settings, libx264_access_units, rtp_packets, session_ended
from support.waiting import eventually

from flowcloud import keys
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.settings import ApiSettings
from services.gateway.server import Gateway

T0 = 1_764_200_000.0


def _cli_json(env: dict[str, str], *args: str) -> dict[str, str]:
    done = run_flowcloud(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    out: dict[str, str] = json.loads(done.stdout)
    return out


def test_devices_and_keys_survive_an_empty_restart_of_the_frames_redis(tmp_path: Path) -> None:
    frames = EmbeddedRedis(tmp_path / "frames", appendonly=False).start()
    control = EmbeddedRedis(tmp_path / "control", appendonly=True).start()
    env = {"FLOWCLOUD_REDIS_URL": frames.url, "FLOWCLOUD_CONTROL_REDIS_URL": control.url}
    packets = rtp_packets(libx264_access_units(20, gop=10), T0)

    async def stream_once(gw: Gateway, token: str) -> None:
        edge = await connect(gw.port, "cam", token)  # a refusal (unknown_device) raises here
        await edge.send(packets, fps=0)
        assert await eventually(lambda: len(frames_on_redis(frames.url, "cam")) >= 5, 20)
        await edge.close()
        assert await session_ended(gw, "cam")

    try:
        token = _cli_json(env, "devices", "add", "cam")["token"]
        api_token = _cli_json(env, "apikeys", "add", "--role", "reader", "--tenant", "default")["token"]
        # Nothing of the control plane is in the frames Redis.
        assert redis.Redis.from_url(frames.url).keys(f"{keys.PREFIX}:*") == []

        async def main() -> None:
            nonlocal frames
            async with Gateway(gateway_settings(frames.url, control_redis_url=control.url)).listen(
                port=0
            ) as gw:
                await stream_once(gw, token)
                # The frames Redis restarts empty (no persistence): frames and stream state are gone...
                frames.stop()
                frames = EmbeddedRedis(tmp_path / "frames-again", port=frames.port, appendonly=False).start()
                assert frames_on_redis(frames.url, "cam") == []
                # ...and the device is still accepted, its frames published again.
                await stream_once(gw, token)
                # Revocation events travel on the control-plane Redis to the gateway.
                edge = await connect(gw.port, "cam", token)
                revoked = run_flowcloud("devices", "revoke", "cam", env=env)
                assert revoked.returncode == 0, revoked.stderr
                assert await edge.closed_by_gateway(timeout=5)

        asyncio.run(main())

        # The API finds the key in the control plane and the stream in the restarted frames Redis.
        settings = ApiSettings(redis_url=frames.url, control_redis_url=control.url)
        with running_api(settings) as base:
            listed = httpx.get(f"{base}/streams", headers={"Authorization": f"Bearer {api_token}"})
            assert listed.status_code == 200, listed.text
            assert [s["stream_id"] for s in listed.json()["items"]] == ["cam"]
            assert httpx.get(f"{base}/readyz").json()["redis"] is True
            control.stop()  # no key can be checked: the API is not ready
            assert httpx.get(f"{base}/readyz").status_code == 503
    finally:
        frames.stop()
        control.stop()
