"""A worker's visible state: the heartbeat hash the API reads, and the consumer-group gauges (the lag
and pending counts of every shard queue, and their sums)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flowcloud import keys
from flowcloud.clock import RedisClock
from flowcloud.frame_queue import FrameQueue, live_queues
from flowcloud.replies import text, text_keys
from flowcloud.workers import WorkerHeartbeat

from . import metrics

log = logging.getLogger(__name__)

LOADING, WARMING, READY, DRAINING = (
    keys.WORKER_LOADING,
    keys.WORKER_WARMING,
    keys.WORKER_READY,
    keys.WORKER_DRAINING,
)
INDEX_HORIZON = 3600.0  # workers silent this long leave the index (their hashes expired long before)


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Heartbeat:
    """Writes ``keys.worker(name)`` (a hash with a TTL) and scores ``keys.WORKERS_INDEX``."""

    redis: Redis
    name: str
    interval: float
    static: Mapping[str, str | int | float]
    state: str = LOADING
    stats: dict[str, str | int | float] = field(default_factory=dict)
    clock: RedisClock = field(default_factory=RedisClock)
    shards: int = 1  # the live shard queues it reads (keys.frame_shard(i) for i < shards)

    @property
    def ttl(self) -> int:
        return max(2, int(self.interval * 3 + 0.999))

    async def beat(self) -> None:
        """One heartbeat plus the group's lag and pending counts; Redis errors are logged, not raised."""
        try:
            await self.clock.sync_if_due(self.redis)
            now = self.clock.now()  # on Redis's clock, as the API compares it
            beat = WorkerHeartbeat.from_fields({**self.static, **self.stats})
            beat.state, beat.heartbeat = self.state, now
            fields = beat.to_fields()
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(keys.worker(self.name), mapping=fields)  # type: ignore[arg-type]
            pipe.expire(keys.worker(self.name), self.ttl)
            pipe.zadd(keys.WORKERS_INDEX, {self.name: now})
            pipe.zremrangebyscore(keys.WORKERS_INDEX, "-inf", now - INDEX_HORIZON)
            await pipe.execute()
            await self._group_gauges()
        except RedisError as exc:
            log.debug("heartbeat failed: %s", exc)

    async def _group_gauges(self) -> None:
        lag_total = pending_total = 0
        for shard, queue in enumerate(live_queues(self.shards)):
            # The lag from FrameQueue, not XINFO GROUPS: Redis 7.0 counts trimmed entries as unread forever.
            lag = await FrameQueue(self.redis, queue).unread()
            metrics.SHARD_LAG.labels(str(shard)).set(lag)
            lag_total += lag
            try:
                groups = await self.redis.xinfo_groups(queue)
            except RedisError:
                continue  # no queue yet
            for group in groups:
                info = text_keys(group)
                if text(info.get("name")) == keys.WORKER_GROUP:
                    pending_total += int(info.get("pending") or 0)
        metrics.CONSUMER_LAG.set(lag_total)
        metrics.PENDING.set(pending_total)

    async def leave(self) -> None:
        """Remove this worker from the index, and from each queue's group where it holds no pending
        frames."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(keys.worker(self.name))
            pipe.zrem(keys.WORKERS_INDEX, self.name)
            await pipe.execute()
            for queue in live_queues(self.shards):
                if not await self.redis.exists(queue):
                    continue
                mine = await self.redis.xpending_range(
                    queue, keys.WORKER_GROUP, min="-", max="+", count=1, consumername=self.name
                )
                if not mine:
                    await self.redis.xgroup_delconsumer(queue, keys.WORKER_GROUP, self.name)
        except RedisError as exc:
            log.warning("could not deregister worker %s: %s", self.name, exc)
