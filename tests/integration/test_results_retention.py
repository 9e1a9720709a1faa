"""Retention by memory: a per-tenant budget of result bytes, oldest evicted first and counted, on a
real redis-server through the real MaskStore."""

from __future__ import annotations

import asyncio
import random
from typing import cast

from redis.asyncio import Redis
from support.api import describe_stream, share_result

from flowcloud import keys
from flowcloud.results import EVICTED, MaskResult, MaskStore, decode_label_map
from services.api.search import ShareSearch

START = 1_700_000_000.0


def _results(stream: str, count: int, offset: float, seed: int) -> list[MaskResult]:
    rng = random.Random(seed)
    return [
        share_result(stream, seq, START + seq + offset, rng.choice((0.0, 0.1, 0.3)), rng.choice((0.0, 0.2)))
        for seq in range(count)
    ]


async def _stored(redis: Redis, stream: str) -> dict[int, int]:
    """seq -> bytes (metadata and label map) of a stream's stored results."""
    seqs = [int(s) for s in cast(list[bytes], await redis.zrange(keys.mask_index(stream), 0, -1))]
    pipe = redis.pipeline(transaction=False)
    for seq in seqs:
        pipe.hstrlen(keys.mask(stream, seq), "meta")
        pipe.hstrlen(keys.mask(stream, seq), "labels_png")
    sizes = await pipe.execute()
    return {seq: int(m) + int(p) for seq, m, p in zip(seqs, sizes[0::2], sizes[1::2], strict=True) if m}


def test_a_tenant_over_its_budget_loses_its_oldest_results_and_only_those(redis_url: str) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        for stream, tenant in (("a1", "acme"), ("a2", "acme"), ("g1", "globex")):
            await describe_stream(redis, stream, tenant, START)
        acme = _results("a1", 120, 0.0, 1) + _results("a2", 120, 0.5, 2)
        globex = _results("g1", 40, 0.25, 3)
        one = len(acme[0].to_fields()["meta"]) + len(acme[0].labels_png)
        budget = 60 * one  # about a quarter of acme's results
        store = MaskStore(redis, tenant_max_bytes=budget)
        evicted_before = EVICTED.labels("memory")._value.get()
        batches = sorted(acme + globex, key=lambda r: r.capture_ts)
        for i in range(0, len(batches), 16):  # in capture order, as workers write
            await store.put_many(batches[i : i + 16])
        kept = {s: await _stored(redis, s) for s in ("a1", "a2", "g1")}
        usage = await store.tenant_usage("acme")
        assert usage == sum(kept["a1"].values()) + sum(kept["a2"].values()) <= budget
        assert usage > budget - 2 * one  # evicted no more than needed
        assert len(kept["g1"]) == 40  # another tenant under its budget keeps everything
        kept_acme = [r for r in acme if r.seq in kept[r.stream]]
        gone = [r for r in acme if r.seq not in kept[r.stream]]
        assert gone and max(r.capture_ts for r in gone) < min(r.capture_ts for r in kept_acme)  # oldest first
        assert EVICTED.labels("memory")._value.get() - evicted_before == len(gone)
        # Queries see only what is kept.
        found, _cursor = await ShareSearch(redis, store).search(["a1", "a2"], "person", 0.1, 100)
        expected = sorted(
            ((r.capture_ts, r.stream, r.seq) for r in kept_acme if r.shares.get(11, 0) >= 0.1), reverse=True
        )
        assert [(r.capture_ts, r.stream, r.seq) for r in found] == expected
        survivor = await store.get("a2", max(kept["a2"]))
        assert survivor is not None and decode_label_map(survivor.labels_png).size == 1000
        # The count bound takes its results out of the account too.
        counted = MaskStore(redis, max_per_stream=10, tenant_max_bytes=budget)
        await counted.put_many(_results("a1", 125, 200.0, 4)[120:])
        left = {s: await _stored(redis, s) for s in ("a1", "a2")}
        assert len(left["a1"]) == 10
        assert await store.tenant_usage("acme") == sum(left["a1"].values()) + sum(left["a2"].values())
        await redis.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(run())
