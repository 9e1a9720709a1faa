"""Read model of mask-native queries: results by class share and time, across the streams a key
may see, and per-class aggregates over a window.

Everything reads the indexes MaskStore writes with each result (flowcloud.share_index), so a query
reads index entries of its class's share level and the results that match, never a scan of a
stream's results.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from redis.asyncio import Redis

from flowcloud import keys, share_index
from flowcloud.labels import LABEL_SETS
from flowcloud.replies import text
from flowcloud.results import MaskResult, MaskStore
from services.api.apikeys import ALL_TENANTS, ApiKey

MAX_STREAMS = 1000  # streams a search spans at most (newest activity first)
INDEX_CHUNK = 64  # index entries read per stream and round trip at least
MAX_BUCKETS = 7 * 24 * 60  # minutes an aggregate spans at most

CLASS_NAMES = sorted({name for label_set in LABEL_SETS.values() for name in label_set.class_names})
Resolution = Literal["minute", "hour"]
RESOLUTION_SECONDS: dict[str, int] = {"minute": 60, "hour": 3600}


class QueryError(ValueError):
    """A query the indexes cannot answer as asked (unknown class, bad cursor, window too long)."""


def check_class(name: str) -> str:
    if name not in CLASS_NAMES:
        raise QueryError(f"unknown class {name!r}; known: {', '.join(CLASS_NAMES)}")
    return name


class Hit(NamedTuple):
    """One index entry: its order key is (capture_ts, stream, seq), newest first."""

    capture_ts: float
    stream: str
    seq: int
    share: float


def encode_cursor(hit: Hit) -> str:
    return f"{hit.capture_ts!r}:{hit.stream}:{hit.seq}"


def decode_cursor(cursor: str) -> tuple[float, str, int]:
    try:
        ts, stream, seq = cursor.rsplit(":", 2)
        return float(ts), stream, int(seq)
    except ValueError:
        raise QueryError(f"malformed cursor {cursor!r}: pass the next_cursor of the previous page") from None


@dataclass
class _StreamReader:
    """Reads one stream's class index newest first, a chunk at a time."""

    stream: str
    key: str
    offset: int = 0
    done: bool = False
    buffer: deque[Hit] = field(default_factory=deque)


async def visible_streams(redis: Redis, key: ApiKey) -> list[str]:
    """The streams a key may see, newest activity first: a reader's come from its tenant's index
    alone, so listing them never reads another tenant's streams."""
    index = (
        keys.STREAMS_INDEX if key.is_admin or key.tenant == ALL_TENANTS else keys.tenant_streams(key.tenant)
    )
    return [text(s) for s in await redis.zrevrange(index, 0, MAX_STREAMS - 1)]


