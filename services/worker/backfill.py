"""The backfill lane: frames an edge spooled during an outage, read only with spare capacity.

Edges send spooled video after a reconnect; the gateway writes it to the stream's backfill log and
a reference to the shard's backfill lane, `keys.backfill_shard(i)` (same consumer group name). A
worker tops up a live batch that has room with backfill frames, up to half a batch, so real-time
work never waits on them; they are processed in ``complete`` mode (never dropped for age) and their
results are marked ``backfill``. The lanes are read without blocking, starting at a shard that
rotates from one read to the next, so that no lane starves another. Entries a dead worker left
pending are taken over after `CLAIM_IDLE_MS`.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from flowcloud import keys
from flowcloud.frame_queue import backfill_queues, ensure_group

from .recovery import Entry, count_trimmed_pending, load_entries

log = logging.getLogger(__name__)

CLAIM_IDLE_MS = 30_000


class BackfillLane:
    def __init__(self, redis: Redis, consumer: str, shards: int = 1) -> None:
        self.redis = redis
        self.consumer = consumer
        self.queues = backfill_queues(shards)
        self._grouped: set[str] = set()
        self._next = 0  # the lane the next read starts at

    async def read(self, count: int) -> list[Entry]:
        """Up to ``count`` backfill frames, without waiting: idle pending ones first, then new ones."""
        entries: list[Entry] = []
        start, self._next = self._next, (self._next + 1) % len(self.queues)
        for i in range(len(self.queues)):
            if len(entries) >= count:
                break
            queue = self.queues[(start + i) % len(self.queues)]
            try:
                entries += await self._read(queue, count - len(entries))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._grouped.discard(queue)
        return entries

    async def _read(self, queue: str, count: int) -> list[Entry]:
        if queue not in self._grouped:
            await ensure_group(self.redis, queue)
            self._grouped.add(queue)
        claimed = await self.redis.xautoclaim(
            queue, keys.WORKER_GROUP, self.consumer, CLAIM_IDLE_MS, count=count
        )
        count_trimmed_pending(queue, claimed)
        raw = claimed[1]
        if not raw:
            reply = await self.redis.xreadgroup(keys.WORKER_GROUP, self.consumer, {queue: ">"}, count=count)
            if not reply:
                return []
            raw = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return await load_entries(self.redis, queue, raw)
