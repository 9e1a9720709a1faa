"""The firings queue's bound never loses a firing silently, and the webhook group's lag stays true
(issue 16's no-silent-loss promise on the queue of webhook deliveries: issue 15): firings trimmed
unread are counted by the evaluator queueing them, firings trimmed while pending by the deliverer
reclaiming them.

The real alert Evaluator queues firings on a real redis-server with a bound of 20; the real
WebhookDeliverer reads them through its consumer group."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from flowcloud import alerts, keys
from flowcloud.alerts import AlertRule
from flowcloud.groups import ensure_group
from services.alerts import metrics
from services.alerts.evaluator import TRIMMED_ERROR, Evaluator, ResultEvent
from services.alerts.webhooks import WebhookDeliverer

MAXLEN = 20
RULE = AlertRule("r1", "acme", "person", "above", 0.1)
STREAM = "cam-f"


def firings(first: int, count: int) -> list[tuple[ResultEvent, AlertRule]]:
    return [
        (ResultEvent(STREAM, seq, 1_700_000_000.0 + seq, {"person": 0.5}), RULE)
        for seq in range(first, first + count)
    ]


def firing_key(seq: int) -> str:
    return keys.alert_firing(STREAM, alerts.firing_id(RULE.id, STREAM, seq))


def dropped(reason: str) -> float:
    return cast(float, metrics.FIRINGS_DROPPED.labels(reason)._value.get())


async def webhook_group(redis: Redis) -> dict[str, Any]:
    (group,) = cast(list[dict[str, Any]], await redis.xinfo_groups(keys.FIRINGS_STREAM))
    assert group["name"] == keys.WEBHOOK_GROUP.encode()
    return group


def deliverer(redis: Redis, name: str, claim_idle_ms: int) -> WebhookDeliverer:
    return WebhookDeliverer(redis, name, 1, 0.1, 0.1, 5.0, 16, claim_idle_ms, 100)


async def drain(d: WebhookDeliverer) -> int:
    """Entries taken until none is left; each delivery (of a firing with no hash: nothing to POST)
    is acknowledged."""
    seen = 0
    while got := await d.step(50):
        seen += got
        await asyncio.gather(*list(d._tasks.values()))
    return seen


def test_firings_no_deliverer_has_read_are_counted_when_trimmed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        try:
            await ensure_group(redis, keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP, "0")  # as the service does
            evaluator = Evaluator(redis, "eval-1", 5, 60_000, 60.0, firings_maxlen=MAXLEN)
            statuses = {5: alerts.STATUS_PENDING, 6: alerts.STATUS_RECORDED, 30: alerts.STATUS_PENDING}
            for seq, status in statuses.items():
                await redis.hset(firing_key(seq), alerts.F_STATUS, status)
            before = dropped("trimmed_unread")
            await evaluator._queue(firings(0, 5))
            await redis.xreadgroup(keys.WEBHOOK_GROUP, "hook-1", {keys.FIRINGS_STREAM: ">"}, 5)
            with caplog.at_level(logging.WARNING, logger="services.alerts.evaluator"):
                for first in range(5, 45, 10):  # delivery has stalled
                    await evaluator._queue(firings(first, 10))
            # 40 unread for a bound of 20: the oldest 20 (seqs 5-24) went, each one counted.
            assert dropped("trimmed_unread") - before == 20
            assert f"firings r1.{STREAM}.5 to r1.{STREAM}.14" in caplog.text
            assert await redis.xlen(keys.FIRINGS_STREAM) == MAXLEN
            # Trimmed unread: pending becomes dead, with why; recorded (no webhook) stays; kept ones too.
            assert await redis.hget(firing_key(5), alerts.F_STATUS) == alerts.STATUS_DEAD.encode()
            assert await redis.hget(firing_key(5), alerts.F_LAST_ERROR) == TRIMMED_ERROR.encode()
            assert await redis.hget(firing_key(6), alerts.F_STATUS) == alerts.STATUS_RECORDED.encode()
            assert await redis.hget(firing_key(30), alerts.F_STATUS) == alerts.STATUS_PENDING.encode()
            assert not await redis.exists(firing_key(7))  # an expired firing is not made again
            await redis.delete(firing_key(30))  # a bare hash: nothing for the deliverer to post
            group = await webhook_group(redis)
            assert int(group["lag"]) == MAXLEN  # true: what is left to read
            live = deliverer(redis, "hook-2", 60_000)
            assert await drain(live) == MAXLEN  # seqs 25-44
            group = await webhook_group(redis)
            assert int(group["lag"]) == 0
            await evaluator._queue(firings(45, 10))  # back within the bound: nothing more counted
            assert dropped("trimmed_unread") - before == 20
            assert int((await webhook_group(redis))["lag"]) == 10
            await live.close()
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_firings_queue_no_deliverer_reads_is_trimmed_plainly(redis_url: str) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        try:
            evaluator = Evaluator(redis, "eval-1", 5, 60_000, 60.0, firings_maxlen=MAXLEN)
            before = dropped("trimmed_unread")
            for first in range(0, 250, 50):
                await evaluator._queue(firings(first, 50))
            assert await redis.xinfo_groups(keys.FIRINGS_STREAM) == []  # nobody is owed the firings
            assert dropped("trimmed_unread") == before
            assert await redis.xlen(keys.FIRINGS_STREAM) <= MAXLEN + 100  # MAXLEN ~: whole nodes go
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_firings_trimmed_while_pending_for_a_dead_deliverer_are_counted_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        try:
            await ensure_group(redis, keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP, "0")
            evaluator = Evaluator(redis, "eval-1", 5, 60_000, 60.0, firings_maxlen=MAXLEN)
            unread_before, pending_before = dropped("trimmed_unread"), dropped("trimmed_pending")
            await evaluator._queue(firings(0, 10))
            # A deliverer reads seqs 0-9 and dies before acknowledging them.
            await redis.xreadgroup(keys.WEBHOOK_GROUP, "hook-dead", {keys.FIRINGS_STREAM: ">"}, 10)
            await evaluator._queue(firings(10, 30))  # 30 unread for a bound of 20: exact trim to 20
            assert dropped("trimmed_unread") - unread_before == 10  # seqs 10-19
            assert int((await webhook_group(redis))["pending"]) == 10  # seqs 0-9: trimmed, still pending
            live = deliverer(redis, "hook-live", 0)  # reclaims at once: no idle wait
            with caplog.at_level(logging.WARNING, logger="flowcloud.groups"):
                assert await drain(live) == MAXLEN  # seqs 20-39
            assert dropped("trimmed_pending") - pending_before == 10
            assert f"trimmed from {keys.FIRINGS_STREAM}" in caplog.text
            group = await webhook_group(redis)
            assert int(group["pending"]) == 0 and int(group["lag"]) == 0
            assert await live.step(50) == 0
            assert dropped("trimmed_pending") - pending_before == 10  # counted once
            await live.close()
        finally:
            await redis.aclose()

    asyncio.run(run())
