"""Delivers firings to their rule's webhook: a consumer of ``keys.FIRINGS_STREAM`` in group
``keys.WEBHOOK_GROUP``.

A delivery is a JSON POST signed with HMAC-SHA256 over ``"<timestamp>.<body>"`` with the rule's
secret (``X-FlowCloud-Signature: sha256=<hex>``, ``X-FlowCloud-Timestamp``), and names the firing
(``X-FlowCloud-Firing``) so that a receiver can drop a repeat. A failure is retried with
exponential backoff; the count of tries is kept in the firing, so a restarted evaluator goes on
counting. After the last try the firing goes to ``keys.WEBHOOK_DEAD_LETTER``. The firing's status
is checked before each POST and set right after the answer: only an evaluator killed between a
receiver's 2xx and that write sends a firing twice (at-least-once delivery).
Firings trimmed from the queue's bound (the evaluator's) while pending for a deliverer that died
are named as deleted by the next one's reclaim (XAUTOCLAIM): counted and logged, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any, cast

import httpx
from redis.asyncio import Redis

from flowcloud import alerts, keys
from flowcloud.groups import count_trimmed_pending

from . import metrics

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-FlowCloud-Signature"
TIMESTAMP_HEADER = "X-FlowCloud-Timestamp"
FIRING_HEADER = "X-FlowCloud-Firing"
MAX_ERROR = 300  # characters of an error kept in the firing


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class WebhookDeliverer:
    def __init__(
        self,
        redis: Redis,
        consumer: str,
        attempts: int,
        backoff: float,
        backoff_max: float,
        timeout: float,
        in_flight: int,
        claim_idle_ms: int,
        dead_letter_maxlen: int,
    ) -> None:
        self.redis = redis
        self.consumer = consumer
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.claim_idle_ms = claim_idle_ms
        self.dead_letter_maxlen = dead_letter_maxlen
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._slots = asyncio.Semaphore(in_flight)
        self._tasks: dict[bytes, asyncio.Task[None]] = {}  # entry id -> its delivery

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()  # left pending: the next evaluator takes them over
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.client.aclose()

    async def step(self, block_ms: int) -> int:
        """Start deliveries for firings left pending by a dead evaluator, then for new ones."""
        await self._slots.acquire()  # wait for a free slot before taking more work
        self._slots.release()
        stream, group, me = keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP, self.consumer
        claimed: Any = await self.redis.xautoclaim(stream, group, me, self.claim_idle_ms, "0-0", 64)
        count_trimmed_pending(claimed, metrics.FIRINGS_DROPPED, "trimmed_pending", "firings", stream)
        # One of ours still retrying shows as idle too: it is not started twice.
        entries = [e for e in claimed[1] if e[1] and e[0] not in self._tasks] if claimed else []
        if not entries:
            read: Any = await self.redis.xreadgroup(group, me, {stream: ">"}, 64, block_ms)
            entries = read[0][1] if read else []
        for entry_id, fields in entries:
            firing_id = fields.get(keys.FI_ID.encode(), b"").decode()
            self._tasks[entry_id] = asyncio.create_task(self._deliver(entry_id, firing_id))
        return len(entries)

    async def _deliver(self, entry_id: bytes, firing_id: str) -> None:
        async with self._slots:
            metrics.PENDING.inc()
            try:
                await self._attempts(firing_id)
                await self.redis.xack(keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP, entry_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a Redis error: left pending, taken over after claim_idle_ms
                metrics.REDIS_ERRORS.inc()
                log.exception("delivery of firing %s failed; it stays pending", firing_id)
            finally:
                metrics.PENDING.dec()
                self._tasks.pop(entry_id, None)

    async def _attempts(self, firing_id: str) -> None:
        key = keys.alert_firing(alerts.firing_stream(firing_id), firing_id)
        while True:
            fields = cast(dict[bytes, bytes], await self.redis.hgetall(key))
            status = fields.get(alerts.F_STATUS.encode(), b"").decode()
            if status != alerts.STATUS_PENDING:
                return  # delivered, dead-lettered, recorded without a webhook, or expired
            tries = int(await self.redis.hincrby(key, alerts.F_ATTEMPTS, 1))
            firing = alerts.parse_firing(fields)
            error = await self._post(firing, fields.get(alerts.F_SECRET.encode(), b"").decode())
            if error is None:
                await self.redis.hset(
                    key,
                    mapping={alerts.F_STATUS: alerts.STATUS_DELIVERED, alerts.F_DELIVERED: repr(time.time())},
                )
                metrics.DELIVERIES.labels("ok").inc()
                log.info("firing %s delivered to %s (try %d)", firing_id, firing["webhook_url"], tries)
                return
            if tries >= self.attempts:
                # Dead-lettered first, then marked dead (other slots: no transaction spans both);
                # a crash in between tries again and dead-letters it again, never loses it.
                await self.redis.xadd(
                    keys.WEBHOOK_DEAD_LETTER,
                    {keys.FI_ID: firing_id, alerts.F_LAST_ERROR: error},
                    maxlen=self.dead_letter_maxlen,
                    approximate=True,
                )
                await self.redis.hset(
                    key, mapping={alerts.F_STATUS: alerts.STATUS_DEAD, alerts.F_LAST_ERROR: error}
                )
                metrics.DELIVERIES.labels("dead").inc()
                log.warning("firing %s dead-lettered after %d tries: %s", firing_id, tries, error)
                return
            await self.redis.hset(key, alerts.F_LAST_ERROR, error)
            metrics.DELIVERIES.labels("failed").inc()
            delay = min(self.backoff_max, self.backoff * 2 ** (tries - 1))
            log.info("firing %s: try %d failed (%s); next in %.1fs", firing_id, tries, error, delay)
            await asyncio.sleep(delay)

    async def _post(self, firing: dict[str, Any], secret: str) -> str | None:
        """None on a 2xx answer, else what went wrong."""
        url = firing["webhook_url"]
        body = json.dumps({"event": "alert.firing", "firing": firing}, sort_keys=True).encode()
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            FIRING_HEADER: firing["id"],
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign(secret, stamp, body),
        }
        try:
            reply = await self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
        if 200 <= reply.status_code < 300:
            return None
        return f"HTTP {reply.status_code}"
