"""`flowcloud gateway` as a real process: metrics served, SIGTERM drains the live session (every
frame it received is published) and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request

import redis
from support.cli import flowcloud
from support.frames import frames_on_redis
from support.gateway import FPS, connect, libx264_access_units, register, rtp_packets
from support.waiting import wait_listening

from flowcloud import keys
from flowcloud.redis_server import free_port

FRAMES = 30
T0 = 1_764_200_000.0


def test_gateway_process_metrics_and_sigterm_drain(redis_url: str) -> None:
    port, metrics_port = free_port(), free_port()
    packets = rtp_packets(libx264_access_units(FRAMES), T0)
    env = {**os.environ, "FLOWCLOUD_GATEWAY_MODEL_SIZE": "64x96", "FLOWCLOUD_GATEWAY_HOST": "127.0.0.1"}
    cmd = flowcloud(
        "gateway", "--redis-url", redis_url, "--port", str(port), "--metrics-port", str(metrics_port)
    )
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(port)

        async def main() -> None:
            token = await register(redis_url, "cli-cam")
            edge = await connect(port, "cli-cam", token)
            await edge.send(packets, fps=2 * FPS)
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
            assert "flowcloud_gateway_sessions 1.0" in body
            # SIGTERM while the edge is still connected: the gateway drains and closes it.
            process.send_signal(signal.SIGTERM)
            assert await edge.closed_by_gateway(timeout=10)

        asyncio.run(main())
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "stopping: no new connections" in output and "gateway stopped" in output
    frames = frames_on_redis(redis_url, "cli-cam")
    assert [f.seq for f in frames] == list(range(1, FRAMES + 1))
    assert (frames[0].width, frames[0].height) == (96, 64)
    meta = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(keys.stream_meta("cli-cam"))
    assert meta[keys.M_STATUS] == keys.STATUS_IDLE
    assert time.time() - float(meta[keys.M_LAST_SEEN]) < 60
