"""The offline story end to end, in one chain: a real edge daemon (synthetic source, libx264, spool,
the bundled fallback model), a real gateway, a real `flowcloud worker` process with the bundled
demo model, redis-server and the API. The gateway stops mid-stream for a few seconds (the 20 s
outage is the bench's): the edge segments on its own, then, reconnected, its masks appear through
the API as ``producer: edge``, every frame captured during the outage reaches Redis in capture
order once, and the cloud's results follow for the backfilled frames, beside the edge's masks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import redis
from support.api import make_key, running_api
from support.edge import streaming_edge_with_fallback
from support.frames import frames_on_redis
from support.gateway import gateway_settings, register
from support.waiting import eventually, wait_for
from support.worker import results_of, running_worker

from edge.frames import StreamShape
from flowcloud.settings import ApiSettings
from flowcloud.zoo import DEMO_WEIGHTS
from services.gateway.server import Gateway

pytestmark = pytest.mark.slow
OUTAGE = 3.0
SHAPE = StreamShape(96, 64, 10.0)  # 10 fps: the CPU worker segments the backfill in seconds


def test_outage_fallback_masks_backfill_and_cloud_results_in_one_chain(
    tmp_path: Path, redis_url: str
) -> None:
    spool_dir = tmp_path / "spool"
    client = redis.Redis.from_url(redis_url)

    async def outage_and_back() -> tuple[int, int]:
        token = await register(redis_url, "cam-1")
        settings = gateway_settings(redis_url)
        async with Gateway(settings).listen(port=0) as gw:
            port = gw.port
            daemon, edge = await streaming_edge_with_fallback(
                redis_url, port, token, spool_dir, SHAPE, 120.0, 30
            )
            sender = daemon._sender
            assert sender is not None and sender.live
        # The gateway is gone: the edge spools, and after 0.3 s segments pictures itself.
        assert await eventually(lambda: not sender.live, 10, step=0.005)
        captured_at_stop = daemon.captured
        await asyncio.sleep(OUTAGE)
        runner = daemon.fallback
        assert runner is not None and await eventually(lambda: runner.made >= 2, 20)
        async with Gateway(settings).listen(port=port):
            captured_at_restart = daemon.captured
            spool = daemon.spool
            assert spool is not None

            def synced() -> bool:
                backfilled = frames_on_redis(redis_url, "cam-1", backfill=True)
                return (
                    spool.frames == 0 and bool(backfilled) and not list((spool_dir / "masks").glob("*.json"))
                )

            assert await eventually(synced, 60)
            daemon.source.stop()
            await asyncio.wait_for(edge, 15)
        return captured_at_restart - captured_at_stop, runner.made

    with running_worker(redis_url, DEMO_WEIGHTS, "w1", tmp_path, "--batch-size", "4") as worker:
        during, made = asyncio.run(outage_and_back())
        # Every frame captured in the outage reached Redis (but the one or two before the spool's
        # first IDR), with its capture time, once; by seq, the timeline is in capture order.
        live = frames_on_redis(redis_url, "cam-1")
        backfill = frames_on_redis(redis_url, "cam-1", backfill=True)
        first_live = min(f.capture_ts for f in live)
        outage = [f for f in backfill if f.capture_ts > first_live]  # (not the start-up's)
        assert len(outage) >= during - 3
        captures = [round(f.capture_ts, 4) for f in live + backfill]
        assert len(captures) == len(set(captures))
        timeline = sorted(live + backfill, key=lambda f: f.seq)
        assert [f.capture_ts for f in timeline] == sorted(f.capture_ts for f in timeline)
        # The cloud's results follow for every backfilled frame, marked as such.
        spooled = {f.seq for f in backfill}

        def segmented() -> bool:
            return spooled <= {r.seq for r in results_of(client, "cam-1") if r.backfill}

        wait_for("cloud results for the backfilled frames", segmented, 180, worker)
        assert worker.stop() == 0
    cloud = [r for r in results_of(client, "cam-1") if r.backfill]
    client.close()
    # Through the API: the edge's masks, marked, beside the cloud's results for the same frames.
    key = make_key(redis_url, "reader", "acme")
    with (
        running_api(ApiSettings(redis_url=redis_url)) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10) as api,
    ):
        edge_masks = api.get("/streams/cam-1/edge-masks", params={"limit": 100}).json()["items"]
        assert len(edge_masks) >= made
        assert {(m["producer"], m["model"]) for m in edge_masks} == {("edge", "small_unet")}
        # (each connection maps edge times with its own clock sync: they agree within its error,
        # well under the 100 ms between frames)
        same_frame = [(m, r) for m in edge_masks for r in cloud if abs(m["capture_ts"] - r.capture_ts) < 0.04]
        assert same_frame, "an edge-made mask and the cloud's result for the same frame, side by side"
        for _edge_mask, result in same_frame:
            body = api.get(f"/streams/cam-1/masks/{result.seq}", params={"format": "json"}).json()
            assert (body["producer"], body["backfill"]) == ("cloud", True)
