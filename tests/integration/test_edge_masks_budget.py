"""Masks the edge made offline count against their tenant's memory budget, as the cloud's results
do: the gateway's receiver stores them through a budgeted MaskStore on a real redis-server, and the
tenant's oldest results, of either kind, go first."""

from __future__ import annotations

import asyncio
from typing import cast

from redis.asyncio import Redis
from support.api import describe_stream, share_result

from flowcloud import keys
from flowcloud.protocol.edge_mask import EdgeMask
from flowcloud.protocol.framing import frame
from flowcloud.results import EVICTED, MaskStore
from services.gateway.edge_masks import receive_edge_masks

START = 1_700_000_000.0


def edge_mask(capture_time: float) -> EdgeMask:
    made = share_result("cam-1", 0, capture_time, 0.2)
    return EdgeMask(
        capture_time, "small_unet", "demo-1", made.label_set, made.width, made.height, 0.5, made.shares,
        made.labels_png,
    )  # fmt: skip


async def received(store: MaskStore, masks: list[EdgeMask]) -> int:
    """What the gateway stores of a masks connection carrying ``masks`` (then closed by the edge)."""
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(frame(m.to_bytes()) for m in masks))
    reader.feed_eof()
    return await receive_edge_masks(reader, "cam-1", 0.0, store, 0.0)


async def stored_bytes(redis: Redis) -> tuple[dict[int, int], dict[int, int]]:
    """(seq -> bytes of cloud results, capture µs -> bytes of edge masks) that cam-1 holds."""
    out: list[dict[int, int]] = []
    for index, key in (
        (keys.mask_index("cam-1"), keys.mask),
        (keys.edge_mask_index("cam-1"), keys.edge_mask),
    ):
        ids = [int(m) for m in cast(list[bytes], await redis.zrange(index, 0, -1))]
        pipe = redis.pipeline(transaction=False)
        for i in ids:
            pipe.hstrlen(key("cam-1", i), "meta")
            pipe.hstrlen(key("cam-1", i), "labels_png")
        sizes = await pipe.execute()
        out.append({i: int(m) + int(p) for i, m, p in zip(ids, sizes[0::2], sizes[1::2], strict=True) if m})
    return out[0], out[1]


def test_edge_masks_count_against_the_tenant_budget_oldest_first(redis_url: str) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        await describe_stream(redis, "cam-1", "acme", START)
        cloud = [share_result("cam-1", seq, START + seq, 0.1) for seq in range(20)]
        one = sum(len(v) for v in cloud[0].to_fields().values())
        budget = 30 * one
        store = MaskStore(redis, tenant_max_bytes=budget)
        await store.put_many(cloud)
        evicted_before = EVICTED.labels("memory")._value.get()
        # After an outage, 40 masks the edge made (captured after the cloud's results) are synced.
        masks = [edge_mask(START + 100 + i) for i in range(40)]
        assert await received(store, masks) == 40
        kept_cloud, kept_edge = await stored_bytes(redis)
        usage = await store.tenant_usage("acme")
        assert usage == sum(kept_cloud.values()) + sum(kept_edge.values()) <= budget
        assert usage > budget - 2 * one  # no more evicted than needed
        # Oldest first, whichever side made them: every cloud result went before any edge mask.
        assert not kept_cloud and 0 < len(kept_edge) < 40
        assert sorted(kept_edge) == [round((START + 100 + i) * 1e6) for i in range(40 - len(kept_edge), 40)]
        assert EVICTED.labels("memory")._value.get() - evicted_before == 20 + 40 - len(kept_edge)
        # The edge resends after a lost connection: stored once, accounted once.
        assert await received(store, masks[-5:]) == 5
        assert await store.tenant_usage("acme") == usage
        assert await stored_bytes(redis) == (kept_cloud, kept_edge)
        # The count bound takes edge masks out of the account too.
        counted = MaskStore(redis, max_per_stream=5, tenant_max_bytes=budget)
        assert await received(counted, [edge_mask(START + 200 + i) for i in range(3)]) == 3
        kept_cloud, kept_edge = await stored_bytes(redis)
        assert len(kept_edge) == 5 and await store.tenant_usage("acme") == sum(kept_edge.values())
        await redis.aclose()

    asyncio.run(run())
