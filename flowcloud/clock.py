"""Redis's clock, read through this machine's: the one clock all FlowCloud services share.

Every service runs on its own machine with its own clock, and they have only Redis in common.
A worker that compares its own clock with a timestamp written on the gateway's machine silently
assumes that both clocks are synchronized. A worker whose clock runs 5 s fast then drops every
frame as stale, and one that runs slow never drops any. So times that travel between services
are on Redis's clock:
- the gateway publishes capture, receipt and last-seen times shifted by its offset;
- the workers judge frame ages and stamp results with ``now()``.

`RedisClock` measures the offset of Redis's clock (the TIME command) from the local clock. It
keeps the sample with the shortest round trip, whose error is at most half that round trip, and
measures again every ``resync_every`` seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import Gauge
from redis.asyncio import Redis

from flowcloud.protocol.handshake import clock_offset


class RedisClock:
    def __init__(
        self,
        resync_every: float = 30.0,
        local: Callable[[], float] = time.time,
        gauge: Gauge | None = None,
    ) -> None:
        self.resync_every = resync_every
        self._local = local  # unix seconds on this machine's clock
        self._gauge = gauge  # a service's clock-offset metric, set at each measurement
        self.offset = 0.0  # Redis's clock minus the local one, in seconds
        self.uncertainty = math.inf  # half the round trip of the kept sample (inf: never measured)
        self._synced_at: float | None = None  # time.monotonic() of the last measurement

    def now(self) -> float:
        """Redis's current time, in unix seconds (the local time until the first `sync`)."""
        return self._local() + self.offset

    async def sync(self, redis: Redis, samples: int = 3) -> None:
        """Measure the offset: the TIME sample with the shortest round trip of ``samples``."""
        best: tuple[float, float] | None = None
        for _ in range(samples):
            before = self._local()
            seconds, microseconds = await redis.time()
            after = self._local()
            redis_time = seconds + microseconds / 1e6
            offset, rtt = clock_offset(before, redis_time, redis_time, after)  # NTP, as at the handshake
            if best is None or rtt < best[1]:
                best = (offset, rtt)
        assert best is not None
        self.offset, self.uncertainty = best[0], best[1] / 2
        self._synced_at = time.monotonic()
        if self._gauge is not None:
            self._gauge.set(self.offset)

    async def sync_if_due(self, redis: Redis) -> None:
        """`sync` when never measured or measured more than ``resync_every`` seconds ago."""
        if self._synced_at is None or time.monotonic() - self._synced_at >= self.resync_every:
            await self.sync(redis)
