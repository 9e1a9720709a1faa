"""The gateway's token buckets, per-address connection counts and settings parsing."""

from __future__ import annotations

import argparse

import pytest

from flowcloud.cli.errors import CommandError
from services.gateway.cli import configure, settings_from
from services.gateway.limits import ConnectionLimiter, TokenBucket


class Clock:
    """A clock the test moves (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_try_take_and_refill() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.025  # 2.5 tokens come back
    assert bucket.try_take(2) and not bucket.try_take(2)
    clock.now += 60.0  # never more than the burst
    assert bucket.try_take(3) and not bucket.try_take(0.5)


def test_token_bucket_counts_late_takes_at_their_time_never_before_the_last() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=1, clock=clock)
    clock.now += 1.0
    # Three takes read now that waited 1, 0.5 and 0 s: counted as of then, each finds a token.
    assert all(bucket.try_take(late=late) for late in (1.0, 0.5, 0.0))
    # A take claiming to be older than the last count is counted at the last count: no refill.
    assert not bucket.try_take(late=5.0)
    clock.now += 0.5
    assert bucket.try_take(late=-3.0)  # (a negative wait is no wait) one token came back
    assert not bucket.try_take()


def test_token_bucket_take_returns_the_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=1000, clock=clock)
    assert bucket.take(1000) == 0.0
    assert bucket.take(500) == pytest.approx(0.5)  # in debt: half a second to wait
    clock.now += 0.5
    assert bucket.take(0) == 0.0 and not bucket.try_take(1)
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_connection_limiter() -> None:
    limiter = ConnectionLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a") and not limiter.acquire("a")
    assert limiter.acquire("b")
    limiter.release("a")
    assert limiter.open_count("a") == 1 and limiter.acquire("a")


def test_cli_settings_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCLOUD_GATEWAY_PORT", "7100")
    monkeypatch.setenv("FLOWCLOUD_GATEWAY_MAX_SESSIONS", "9")
    parser = argparse.ArgumentParser()
    configure(parser)
    settings = settings_from(parser.parse_args(["--port", "7200", "--record", "/tmp/rec"]))
    assert (settings.port, settings.max_sessions, settings.record_dir) == (7200, 9, "/tmp/rec")
    with pytest.raises(CommandError, match="jpeg_quality"):
        settings_from(parser.parse_args(["--jpeg-quality", "5"]))
