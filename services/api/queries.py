"""Read models of the API: streams, pages of mask results, class shares over time, recent frames.

Everything here reads what the gateway (stream metadata, recent frames) and the workers (mask
results through flowcloud.results.MaskStore, heartbeats) write; nothing here writes. Results are
indexed by frame seq; capture times grow with seq, so a time bound becomes a rank in the index by
binary search (a dozen lookups for the 10,000 results a stream keeps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.clock import RedisClock
from flowcloud.frames import Frame, FrameFormatError
from flowcloud.percentile import percentile
from flowcloud.replies import text
from flowcloud.results import MaskResult, MaskStore
from flowcloud.stages import STAGES
from flowcloud.streams import StreamMeta
from flowcloud.workers import WorkerHeartbeat
from services.api.cache import TtlCache
from services.api.replies import as_fields

LATENCY_SAMPLES = 32  # newest results summarised per stream in listings
MAX_STREAMS = 1000  # streams listed at most (newest activity first)
RECENT_PAGE = 16  # entries of a stream's frame log read per step when searching it for a seq
NEWEST_CAPACITY = 4096  # streams whose newest result is kept, so an unchanged one is not read again


@dataclass
class LatencySummary:
    samples: int = 0
    p50: float | None = None
    p95: float | None = None
    mean: float | None = None
    max: float | None = None
    result_fps: float | None = None  # results per second of capture time over the samples

    @classmethod
    def of(cls, results: list[MaskResult]) -> LatencySummary:
        """Over live results: a backfilled frame's latency is the outage it waited out."""
        results = [r for r in results if not r.backfill]
        if not results:
            return cls()
        latencies = [r.latency for r in results]
        times = sorted(r.capture_ts for r in results)
        span = times[-1] - times[0]
        return cls(
            samples=len(results),
            p50=percentile(latencies, 50),
            p95=percentile(latencies, 95),
            mean=sum(latencies) / len(latencies),
            max=max(latencies),
            result_fps=(len(times) - 1) / span if span > 0 else None,
        )


def stage_summary(results: list[MaskResult]) -> list[dict[str, Any]]:
    """Each stage's seconds over ``results`` (p50, p95, mean) and its share of the mean latency:
    the stages' means add up to the mean latency, so the shares say where the time goes."""
    per_result = [r.stages() for r in results]
    mean_latency = sum(r.latency for r in results) / len(results) if results else 0.0
    out = []
    for stage in STAGES:
        known = [t for t in (s[stage.name] for s in per_result) if t is not None]
        mean = sum(known) / len(results) if known else None  # unknown counts as 0: it is in the next
        out.append(
            {
                "name": stage.name,
                "what": stage.what,
                "samples": len(known),
                "p50": percentile(known, 50) if known else None,
                "p95": percentile(known, 95) if known else None,
                "mean": mean,
                "share": mean / mean_latency if mean is not None and mean_latency > 0 else None,
            }
        )
    return out


@dataclass
class StreamInfo:
    stream_id: str
    device: str | None
    tenant: str | None
    status: str
    width: int | None
    height: int | None
    fps: float | None
    started: float | None
    last_seen: float | None
    last_seq: int | None
    trimmed_unread: int
    results: int
    latest_result_seq: int | None
    latency: LatencySummary = field(default_factory=LatencySummary)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["latency"] = dict(self.latency.__dict__)
        return out


