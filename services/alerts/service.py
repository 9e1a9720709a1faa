"""The alert service: the rule evaluator and the webhook deliverer in one process, with an
explicit lifecycle (start, serve, on SIGTERM stop reading and cancel deliveries, which stay pending
for the next evaluator)."""

from __future__ import annotations

import asyncio
import logging
import signal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flowcloud import keys
from flowcloud.groups import ensure_group
from flowcloud.redis_client import connect_async
from flowcloud.settings import AlertsSettings

from . import metrics
from .evaluator import Evaluator
from .webhooks import WebhookDeliverer

log = logging.getLogger(__name__)

BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0


class _Stopped(Exception):
    """Raised in the service's task group on SIGTERM: cancels the loops wherever they wait."""


def default_name() -> str:
    import os
    import socket

    return f"alerts-{socket.gethostname()}-{os.getpid()}"


class AlertService:
    def __init__(self, settings: AlertsSettings) -> None:
        self.settings = settings
        self.name = settings.name or default_name()
        self.redis = connect_async(settings.redis_url, settings.redis_cluster)
        # Rules are control plane (devices, keys, rules: small, durable): always one plain Redis;
        # results and firings are data.
        self.control = (
            Redis.from_url(settings.control_url) if settings.control_url != settings.redis_url else self.redis
        )
        self.evaluator = Evaluator(
            self.redis,
            self.name,
            settings.batch_size,
            settings.claim_idle_ms,
            settings.rules_cache_seconds,
            control=self.control,
            shards=settings.frame_shards,
            firings_maxlen=settings.firings_maxlen,
        )
        self.deliverer = WebhookDeliverer(
            self.redis,
            self.name,
            attempts=settings.webhook_attempts,
            backoff=settings.webhook_backoff,
            backoff_max=settings.webhook_backoff_max,
            timeout=settings.webhook_timeout,
            in_flight=settings.deliveries_in_flight,
            claim_idle_ms=settings.claim_idle_ms,
            dead_letter_maxlen=settings.dead_letter_maxlen,
        )
        self.ready = False
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        log.info("alerts %s: stopping", self.name)
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._until_stopped(self._start)
            self.ready = True
            log.info(
                "alerts %s: evaluating %d results shard(s), delivering %s",
                self.name,
                len(self.evaluator.shards),
                keys.FIRINGS_STREAM,
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._loop("evaluate", self.evaluator.step))
                    tg.create_task(self._loop("deliver", self.deliverer.step))
                    tg.create_task(self._stopped())
            except* _Stopped:
                pass  # what was read and not acknowledged stays pending for the next evaluator
            log.info("alerts %s: stopped after %d results", self.name, self.evaluator.evaluated)
            return 0
        finally:
            self.ready = False
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.deliverer.close()
            for client in {id(c): c for c in (self.redis, self.control)}.values():
                await client.aclose()  # type: ignore[attr-defined,unused-ignore]

    async def _stopped(self) -> None:
        await self._stop.wait()
        raise _Stopped

    async def _start(self) -> None:
        await self.evaluator.start()
        # Every firing recorded, even before the first deliverer started.
        await ensure_group(self.redis, keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP, "0")

    async def _until_stopped(self, action: object) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                await action()  # type: ignore[operator]
                return
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.inc()
                log.warning("alerts: Redis failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    async def _loop(self, what: str, step: object) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                await step(self.settings.poll_ms)  # type: ignore[operator]
                backoff = BACKOFF_MIN
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.inc()
                log.warning("alerts: %s failed (%s); retrying in %.1fs", what, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
