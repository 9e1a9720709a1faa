"""The frames stream on the real Redis: the frames of one stream on it, and publishing frames to it."""

from __future__ import annotations

import time
from typing import cast

import redis

from flowcloud import keys
from flowcloud.frames import Frame


def frames_on_redis(redis_url: str, stream: str, key: str = keys.FRAMES_STREAM) -> list[Frame]:
    """The frames of ``stream`` on the Redis stream ``key``, oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(key))
    finally:
        client.close()
    frames = [Frame.from_fields(fields) for _, fields in entries]
    return [f for f in frames if f.stream == stream]


def publish(client: redis.Redis, frames: list[Frame]) -> list[str]:
    """XADD frames atomically (one MULTI), so that one XREADGROUP sees all of them."""
    pipe = client.pipeline(transaction=True)
    for f in frames:
        pipe.xadd(keys.FRAMES_STREAM, f.to_fields())  # type: ignore[arg-type]
    return [i.decode() for i in pipe.execute()]


def publish_at_rates(
    client: redis.Redis,
    rates: dict[str, float],
    duration: float,
    pictures: dict[str, list[bytes]],
    size: tuple[int, int],
) -> dict[str, int]:
    """Publish live frames of each stream at its rate (frames per second) for ``duration`` seconds,
    each captured as it is sent; ``pictures`` are the JPEGs each stream cycles through. Returns the
    frames published per stream (fewer than rate x duration when this machine lags: it never bursts)."""
    height, width = size
    start = time.monotonic()
    due = dict.fromkeys(rates, start)
    sent = dict.fromkeys(rates, 0)
    while True:
        stream = min(due, key=lambda name: due[name])
        if due[stream] >= start + duration:
            return sent
        time.sleep(max(0.0, due[stream] - time.monotonic()))
        now = time.time()
        data = pictures[stream][sent[stream] % len(pictures[stream])]
        frame = Frame(stream, sent[stream] + 1, now, now, width, height, "jpeg", data)
        client.xadd(keys.FRAMES_STREAM, frame.to_fields())  # type: ignore[arg-type]
        sent[stream] += 1
        due[stream] = max(due[stream] + 1 / rates[stream], time.monotonic() - 1 / rates[stream])
