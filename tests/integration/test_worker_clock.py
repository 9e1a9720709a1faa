"""A worker whose machine's clock is off by a minute still judges frame ages right: ages are taken
on Redis's clock (stream entry ids) plus the capture-to-receipt time the gateway measured."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from worker_support import frame, pending_total, publish, result_count

from flowcloud import keys
from flowcloud.clock import RedisClock
from flowcloud.settings import WorkerSettings
from services.worker.consumer import Worker
from services.worker.recovery import ensure_group


@pytest.mark.parametrize("skew", [60.0, -60.0])
def test_frame_ages_do_not_depend_on_the_worker_clock(redis_url: str, skew: float) -> None:
    settings = WorkerSettings(
        redis_url=redis_url,
        metrics_port=0,
        batch_size=4,
        max_frame_age=1.0,
        warmup_size="32x64",
        decode_threads=1,
    )
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    fresh = [frame("cam-clock", seq, 32, 64) for seq in (1, 2, 3)]
    slow = frame("cam-clock", 4, 32, 64, capture_ts=now - 5.0)  # 5 s from capture to the gateway
    assert slow.recv_ts - slow.capture_ts > 4.9

    async def main() -> Worker:
        aclient = AsyncRedis.from_url(redis_url)
        await ensure_group(aclient)
        clock = RedisClock(local=lambda: time.time() + skew)  # this machine's clock is off
        worker = Worker(settings, aclient, clock=clock)
        await worker.start()
        publish(client, [*fresh, slow])
        serving = asyncio.create_task(worker.serve())
        deadline = time.monotonic() + 60
        while result_count(client, "cam-clock") < 3 or pending_total(client):
            assert time.monotonic() < deadline, "the worker did not finish the frames"
            await asyncio.sleep(0.05)
        worker.request_stop()
        await serving
        await worker.close()
        await aclient.aclose()
        return worker

    worker = asyncio.run(main())
    assert worker.clock.offset == pytest.approx(-skew, abs=0.5)
    assert result_count(client, "cam-clock") == 3  # the fresh ones, whatever the worker's clock says
    assert not client.exists(keys.mask("cam-clock", 4))  # the slow one was dropped as stale
    assert pending_total(client) == 0
    client.close()
