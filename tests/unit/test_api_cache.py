"""The API's short-lived single-flight cache: one read for concurrent callers, expiry, no caching
of failures, and ttl 0 reading every time."""

from __future__ import annotations

import asyncio

import pytest

from services.api.cache import TtlCache


class SlowSource:
    """A loader that takes ``delay`` seconds and counts its reads: it returns the count, or fails
    with ``ConnectionError(failure)`` when given one."""

    def __init__(self, delay: float, failure: str | None = None) -> None:
        self.delay = delay
        self.failure = failure
        self.reads = 0

    async def load(self) -> int:
        self.reads += 1
        await asyncio.sleep(self.delay)
        if self.failure is not None:
            raise ConnectionError(self.failure)
        return self.reads


def test_concurrent_callers_share_one_read_and_the_value_expires() -> None:
    source = SlowSource(0.05)
    load = source.load

    async def scenario() -> None:
        cache: TtlCache[str, int] = TtlCache(ttl=0.2)
        values = await asyncio.gather(*(cache.get("s", load) for _ in range(20)))
        assert values == [1] * 20 and source.reads == 1
        assert await cache.get("s", load) == 1 and source.reads == 1  # still fresh
        await asyncio.sleep(0.25)
        assert await cache.get("s", load) == 2 and source.reads == 2  # expired: read again
        assert await cache.get("other", load) == 3  # keys are independent
        cache.forget("s")
        assert await cache.get("s", load) == 4

    asyncio.run(scenario())


def test_a_failed_read_reaches_every_waiter_and_is_not_cached() -> None:
    source = SlowSource(0.02, failure="redis down")
    failing = source.load

    async def scenario() -> None:
        cache: TtlCache[str, int] = TtlCache(ttl=10)
        results = await asyncio.gather(*(cache.get("s", failing) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results) and source.reads == 1
        with pytest.raises(ConnectionError):
            await cache.get("s", failing)
        assert source.reads == 2

    asyncio.run(scenario())


def test_ttl_zero_reads_every_time_and_capacity_bounds_the_cache() -> None:
    async def scenario() -> None:
        counter = iter(range(100))

        async def load() -> int:
            return next(counter)

        off: TtlCache[str, int] = TtlCache(ttl=0)
        assert [await off.get("s", load) for _ in range(3)] == [0, 1, 2]
        small: TtlCache[int, int] = TtlCache(ttl=60, capacity=4)
        for key in range(10):
            await small.get(key, load)
        assert len(small._items) <= 4

    asyncio.run(scenario())
