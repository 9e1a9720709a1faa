"""Live latency leaves backfilled frames out: a frame spooled through an outage waited minutes, which
says nothing about the live path. A real API over a real redis-server holding both kinds of result."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import pytest
from redis.asyncio import Redis
from support.api import describe_stream, make_key, running_api, share_result

from flowcloud.results import MaskResult, MaskStore
from flowcloud.settings import ApiSettings

LIVE_LATENCY = 0.04  # share_result: persisted 40 ms after capture
OUTAGE = 300.0  # the backfilled frames were persisted five minutes after their capture


def backfilled(result: MaskResult) -> MaskResult:
    return dataclasses.replace(result, persisted_ts=result.capture_ts + OUTAGE, backfill=True)


def test_stats_and_listing_latency_exclude_backfilled_frames(redis_url: str) -> None:
    start = time.time() - 60

    async def seed() -> None:
        redis = Redis.from_url(redis_url)
        await describe_stream(redis, "cam-1", "acme", time.time())
        # The timeline in capture order: 20 spooled frames (seqs reserved first), then 20 live ones.
        results = [share_result("cam-1", i, start + i * 0.1, 0.1) for i in range(40)]
        await MaskStore(redis).put_many([backfilled(r) if r.seq < 20 else r for r in results])
        await redis.aclose()

    asyncio.run(seed())
    key = make_key(redis_url, "reader", "acme")
    with (
        running_api(ApiSettings(redis_url=redis_url)) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client,
    ):
        stats = client.get("/streams/cam-1/stats", params={"points": 100}).json()
        listed = client.get("/streams").json()["items"][0]
    series = stats["series"]
    assert [p["backfill"] for p in series] == [True] * 20 + [False] * 20  # each point says which
    total = {s["name"]: s for s in stats["stages"]}
    backfill = {s["name"]: s for s in stats["backfill_stages"]}
    # Live percentiles are the live frames' alone; the backfilled ones are summarised beside them.
    assert sum(s["mean"] for s in total.values() if s["mean"] is not None) == pytest.approx(LIVE_LATENCY)
    assert max(s["p95"] or 0.0 for s in total.values()) < 1.0
    assert {s["samples"] for s in total.values() if s["samples"]} == {20}
    assert sum(s["mean"] for s in backfill.values() if s["mean"] is not None) == pytest.approx(OUTAGE)
    assert listed["stream_id"] == "cam-1"
    assert listed["latency"]["p95"] == pytest.approx(LIVE_LATENCY) and listed["latency"]["samples"] == 20
