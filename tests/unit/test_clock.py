"""RedisClock against a real redis-server: the offset of a skewed local clock, and when it is measured."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from redis.asyncio import Redis as AsyncRedis

from flowcloud.clock import RedisClock


def test_offset_undoes_a_skewed_local_clock(redis_url: str) -> None:
    async def main() -> RedisClock:
        client = AsyncRedis.from_url(redis_url)
        clock = RedisClock(local=lambda: time.time() - 3600.0)  # this machine is an hour behind
        assert clock.now() == pytest.approx(time.time() - 3600.0, abs=0.1)  # not measured yet
        assert math.isinf(clock.uncertainty)
        await clock.sync(client)
        await client.aclose()
        return clock

    clock = asyncio.run(main())
    # redis-server runs on this machine, so its clock is time.time()'s.
    assert clock.offset == pytest.approx(3600.0, abs=0.05)
    assert clock.now() == pytest.approx(time.time(), abs=0.05)
    assert 0 <= clock.uncertainty < 0.05


def test_sync_if_due_measures_once_per_interval(redis_url: str) -> None:
    skew = [0.0]

    async def main() -> list[float]:
        client = AsyncRedis.from_url(redis_url)
        clock = RedisClock(resync_every=0.2, local=lambda: time.time() + skew[0])
        offsets = []
        await clock.sync_if_due(client)
        offsets.append(clock.offset)
        skew[0] = 10.0  # the local clock jumps: seen only at the next measurement
        await clock.sync_if_due(client)
        offsets.append(clock.offset)
        await asyncio.sleep(0.25)
        await clock.sync_if_due(client)
        offsets.append(clock.offset)
        await client.aclose()
        return offsets

    first, too_soon, due = asyncio.run(main())
    assert first == pytest.approx(0.0, abs=0.05)
    assert too_soon == first
    assert due == pytest.approx(-10.0, abs=0.05)
