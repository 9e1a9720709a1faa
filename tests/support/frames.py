"""Frames on the real Redis: the frames of one stream's frame log, and publishing frames as a gateway
does (flowcloud.frame_log)."""

from __future__ import annotations

import time
from typing import cast

import redis

from flowcloud.frame_log import logged_frames, publish_blocking
from flowcloud.frames import Frame


def frames_on_redis(redis_url: str, stream: str, backfill: bool = False) -> list[Frame]:
    """The frames of ``stream``'s frame log (``backfill``: its backfill log), oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        return logged_frames(client, stream, backfill)
    finally:
        client.close()


Entries = list[tuple[bytes, dict[bytes, bytes]]]


def entries(client: redis.Redis, key: str) -> Entries:
    """The entries of the Redis stream ``key`` (a frame log or a shard queue), oldest first."""
    return cast(Entries, client.xrange(key))


def publish(client: redis.Redis, frames: list[Frame], shards: int = 1) -> list[str]:
    """Publish frames (their references in one MULTI, so that one XREADGROUP sees all of them); the
    references' ids."""
    return publish_blocking(client, frames, shards, atomic=True)


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
        publish_blocking(client, [frame])
        sent[stream] += 1
        due[stream] = max(due[stream] + 1 / rates[stream], time.monotonic() - 1 / rates[stream])
