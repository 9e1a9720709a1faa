"""The backfill lane: frames an edge spooled during an outage, read only with spare capacity.

Edges send spooled video after a reconnect; the gateway publishes it to
`keys.BACKFILL_FRAMES_STREAM` (same consumer group name). A worker tops up a live batch that has
room with backfill frames, up to half a batch, so real-time work never waits on them; they are
processed in ``complete`` mode (never dropped for age) and their results are marked ``backfill``.
Entries a dead worker left pending are taken over after `CLAIM_IDLE_MS`.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from flowcloud import keys

from .recovery import Entry, parse_entries

log = logging.getLogger(__name__)

CLAIM_IDLE_MS = 30_000


class BackfillLane:
    def __init__(self, redis: Redis, consumer: str) -> None:
        self.redis = redis
        self.consumer = consumer
        self._grouped = False

    async def read(self, count: int) -> list[Entry]:
        """Up to ``count`` backfill frames, without waiting: idle pending ones first, then new ones."""
        if count < 1:
            return []
        try:
            return await self._read(count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._grouped = False
            return []

    async def _read(self, count: int) -> list[Entry]:
        stream = keys.BACKFILL_FRAMES_STREAM
        if not self._grouped:
            try:
                await self.redis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._grouped = True
        claimed = await self.redis.xautoclaim(
            stream, keys.WORKER_GROUP, self.consumer, CLAIM_IDLE_MS, count=count
        )
        raw = claimed[1]
        if not raw:
            reply = await self.redis.xreadgroup(keys.WORKER_GROUP, self.consumer, {stream: ">"}, count=count)
            if not reply:
                return []
            raw = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        entries = parse_entries(raw)
        for entry in entries:
            entry.stream = stream
        return entries
