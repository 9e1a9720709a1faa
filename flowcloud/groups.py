"""Consumer groups on Redis streams: created once, whoever comes first (BUSYGROUP is fine); what
an XAUTOCLAIM reply says about entries trimmed while pending."""

from __future__ import annotations

from typing import Any

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


def trimmed_while_pending(reply: Any) -> list[bytes]:
    """The ids an XAUTOCLAIM ``reply`` names as deleted: read through the group but trimmed from the
    stream before anyone acknowledged them. Redis (7.0 on) has taken them out of the group's pending
    list in the same command, so no later claim names them again: the caller counts them once."""
    return list(reply[2]) if reply is not None and len(reply) > 2 and reply[2] else []
