"""The gateway's token buckets, per-address connection counts and settings parsing."""

from __future__ import annotations

import argparse
import time

import pytest

from flowcloud.cli.errors import CommandError
from services.gateway.cli import configure, settings_from
from services.gateway.limits import ConnectionLimiter, TokenBucket


def test_token_bucket_try_take_and_refill() -> None:
    bucket = TokenBucket(rate=100, burst=3)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    time.sleep(0.025)  # 2.5 tokens come back
    assert bucket.try_take(2) and not bucket.try_take(2)


def test_token_bucket_take_returns_the_wait() -> None:
    bucket = TokenBucket(rate=1000, burst=1000)
    assert bucket.take(1000) == 0.0
    assert bucket.take(500) == pytest.approx(0.5, abs=0.01)
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
