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

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if there are that many; False (taking none) otherwise."""
        self._refill()
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
