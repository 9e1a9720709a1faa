"""The sharded frame path on a real 3-master Redis Cluster (issue 14, item 1): the gateway's
publisher and a worker, both through cluster clients, with 3 frame shards (shard i on master
i mod 3). Every frame of streams on every shard is segmented, its bytes written once (to its
stream's frame log, on its stream's master), and a stale session's frames are fenced off."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis
from support.waiting import eventually
from support.worker import frame

from flowcloud import keys
from flowcloud.frame_queue import FrameQueue, live_queues
from flowcloud.frames import Frame
from flowcloud.redis_client import connect_async
from flowcloud.settings import WorkerSettings
from services.gateway.publisher import UNASSIGNED_SEQ, FramePublisher
from services.worker.consumer import Worker

pytestmark = pytest.mark.slow

SHARDS = 3
PER_STREAM = 6


def streams_on_every_shard() -> list[str]:
    """One stream id per shard (by `keys.shard_of`)."""
    names: dict[int, str] = {}
    i = 0
    while len(names) < SHARDS:
        names.setdefault(keys.shard_of(f"cam-{i}", SHARDS), f"cam-{i}")
        i += 1
    return [names[shard] for shard in range(SHARDS)]


async def results(redis: Redis, stream: str) -> int:
    return int(await redis.zcard(keys.mask_index(stream)))


def test_frames_of_every_shard_reach_a_worker_through_a_cluster(
    redis_cluster_url: str, redis_url: str, weights: Path
) -> None:
    names = streams_on_every_shard()
    settings = WorkerSettings(
        redis_url=redis_cluster_url,
        redis_cluster=True,
        control_redis_url=redis_url,  # the control plane stays on a plain Redis (unused by a worker)
        frame_shards=SHARDS,
        weights=str(weights),
        metrics_port=0,
        mode="complete",
        batch_size=4,
        batch_timeout_ms=20,
        warmup_size="48x64",
        threads=1,
        decode_threads=1,
        poll_ms=200,
    )

    async def main() -> None:
        redis = connect_async(redis_cluster_url, cluster=True)
        stale = names[0]
        await redis.hset(keys.stream_meta(stale), keys.M_GENERATION, 7)
        publisher = FramePublisher(redis, 1000, shards=SHARDS)
        publisher.start()
        sent = {name: [frame(name, UNASSIGNED_SEQ, 48, 64) for _ in range(PER_STREAM)] for name in names}
        for name in names:
            for f in sent[name]:
                publisher.submit(dataclasses.replace(f, generation=7 if name == stale else 0))
        fenced = [dataclasses.replace(frame(stale, UNASSIGNED_SEQ, 48, 64), generation=6) for _ in range(3)]
        for f in fenced:
            publisher.submit(f)
        await publisher.close(30.0)
        assert publisher.published == SHARDS * PER_STREAM  # the 3 of generation 6 fenced off

        for shard, queue in enumerate(live_queues(SHARDS)):
            assert await FrameQueue(redis, queue).unread() == PER_STREAM, f"shard {shard}"
        for name in names:
            logged = cast(
                list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.stream_frames(name))
            )
            assert [Frame.from_fields(fields).data for _, fields in logged] == [f.data for f in sent[name]]

        worker = Worker(settings, redis)
        await worker.start()
        serving = asyncio.create_task(worker.serve())

        async def all_segmented() -> bool:
            return all([await results(redis, name) == PER_STREAM for name in names])

        done = await eventually(all_segmented, 120)
        worker.request_stop()
        assert await serving == 0
        assert done, "not every shard's frames were segmented"
        for queue in live_queues(SHARDS):
            assert await FrameQueue(redis, queue).unread() == 0
            assert (await redis.xpending(queue, keys.WORKER_GROUP))["pending"] == 0
        await worker.close()  # closes the client

    asyncio.run(main())