class ShareSearch:
    """Queries over the class-share indexes of one Redis (bytes responses)."""

    def __init__(self, redis: Redis, store: MaskStore) -> None:
        self.redis = redis
        self.store = store

    async def search(
        self,
        streams: list[str],
        class_name: str,
        min_share: float,
        limit: int,
        since: float | None = None,
        until: float | None = None,
        cursor: str | None = None,
    ) -> tuple[list[MaskResult], str | None]:
        """Results of ``streams`` whose share of ``class_name`` is at least ``min_share`` (and
        above 0), captured in [since, until), newest first; with the next page's cursor."""
        check_class(class_name)
        after = decode_cursor(cursor) if cursor else None
        level = share_index.level_for(min_share)
        readers = [_StreamReader(s, keys.class_index(s, class_name, level)) for s in streams]
        high = repr(after[0]) if after else (f"({until!r}" if until is not None else "+inf")
        if after and until is not None and until <= after[0]:
            high = f"({until!r}"
        low = repr(since) if since is not None else "-inf"
        chunk = max(INDEX_CHUNK, limit + 1)
        found: list[MaskResult] = []
        last_hit: list[Hit] = []
        while len(found) <= limit:
            hits = await self._merge(readers, limit + 1 - len(found), high, low, chunk, min_share, after)
            if not hits:
                break
            results = await self.store.get_many([(h.stream, h.seq) for h in hits], labels=False)
            for hit, result in zip(hits, results, strict=True):
                if result is not None and _share(result, class_name) >= min_share:  # expired: gone
                    found.append(result)
                    last_hit.append(hit)
        if len(found) > limit:
            return found[:limit], encode_cursor(last_hit[limit - 1])
        return found, None

    async def page(
        self,
        streams: list[str],
        class_name: str,
        min_share: float,
        limit: int,
        since: float | None,
        until: float | None,
        cursor: str | None,
    ) -> dict[str, Any]:
        """``search`` as a page body: items (metadata) and next_cursor."""
        items, next_cursor = await self.search(streams, class_name, min_share, limit, since, until, cursor)
        return {"items": [r.metadata() for r in items], "next_cursor": next_cursor}

    async def _merge(
        self,
        readers: list[_StreamReader],
        want: int,
        high: str,
        low: str,
        chunk: int,
        min_share: float,
        after: tuple[float, str, int] | None,
    ) -> list[Hit]:
        """The next ``want`` matching index entries across the readers, newest first."""
        out: list[Hit] = []
        while len(out) < want:
            empty = [r for r in readers if not r.buffer and not r.done]
            if empty:
                await self._refill(empty, high, low, chunk, min_share, after)
            live = [r for r in readers if r.buffer]
            if not live:
                break
            newest = max(live, key=lambda r: r.buffer[0])
            out.append(newest.buffer.popleft())
        return out

    async def _refill(
        self,
        readers: list[_StreamReader],
        high: str,
        low: str,
        chunk: int,
        min_share: float,
        after: tuple[float, str, int] | None,
    ) -> None:
        """One round trip: the next chunk of each reader's index, filtered by share and cursor.
        A chunk with no match is followed by the next at once (entries between levels)."""
        while readers:
            pipe = self.redis.pipeline(transaction=False)
            for reader in readers:
                pipe.zrevrangebyscore(reader.key, high, low, start=reader.offset, num=chunk, withscores=True)
            again = []
            for reader, entries in zip(readers, await pipe.execute(), strict=True):
                reader.offset += len(entries)
                reader.done = len(entries) < chunk
                for raw, score in entries:
                    seq, share = share_index.parse_member(raw)
                    hit = Hit(float(score), reader.stream, seq, share)
                    if share >= min_share and share > 0 and (after is None or hit[:3] < after):
                        reader.buffer.append(hit)
                # Equal capture times come in member order, not seq order: keep the merge ordered.
                reader.buffer = deque(sorted(reader.buffer, reverse=True))
                if not reader.buffer and not reader.done:
                    again.append(reader)
            readers = again

    async def aggregates(
        self,
        stream: str,
        since: float,
        until: float,
        resolution: Resolution,
        level: int,
    ) -> list[dict[str, Any]]:
        """Per-class mean and max share, and time and results at or above ``LEVELS[level]``, per
        minute or hour, from the whole minutes that overlap [since, until)."""
        first = share_index.bucket_of(since)
        last = math.ceil(until / share_index.BUCKET_SECONDS) - 1
        if last - first + 1 > MAX_BUCKETS:
            raise QueryError(f"the window spans more than {MAX_BUCKETS} minutes; ask for a shorter one")
        minutes = list(range(first, last + 1))
        pipe = self.redis.pipeline(transaction=False)
        for minute in minutes:
            pipe.zrange(keys.share_buckets(stream, minute), 0, -1, withscores=True)
        per_group = RESOLUTION_SECONDS[resolution] // share_index.BUCKET_SECONDS
        groups: dict[int, list[share_index.ShareAggregate]] = {}
        for minute, pairs in zip(minutes, await pipe.execute(), strict=True):
            if pairs:
                bucket = share_index.ShareAggregate.parse(minute * share_index.BUCKET_SECONDS, pairs)
                groups.setdefault(minute // per_group, []).append(bucket)
        return [
            _summary(group * per_group * share_index.BUCKET_SECONDS, groups[group], level)
            for group in sorted(groups)
        ]


def _share(result: MaskResult, class_name: str) -> float:
    return share_index.class_names(result.label_set, result.shares).get(class_name, 0.0)


def _summary(start: float, buckets: list[share_index.ShareAggregate], level: int) -> dict[str, Any]:
    total = share_index.ShareAggregate(start)
    seconds: dict[str, float] = {}
    for bucket in buckets:
        total.add(bucket)
        interval = bucket.frame_interval() or 0.0
        for (name, lvl), n in bucket.above.items():
            if lvl == level:
                seconds[name] = seconds.get(name, 0.0) + n * interval
    return {
        "start": start,
        "results": total.count,
        "first": total.first,
        "last": total.last,
        "classes": {
            name: {
                "mean": total.sums[name] / total.count,
                "max": total.maxima.get(name, 0.0),
                "results_above": total.above.get((name, level), 0),
                "seconds_above": seconds.get(name, 0.0),
            }
            for name in sorted(total.sums)
        },
    }
