"""Consumer groups on Redis streams: created once, whoever comes first (BUSYGROUP is fine); what
an XAUTOCLAIM reply says about entries trimmed while pending."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)


async def ensure_group(redis: Redis, stream: str, group: str, start: str) -> bool:
    """Create ``group`` on ``stream`` (and the stream) from ``start`` unless it exists; True if created."""
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def count_trimmed_pending(reply: Any, counter: Counter, reason: str, what: str, stream: str) -> int:
    """Count and log the entries an XAUTOCLAIM ``reply`` on ``stream`` names as deleted: read through
    the group by a consumer that died, trimmed before another reclaimed them (``what`` they are, for
    the log line: "frames", "result events", ...). Redis (7.0 on) has taken them off the group's
    pending list in the same command, so no later claim names them again: each is counted once, in
    ``counter`` under the label ``reason`` (made only when there is something to count)."""
    trimmed = len(reply[2]) if reply is not None and len(reply) > 2 and reply[2] else 0
    if trimmed:
        counter.labels(reason).inc(trimmed)
        log.warning(
            "%d %s pending for a consumer that died were trimmed from %s before another reclaimed them",
            trimmed,
            what,
            stream,
        )
    return trimmed
