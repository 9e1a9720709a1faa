"""The frames stream on the real Redis: the frames of one stream on it, and publishing frames to it."""

from __future__ import annotations

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
