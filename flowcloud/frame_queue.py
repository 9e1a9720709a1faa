"""A shard queue of frame references: its consumer group, its bound, and how much is left to read.

Gateways append a reference to each frame (flowcloud.frame_log) to the queue of its stream's
shard, ``keys.frame_shard(i)``; workers read every shard through the consumer group
``keys.WORKER_GROUP``. Each queue is bounded, so trimming can remove references no worker has read.
Redis's own MAXLEN trimming does that silently, and on Redis 7.0 it also corrupts the group's
lag: the group's read counter never learns of the skipped entries, so XINFO GROUPS reports them
as unread for good (the worker's lag gauge and KEDA's scaler then see a backlog that is not there).

So the gateway trims with `FrameQueue.trim` (flowcloud.bounded_stream: one Lua script, atomic with
respect to every worker's XREADGROUP), which creates the group at id 0 if it is missing, so that
every frame is accounted from the first, trims delivered references first, and returns each unread
one it had to remove for the gateway to count and log, keeping the group's lag exact.
`FrameQueue.unread` is the one definition of a worker's lag (summed over the shards). The backfill
lanes, ``keys.backfill_shard(i)`` (same group name), are bounded the same way.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from flowcloud import groups, keys
from flowcloud.bounded_stream import BoundedStream

log = logging.getLogger(__name__)


def live_queues(shards: int) -> list[str]:
    """The live shard queues of ``shards`` shards."""
    return [keys.frame_shard(shard) for shard in range(shards)]


def backfill_queues(shards: int) -> list[str]:
    """The backfill lanes of ``shards`` shards."""
    return [keys.backfill_shard(shard) for shard in range(shards)]


async def ensure_group(redis: Redis, queue: str) -> None:
    """Create the workers' consumer group (and the queue) unless it exists."""
    if await groups.ensure_group(redis, queue, keys.WORKER_GROUP, "0"):
        log.info("created consumer group %s on %s", keys.WORKER_GROUP, queue)


async def ensure_groups(redis: Redis, shards: int) -> None:
    """The workers' group on every live shard queue (one command each: each its own slot)."""
    for queue in live_queues(shards):
        await ensure_group(redis, queue)


class FrameQueue(BoundedStream):
    """A shard queue and its workers' group (see the module's docstring)."""

    def __init__(self, redis: Redis, stream: str) -> None:
        super().__init__(redis, stream, keys.WORKER_GROUP, (keys.F_STREAM, keys.F_SEQ), create_group=True)
