"""Admission and rate limits: connections per client address, and token buckets per device."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full. ``clock`` gives seconds
    (monotonic; tests pass their own)."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self.clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self, late: float = 0.0) -> None:
        # Never before the last count: time only goes forward, so however ``late`` is chosen the
        # tokens granted up to now stay at most ``burst + rate * elapsed``.
        now = max(self._stamp, self.clock() - max(0.0, late))
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self, amount: float = 1.0, late: float = 0.0) -> bool:
        """Take ``amount`` tokens if there are that many; False (taking none) otherwise.

        ``late``: how long what is counted waited on this side before being counted (a reader that
        stalled, then read a backlog at once). It is counted as of then, so a stall of the reader does
        not turn a sender's steady rate into a burst; it cannot make the bucket grant more than its
        rate over time, since a count is never placed before the previous one."""
        self._refill(late)
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def take(self, amount: float) -> float:
        """Take ``amount`` tokens, going into debt; the seconds to wait until the debt is paid."""
        self._refill()
        self._tokens -= amount
        return max(0.0, -self._tokens / self.rate)


class ConnectionLimiter:
    """Counts open connections per client address and refuses above ``per_address``."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._open: Counter[str] = Counter()

    def acquire(self, address: str) -> bool:
        if self._open[address] >= self.per_address:
            return False
        self._open[address] += 1
        return True

    def release(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]

    def open_count(self, address: str) -> int:
        return self._open[address]
