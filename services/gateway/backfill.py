"""The backfill lane: spooled video an edge sends after an outage, beside its live session.

An edge that comes back with frames in its spool says how many in its live HELLO (``spooled``) and
opens a second connection whose HELLO says ``backfill``. The live session reserves that many seqs
before publishing any live frame (`reserve_backfill_seqs`), and the backfill session's frames take
them in capture order (`take_backfill_seqs`), so the stream's results, ordered by seq, are in
capture order too. Frames beyond the reservation take ordinary seqs (counted). Backfill frames go
to their stream's backfill log and the shard's backfill lane (`keys.backfill_shard`), which workers
read only with spare batch room; the lane has its own rate limits, so it cannot starve the live
session of its budget.
"""

from __future__ import annotations

from collections import Counter

from redis.asyncio import Redis

from flowcloud import keys
from services.gateway import metrics

BACKFILL_LIMITS_SUFFIX = "/backfill"


def backfill_key(device_id: str, backfill: bool) -> str:
    """The key of a lane's rate limits: the backfill lane has its own buckets."""
    return device_id + BACKFILL_LIMITS_SUFFIX if backfill else device_id


async def reserve_backfill_seqs(redis: Redis, stream: str, count: int) -> tuple[int, int]:
    """Reserve ``count`` seqs of ``stream`` for its spooled frames; the first and last reserved.

    A reservation replaces an earlier one (its unused seqs become gaps)."""
    last = int(await redis.hincrby(keys.stream_meta(stream), keys.M_LAST_SEQ, count))
    first = last - count + 1
    await redis.hset(
        keys.stream_meta(stream),
        mapping={keys.M_BACKFILL_LAST_SEQ: first - 1, keys.M_BACKFILL_END_SEQ: last},
    )
    return first, last


async def take_backfill_seqs(redis: Redis, counts: Counter[str]) -> dict[str, list[int]]:
    """Seqs for ``counts[stream]`` backfill frames of each stream, in order: from the stream's
    reservation while it lasts, then new ones (two round trips at most)."""
    pipe = redis.pipeline(transaction=False)
    for stream, count in counts.items():
        pipe.hincrby(keys.stream_meta(stream), keys.M_BACKFILL_LAST_SEQ, count)
        pipe.hget(keys.stream_meta(stream), keys.M_BACKFILL_END_SEQ)
    replies = await pipe.execute()
    out: dict[str, list[int]] = {}
    beyond: Counter[str] = Counter()
    for i, (stream, count) in enumerate(counts.items()):
        last, end = int(replies[2 * i]), replies[2 * i + 1]
        end = int(end) if end is not None else 0
        out[stream] = [seq for seq in range(last - count + 1, last + 1) if seq <= end]
        beyond[stream] = count - len(out[stream])
    beyond = +beyond
    if beyond:
        metrics.BACKFILL_UNRESERVED.inc(sum(beyond.values()))
        pipe = redis.pipeline(transaction=False)
        for stream, count in beyond.items():
            pipe.hincrby(keys.stream_meta(stream), keys.M_LAST_SEQ, count)
        for (stream, count), last in zip(beyond.items(), await pipe.execute(), strict=True):
            out[stream] += list(range(int(last) - count + 1, int(last) + 1))
    return out
