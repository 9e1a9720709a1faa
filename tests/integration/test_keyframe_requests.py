"""Keyframes on demand: a real gateway loses decodable state (its decoder process is killed, which
drops the access units in flight and restarts the decoder) and asks the real edge daemon for an
IDR; libx264 answers at once, so frames resume within about a frame interval plus the round trip,
not at the next natural keyframe (10 s away here)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from support.edge import SYNTHETIC_SHAPE, daemon_config
from support.frames import frames_on_redis
from support.gateway import gateway_settings, metric, register
from support.waiting import eventually

from edge.daemon import EdgeDaemon
from edge.sources import SyntheticSource
from services.gateway.server import Gateway

GOP = 300  # a natural keyframe every 10 s at 30 fps
FRAME = 1 / SYNTHETIC_SHAPE.fps
LOAD_MARGIN = 0.25  # encode, decode and scheduling on a shared 2-core machine


def requests_sent() -> float:
    """Keyframe requests the gateway sent (a crash drops the frames in flight, then restarts the
    decoder: the first of the two reasons asks, the second is within the rate limit)."""
    return sum(
        metric("flowcloud_gateway_keyframe_requests_total", reason=reason, outcome="sent")
        for reason in ("drop", "decoder_restart", "session_start")
    )


def test_a_decoder_restart_gets_an_idr_within_a_frame_interval(redis_url: str) -> None:
    async def main() -> None:
        token = await register(redis_url, "cam-1")
        async with Gateway(gateway_settings(redis_url)).listen(port=0) as gw:
            config = daemon_config(gw.port, token=token, keyframe_interval=GOP, duration=30.0)
            daemon = EdgeDaemon(config, SyntheticSource(SYNTHETIC_SHAPE))
            edge = asyncio.create_task(daemon.run())
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= 15, 20)
            sent = requests_sent()
            honoured = metric("flowcloud_edge_keyframe_requests_total", outcome="honoured")
            session = gw.sessions["cam-1"]
            pid = session.decoder_pid
            assert pid is not None
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)

            def resumed() -> bool:
                return any(f.recv_ts > killed_at + 0.01 for f in frames_on_redis(redis_url, "cam-1"))

            assert await eventually(resumed, 5)
            assert requests_sent() > sent
            assert metric("flowcloud_edge_keyframe_requests_total", outcome="honoured") > honoured
            # From the request to the IDR at the gateway: a frame interval and the round trip.
            answers = metric("flowcloud_gateway_keyframe_answer_seconds_count")
            total = metric("flowcloud_gateway_keyframe_answer_seconds_sum")
            assert answers >= 1
            rtt = metric("flowcloud_edge_rtt_seconds")
            assert total / answers < FRAME + rtt + LOAD_MARGIN
            daemon.source.stop()
            await asyncio.wait_for(edge, 15)

    asyncio.run(main())
