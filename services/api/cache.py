"""A short-lived, bounded, single-flight cache for values read from Redis on hot routes.

Many clients polling ``/masks/latest`` of one stream want the same answer: within ``ttl`` seconds
they get the value read once, and while a read is in flight, later callers wait for it instead of
starting their own (no thundering herd on Redis). A failed read is not cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, capacity: int = 4096) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._items: dict[K, tuple[float, V]] = {}
        self._inflight: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        if self.ttl <= 0:
            return await load()
        now = time.monotonic()
        item = self._items.get(key)
        if item is not None and now - item[0] < self.ttl:
            return item[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        else:
            if len(self._items) >= self.capacity:
                self._items.clear()
            self._items[key] = (now, value)
            future.set_result(value)
            return value
        finally:
            del self._inflight[key]

    def forget(self, key: K) -> None:
        self._items.pop(key, None)
