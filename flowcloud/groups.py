"""Consumer groups on Redis streams: created once, whoever comes first (BUSYGROUP is fine)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError


async def ensure_group(redis: Redis, stream: str, group: str, start: str) -> bool:
    """Create ``group`` on ``stream`` (and the stream) from ``start`` unless it exists; True if created."""
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True
