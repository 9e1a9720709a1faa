"""The results shards' bound never loses a result event silently, and the alerts group's lag stays
true (issue 16's no-silent-loss promise, on the events the alert evaluators read: issue 15): events
trimmed unread are counted by the writer, events trimmed while pending by the evaluator reclaiming.

The real MaskStore writes results to a real redis-server with a results-shard bound of 20; the real
alert Evaluator reads them through its consumer group."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from support.api import share_result

from flowcloud import keys
from flowcloud.results import DROP_TRIMMED_UNREAD, EVENTS_DROPPED, MaskResult, MaskStore
from services.alerts import metrics
from services.alerts.evaluator import Evaluator

START = 1_700_000_000.0
MAXLEN = 20
STREAM = "cam-t"
SHARD = keys.results_shard(0)


def results(first: int, count: int) -> list[MaskResult]:
    return [share_result(STREAM, seq, START + seq * 0.1, 0.1) for seq in range(first, first + count)]


def dropped() -> float:
    return cast(float, EVENTS_DROPPED.labels(DROP_TRIMMED_UNREAD)._value.get())


def trimmed_pending() -> float:
    return cast(float, metrics.RESULTS.labels("trimmed_pending")._value.get())


async def alerts_group(redis: Redis) -> dict[str, Any]:
    (group,) = cast(list[dict[str, Any]], await redis.xinfo_groups(SHARD))
    assert group["name"] == keys.ALERTS_GROUP.encode()
    return group


def test_events_the_evaluators_have_not_read_are_counted_when_trimmed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        try:
            evaluator = Evaluator(redis, "eval-1", 5, 60_000, 60.0)
            await evaluator.start()
            store = MaskStore(redis, events_maxlen=MAXLEN)
            before = dropped()
            await store.put_many(results(0, 10))
            assert await evaluator.step(100) == 5  # seqs 0-4 evaluated; then the evaluators stall
            with caplog.at_level(logging.WARNING, logger="flowcloud.results"):
                for first in range(10, 50, 10):  # a worker's batches
                    await store.put_many(results(first, 10))
            # 45 unread (seqs 5-49) for a bound of 20: the oldest 25 went, each one counted.
            assert dropped() - before == 25
            assert "cam-t seqs 5-9" in caplog.text and "cam-t seqs 20-29" in caplog.text
            assert await redis.xlen(SHARD) == MAXLEN
            assert int((await alerts_group(redis))["lag"]) == MAXLEN  # true: what is left to read
            assert await evaluator.lag() == MAXLEN
            seen = 0
            while got := await evaluator.step(100):
                seen += got
            assert seen == MAXLEN  # seqs 30-49
            group = await alerts_group(redis)
            assert int(group["lag"]) == 0 and int(group["pending"]) == 0
            assert await evaluator.lag() == 0
            # Back within the bound: nothing more is counted.
            await store.put_many(results(50, 10))
            assert dropped() - before == 25
            assert int((await alerts_group(redis))["lag"]) == 10
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_a_results_shard_no_evaluator_reads_is_trimmed_plainly(redis_url: str) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        try:
            store = MaskStore(redis, events_maxlen=MAXLEN)
            before = dropped()
            for first in range(0, 250, 50):
                await store.put_many(results(first, 50))
            assert await redis.xinfo_groups(SHARD) == []  # no group created: nobody is owed the events
            assert dropped() == before
            assert await redis.xlen(SHARD) <= MAXLEN + 100  # MAXLEN ~: whole nodes (100 entries) go
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_events_trimmed_while_pending_for_a_dead_evaluator_are_counted_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        try:
            await Evaluator(redis, "eval-dead", 10, 60_000, 60.0).start()
            store = MaskStore(redis, events_maxlen=MAXLEN)
            unread_before, pending_before = dropped(), trimmed_pending()
            await store.put_many(results(0, 10))
            # An evaluator reads seqs 0-9 and dies before acknowledging them.
            await redis.xreadgroup(keys.ALERTS_GROUP, "eval-dead", {SHARD: ">"}, 10)
            await store.put_many(results(10, 30))  # 30 unread for a bound of 20: exact trim to 20
            assert dropped() - unread_before == 10  # seqs 10-19, counted by the writer
            assert int((await alerts_group(redis))["pending"]) == 10  # seqs 0-9: trimmed, still pending
            live = Evaluator(redis, "eval-live", 5, 0, 60.0)  # reclaims at once: no idle wait
            with caplog.at_level(logging.WARNING, logger="flowcloud.groups"):
                seen = 0
                while got := await live.step(100):
                    seen += got
            assert seen == MAXLEN  # seqs 20-39
            assert trimmed_pending() - pending_before == 10  # seqs 0-9, over two claims of 5
            assert f"trimmed from {SHARD}" in caplog.text
            group = await alerts_group(redis)
            assert int(group["pending"]) == 0 and int(group["lag"]) == 0
            assert await live.step(100) == 0
            assert trimmed_pending() - pending_before == 10  # they left the pending list: counted once
            assert dropped() - unread_before == 10
        finally:
            await redis.aclose()

    asyncio.run(run())