class StreamQueries:
    """Queries over one Redis (bytes responses) and the MaskStore on it."""

    def __init__(
        self,
        redis: Redis,
        store: MaskStore,
        live_window: float,
        tenant_ttl: float = 0.0,
        latest_ttl: float = 0.0,
        clock: RedisClock | None = None,
    ) -> None:
        self.redis = redis
        self.store = store
        self.live_window = live_window
        # Last-seen times and heartbeats are on Redis's clock (flowcloud.clock): compare on it too.
        self.clock = clock or RedisClock()
        # A stream's tenant is set when its device is registered; it barely ever changes.
        self._tenants: TtlCache[str, tuple[bool, str | None]] = TtlCache(tenant_ttl)
        self._latest: TtlCache[str, MaskResult | None] = TtlCache(latest_ttl)
        self._newest: dict[str, MaskResult] = {}  # the last newest result read, by stream

    # --- streams ----------------------------------------------------------------------------
    async def stream_tenant(self, stream_id: str) -> tuple[bool, str | None]:
        """(exists, tenant) of a stream: it exists once the gateway has described it."""
        found = await self._tenants.get(stream_id, lambda: self._read_tenant(stream_id))
        if not found[0]:
            self._tenants.forget(stream_id)  # a stream that starts is visible at once
        return found

    async def _read_tenant(self, stream_id: str) -> tuple[bool, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.stream_meta(stream_id), keys.M_TENANT)
        pipe.exists(keys.stream_meta(stream_id))
        tenant, has_meta = await pipe.execute()
        return bool(has_meta), text(tenant) if tenant is not None else None

    async def stream_ids(self) -> list[str]:
        ids = await self.redis.zrevrange(keys.STREAMS_INDEX, 0, MAX_STREAMS - 1)
        return [text(i) for i in ids]

    async def streams(self, stream_ids: list[str]) -> list[StreamInfo]:
        """Descriptions of the given streams that the gateway has described, in two round trips
        whatever their number."""
        if not stream_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for sid in stream_ids:
            pipe.hgetall(keys.stream_meta(sid))
            pipe.zcard(keys.mask_index(sid))
            pipe.zrevrange(keys.mask_index(sid), 0, LATENCY_SAMPLES - 1)
        replies = await pipe.execute()
        metas = replies[0::3]
        counts = replies[1::3]
        newest = [[int(s) for s in seqs] for seqs in replies[2::3]]
        refs = [(sid, seq) for sid, seqs in zip(stream_ids, newest, strict=True) for seq in seqs]
        fetched = iter(await self.store.get_many(refs, labels=False))
        now = await self._now()
        out = []
        for sid, meta, count, seqs in zip(stream_ids, metas, counts, newest, strict=True):
            results = [r for r in (next(fetched) for _ in seqs) if r is not None]
            if meta:  # an index entry whose description is gone is no stream (as in stream_tenant)
                out.append(self._info(sid, meta, int(count), seqs[0] if seqs else None, results, now))
        return out

    def _info(
        self,
        stream_id: str,
        meta: Mapping[Any, Any],
        count: int,
        latest: int | None,
        results: list[MaskResult],
        now: float,
    ) -> StreamInfo:
        described = StreamMeta.from_fields(meta)
        last_seen = described.last_seen
        # A crashed gateway leaves "live" behind: trust it only while frames keep arriving.
        live = (
            described.status == keys.STATUS_LIVE
            and last_seen is not None
            and now - last_seen <= self.live_window
        )
        return StreamInfo(
            stream_id=stream_id,
            device=described.device,
            tenant=described.tenant,
            status=keys.STATUS_LIVE if live else keys.STATUS_IDLE,
            width=described.width,
            height=described.height,
            fps=described.fps,
            started=described.started,
            last_seen=last_seen,
            last_seq=described.last_seq,
            trimmed_unread=described.trimmed_unread or 0,
            results=count,
            latest_result_seq=latest,
            latency=LatencySummary.of(results),
        )

    # --- results ----------------------------------------------------------------------------
    async def latest(self, stream_id: str) -> MaskResult | None:
        """The newest result of a stream; at most ``latest_ttl`` old when that cache is on."""
        return await self._latest.get(stream_id, lambda: self._read_latest(stream_id))

    async def _read_latest(self, stream_id: str) -> MaskResult | None:
        """One ZRANGE, and the whole result (label map included) only when the newest seq changed."""
        seq = await self.store.latest_seq(stream_id)
        known = self._newest.get(stream_id)
        if seq is None:
            return None
        if known is not None and known.seq == seq:
            return known
        result = await self.store.get(stream_id, seq)
        if result is not None:
            if len(self._newest) >= NEWEST_CAPACITY:
                self._newest.clear()
            self._newest[stream_id] = result
        return result

    async def results(self, stream_id: str, seqs: list[int]) -> list[MaskResult]:
        """The metadata of ``seqs`` (no label maps) in one round trip, in that order; expired
        ones are left out."""
        found = await self.store.get_many([(stream_id, seq) for seq in seqs], labels=False)
        return [result for result in found if result is not None]

    async def _seq_at_rank(self, stream_id: str, rank: int) -> int:
        found = await self.redis.zrange(keys.mask_index(stream_id), rank, rank)
        return int(text(found[0]))

    async def rank_before(self, stream_id: str, when: float) -> int:
        """How many results (oldest first) were captured before ``when``: a rank in the index."""
        low, high = 0, int(await self.redis.zcard(keys.mask_index(stream_id)))
        while low < high:
            mid = (low + high) // 2
            seq = await self._seq_at_rank(stream_id, mid)
            result = await self.store.get(stream_id, seq, labels=False)
            # An expired hash (TTL) sorts as old: retention removes the oldest first.
            if result is None or result.capture_ts < when:
                low = mid + 1
            else:
                high = mid
        return low

    async def seq_bound(self, stream_id: str, until: float) -> int | None:
        """The oldest seq captured at or after ``until`` (a ``before`` cursor), None when none is."""
        rank = await self.rank_before(stream_id, until)
        if rank >= int(await self.redis.zcard(keys.mask_index(stream_id))):
            return None
        return await self._seq_at_rank(stream_id, rank)

    async def page(
        self,
        stream_id: str,
        limit: int,
        before: int | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> tuple[list[MaskResult], int | None]:
        """Up to ``limit`` results newest first, below the ``before`` cursor and within
        [since, until); with the cursor for the next page (None on the last page)."""
        if until is not None:
            bound = await self.seq_bound(stream_id, until)
            if bound is not None:
                before = bound if before is None else min(before, bound)
        items: list[MaskResult] = []
        cursor = before
        while len(items) <= limit:
            seqs = await self.store.seqs(stream_id, before=cursor, limit=limit + 1 - len(items))
            if not seqs:
                break
            cursor = seqs[-1]
            for result in await self.results(stream_id, seqs):
                if until is not None and result.capture_ts >= until:
                    continue  # a capture clock that stepped back; rare, filtered all the same
                if since is not None and result.capture_ts < since:
                    return items[:limit], None
                items.append(result)
        if len(items) > limit:
            return items[:limit], items[limit - 1].seq
        return items, None

    async def sampled(
        self, stream_id: str, points: int, since: float | None = None, until: float | None = None
    ) -> list[MaskResult]:
        """At most ``points`` results evenly spread over [since, until), oldest first."""
        index = keys.mask_index(stream_id)
        low = await self.rank_before(stream_id, since) if since is not None else 0
        high = (
            await self.rank_before(stream_id, until)
            if until is not None
            else int(await self.redis.zcard(index))
        )
        if high <= low:
            return []
        count = high - low
        if count <= points:
            ranks = list(range(low, high))
        else:
            step = (count - 1) / (points - 1) if points > 1 else 0.0
            ranks = sorted({low + round(i * step) for i in range(points)} | {high - 1})
        pipe = self.redis.pipeline(transaction=False)
        for rank in ranks:
            pipe.zrange(index, rank, rank)
        seqs = [int(found[0]) for found in await pipe.execute() if found]
        return await self.results(stream_id, seqs)

    # --- recent frames ----------------------------------------------------------------------
    async def recent_frame(self, stream_id: str, seq: int) -> tuple[Frame | None, tuple[int, int] | None]:
        """The frame ``seq`` from the stream's frame log (its recent-frames window), and the
        (oldest, newest) seqs that window holds (None when it is empty or unreadable).

        The log is searched from its newest entry back, a page at a time, and no further than the
        first live frame older than ``seq`` (live frames are logged in seq order): an overlay of a
        recent result reads a page or two, not the whole log."""
        log = keys.stream_frames(stream_id)
        found: Frame | None = None
        seen: list[int] = []
        end = "+"
        while found is None:
            entries = await self.redis.xrevrange(log, end, "-", count=RECENT_PAGE)
            for entry_id, fields in entries or []:
                end = f"({text(entry_id)}"
                try:
                    frame = Frame.from_fields(as_fields(fields))
                except FrameFormatError:
                    continue  # one bad entry spoils only itself
                seen.append(frame.seq)
                if frame.seq == seq:
                    found = frame
                    break
            if len(entries or []) < RECENT_PAGE or (seen and min(seen) < seq):
                break
        if found is None:  # what the window holds, for the caller's message
            for _entry_id, fields in await self.redis.xrange(log, "-", "+", count=1) or []:
                with contextlib.suppress(FrameFormatError):
                    seen.append(Frame.from_fields(as_fields(fields)).seq)
        return found, (min(seen), max(seen)) if seen else None

    async def _now(self) -> float:
        """Now on Redis's clock (measured again every 30 s)."""
        await self.clock.sync_if_due(self.redis)
        return self.clock.now()

    # --- workers ----------------------------------------------------------------------------
    async def workers(self, stale_after: float) -> list[dict[str, Any]]:
        """Workers whose heartbeat is recent, with what their heartbeat hash says."""
        now = await self._now()
        found: list[Any] = await self.redis.zrangebyscore(
            keys.WORKERS_INDEX, now - stale_after, "+inf", withscores=True
        )
        names = [(text(name), float(beat)) for name, beat in found]
        pipe = self.redis.pipeline(transaction=False)
        for name, _beat in names:
            pipe.hgetall(keys.worker(name))
        out = []
        for (name, beat), fields in zip(names, await pipe.execute(), strict=True):
            info: dict[str, Any] = WorkerHeartbeat.from_fields(fields).describe()
            info["name"] = name
            info["last_heartbeat"] = beat
            out.append(info)
        return out
