"""Mask results: their fields, their lossless label-map encoding, and their store in Redis.

Writes are idempotent: a result lives at a key named by (stream, seq), so the same frame
processed twice (at-least-once delivery) leaves one result. No command or script touches keys of
two streams or of a stream and its tenant (Redis Cluster: flowcloud.keys). Retention is bounded by count
(per stream) and by age (a TTL on each result).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image
from prometheus_client import Counter

from flowcloud import keys, share_index
from flowcloud.bounded_stream import BoundedStream, parse_trim
from flowcloud.labels import LabelSet
from flowcloud.replies import text
from flowcloud.scripts import ScriptPipeline
from flowcloud.stages import durations, stamps_of

if TYPE_CHECKING:  # the edge's fallback model writes results without the redis package installed
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

PRODUCER_CLOUD = "cloud"
PRODUCER_EDGE = "edge"  # the edge's fallback model, while the cloud was unreachable
META_FIELD = "meta"  # JSON metadata of a result hash
LABELS_FIELD = "labels_png"  # the label map of a result hash

# One result, its indexes and its minute aggregate, all or nothing, and only when the frame has no
# result yet (flowcloud.share_index describes the layout): every key is of the result's stream (one
# hash tag). What lives elsewhere (its results-shard event, its tenant's memory account) follows in
# the next round trip, while its seq is in the stream's unfinished set; it leaves the set once that
# is done, so a result written again (at-least-once delivery) after a crash in between finishes it.
# KEYS: result hash, mask index, minute aggregate, class-index registry, unfinished set, then one
# class-index key per (class, level reached), in ARGV's class order.
# ARGV: meta, label PNG, ttl, seq, capture_ts, then (name, share, levels reached) per class.
# Returns 1 (new), 2 (written before, its follow-ups unconfirmed) or 0 (written and followed up).
INDEX_SCRIPT = f"""
if redis.call('HSETNX', KEYS[1], '{META_FIELD}', ARGV[1]) == 0 then
  return redis.call('SISMEMBER', KEYS[5], ARGV[4]) * 2
end
redis.call('HSET', KEYS[1], '{LABELS_FIELD}', ARGV[2])
local ttl = tonumber(ARGV[3])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[4])
local ts = ARGV[5]
local agg = KEYS[3]
redis.call('ZINCRBY', agg, 1, '{share_index.AGG_COUNT}')
redis.call('ZADD', agg, 'LT', ts, '{share_index.AGG_FIRST}')
redis.call('ZADD', agg, 'GT', ts, '{share_index.AGG_LAST}')
redis.call('EXPIRE', agg, ttl)
local k = 6
local a = 6
while a <= #ARGV do
  local name, share, reached = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  redis.call('ZINCRBY', agg, share, '{share_index.AGG_SUM}' .. name)
  redis.call('ZADD', agg, 'GT', share, '{share_index.AGG_MAX}' .. name)
  for level = 0, reached - 1 do
    redis.call('ZINCRBY', agg, 1, '{share_index.AGG_ABOVE}' .. name .. ':' .. level)
    redis.call('ZADD', KEYS[k], ts, ARGV[4] .. ':' .. share)
    redis.call('EXPIRE', KEYS[k], ttl)
    redis.call('SADD', KEYS[4], KEYS[k])
    k = k + 1
  end
  a = a + 3
end
redis.call('EXPIRE', KEYS[4], ttl)
return 1
"""
NEW, UNFINISHED = 1, 2  # replies of INDEX_SCRIPT that call for the follow-ups

# A result joins its tenant's memory account once (the member names it): KEYS: tenant's results by
# age, tenant's bytes (one tenant tag). ARGV: member, capture_ts, size.
ACCOUNT_SCRIPT = """
if redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1]) == 1 then redis.call('INCRBY', KEYS[2], ARGV[3]) end
return 1
"""

# Removes results from a tenant's memory accounting once each (concurrent evictors free each
# result's bytes once). KEYS: tenant's results by age, tenant's bytes. ARGV per result: member,
# size. Returns [results, bytes]. The results themselves are deleted before (idempotent: a crash in
# between leaves them accounted, and the next eviction picks them again).
EVICT_SCRIPT = """
local n, freed = 0, 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('DECRBY', KEYS[2], ARGV[i + 1])
    n = n + 1
    freed = freed + tonumber(ARGV[i + 1])
  end
end
return {n, freed}
"""
EVICT_CHUNK = 256  # results evicted per round trip at most
TENANT_CACHE_SECONDS = 30.0  # a stream's tenant is read again after this long

EVICTED = Counter(
    "flowcloud_results_evicted_total",
    "Results removed before their TTL, by reason: count (per-stream bound) or memory (tenant budget)",
    ["reason"],
)
EVICTED_BYTES = Counter(
    "flowcloud_results_evicted_bytes_total",
    "Bytes (metadata and label map) of the results evicted",
    ["reason"],
)
EVENTS_DROPPED = Counter(
    "flowcloud_results_events_dropped_total",
    "Result events removed from their results shard before the alert evaluators read them (those "
    "results are never evaluated for alerts), by reason: trimmed_unread (more than the shard's bound "
    "waited unread)",
    ["reason"],
)
DROP_TRIMMED_UNREAD = "trimmed_unread"
for _reason in ("count", "memory"):
    EVICTED.labels(_reason)
    EVICTED_BYTES.labels(_reason)
EVENTS_DROPPED.labels(DROP_TRIMMED_UNREAD)


def memory_member(stream: str, seq: int, size: int) -> str:
    """A result in its tenant's age index: what eviction needs without reading it."""
    return f"{stream}:{seq}:{size}"


def parse_memory_member(raw: bytes | str) -> tuple[str, int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    stream, seq, size = text.rsplit(":", 2)
    return stream, int(seq), int(size)


def memory_keys(stream: str, seq: int) -> tuple[str, str, int]:
    """An accounted result's hash, its index and its member there. An edge-made mask is accounted
    with ``seq`` = -(its capture µs): cloud seqs are never negative."""
    if seq < 0:
        return keys.edge_mask(stream, -seq), keys.edge_mask_index(stream), -seq
    return keys.mask(stream, seq), keys.mask_index(stream), seq


def encode_label_map(class_map: np.ndarray, label_set: LabelSet) -> bytes:
    """A class map as a palette PNG (lossless; viewers show the official colours)."""
    image = Image.fromarray(np.asarray(class_map, dtype=np.uint8), mode="P")
    image.putpalette(label_set.palette.ravel().tolist())
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=1)
    return out.getvalue()


def decode_label_map(png: bytes) -> np.ndarray:
    """The class map of a label PNG (palette or greyscale) as HxW uint8."""
    with Image.open(io.BytesIO(png)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"label map PNG has mode {image.mode}, expected P or L")
        return np.asarray(image, dtype=np.uint8).copy()


@dataclass
class MaskResult:
    stream: str
    seq: int
    capture_ts: float
    recv_ts: float
    infer_start: float
    infer_end: float
    persisted_ts: float
    model: str
    model_version: str
    label_set: str
    width: int
    height: int
    shares: dict[int, float] = field(default_factory=dict)  # class id -> fraction of pixels
    labels_png: bytes = b""
    backfill: bool = False  # the frame came through the backfill lane (spooled during an outage)
    producer: str = PRODUCER_CLOUD  # who made the mask: the cloud's workers, or the edge's fallback
    # The other stage stamps (flowcloud.stages); None on results of older services.
    sent_ts: float | None = None
    decoded_ts: float | None = None
    published_ts: float | None = None
    read_ts: float | None = None

    @property
    def latency(self) -> float:
        """Capture to persisted, in seconds (both on Redis's clock: `flowcloud.clock`)."""
        return self.persisted_ts - self.capture_ts

    def stages(self) -> dict[str, float | None]:
        """Seconds spent in each stage from capture to persisted (`flowcloud.stages.STAGES`)."""
        return durations(stamps_of(self))

    def metadata(self) -> dict[str, Any]:
        """Everything but the PNG, JSON-ready, with the derived latency and stages."""
        meta = asdict(self)
        del meta["labels_png"]
        meta["shares"] = {str(k): v for k, v in self.shares.items()}
        meta["latency"] = self.latency
        meta["stages"] = self.stages()
        return meta

    def to_fields(self) -> dict[str, str | bytes]:
        meta = self.metadata()
        del meta["latency"], meta["stages"]
        return {META_FIELD: json.dumps(meta), LABELS_FIELD: self.labels_png}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> MaskResult:
        """A result from its hash; without the label-map field, ``labels_png`` is empty."""
        meta = json.loads(fields[META_FIELD.encode()])
        meta["shares"] = {int(k): float(v) for k, v in meta["shares"].items()}
        return cls(**meta, labels_png=fields.get(LABELS_FIELD.encode(), b""))


class MaskStore:
    """Results in Redis: a hash per frame, a per-stream index sorted by sequence number, and the
    class-share indexes of ``flowcloud.share_index``; an event per new result on the results shard
    of its stream (``results_shards``: the gateways' and workers' ``frame_shards``), each shard
    bounded by ``events_maxlen`` for the alert evaluators' group (flowcloud.bounded_stream: events
    they have not read are trimmed only beyond the bound, and then counted; without the group, as
    before any evaluator ran, the shard is trimmed plainly)."""

    def __init__(
        self,
        redis: Redis,
        max_per_stream: int = 10_000,
        ttl_seconds: int = 24 * 3600,
        tenant_max_bytes: int = 0,
        results_shards: int = 1,
        events_maxlen: int = share_index.RESULTS_STREAM_MAXLEN,
    ) -> None:
        self.redis = redis
        self.max_per_stream = max_per_stream
        self.ttl_seconds = ttl_seconds
        self.tenant_max_bytes = tenant_max_bytes  # 0: no memory budget
        self.results_shards = results_shards
        self.events_maxlen = events_maxlen
        self._index = redis.register_script(INDEX_SCRIPT)
        self._account = redis.register_script(ACCOUNT_SCRIPT)
        self._evict = redis.register_script(EVICT_SCRIPT)
        self._tenants: dict[str, tuple[float, str | None]] = {}
        self._shards: dict[str, BoundedStream] = {}  # results shard key -> its bound

    async def put_many(self, results: list[MaskResult]) -> int:
        """Persist and index results, then write their events and memory accounts, then mark them
        finished: three round trips (one per node on a cluster) whatever their number; then trim
        each touched stream to its bound. A frame that already has a result keeps it (at-least-once
        delivery writes the same frame again). Returns how many results were new."""
        if not results:
            return 0
        tenants = await self._tenants_of({r.stream for r in results}) if self.tenant_max_bytes else {}
        pipe = ScriptPipeline(self.redis)
        sizes = []
        for result in results:
            fields = result.to_fields()
            sizes.append(sum(len(v) for v in fields.values()))
            script_keys, args = share_index.index_call(
                result.stream,
                result.seq,
                result.capture_ts,
                result.label_set,
                result.shares,
                fields,
                self.ttl_seconds,
            )
            pipe.call(self._index, script_keys, args)
        streams = sorted({r.stream for r in results})
        for stream in streams:  # the index sizes in the same round trip: trimming is rarely needed
            pipe.pipe.zcard(keys.mask_index(stream))
        answers = await pipe.execute()
        replies, counts = [int(r) for r in answers[: len(results)]], answers[len(results) :]
        unfinished = [
            (r, size)
            for r, size, reply in zip(results, sizes, replies, strict=True)
            if reply in (NEW, UNFINISHED)
        ]
        if unfinished:
            await self._follow_up(unfinished, tenants)
            done = self.redis.pipeline(transaction=False)
            for stream in sorted({r.stream for r, _size in unfinished}):  # a redelivery changes nothing now
                done.srem(
                    keys.unfinished_results(stream), *(r.seq for r, _size in unfinished if r.stream == stream)
                )
            await done.execute()
        for stream, count in zip(streams, counts, strict=True):
            if int(count) > self.max_per_stream:
                await self._trim(stream, int(count) - self.max_per_stream, tenants.get(stream))
        for tenant in sorted({t for t in tenants.values() if t is not None}):
            await self.enforce_budget(tenant)
        return sum(1 for reply in replies if reply == NEW)

    async def _follow_up(self, written: list[tuple[MaskResult, int]], tenants: dict[str, str | None]) -> None:
        """What a result writes outside its stream's slot: its event on the results shard (each
        shard touched then trimmed to its bound, in the same round trip) and, with a memory budget,
        its tenant's account (once, whatever the retries)."""
        pipe = ScriptPipeline(self.redis)
        shards: list[str] = []
        for result, size in written:
            shard = keys.results_shard(keys.shard_of(result.stream, self.results_shards))
            if shard not in shards:
                shards.append(shard)
            event = share_index.result_event(
                result.stream, result.seq, result.capture_ts, result.label_set, result.shares
            )
            pipe.pipe.xadd(shard, event)  # type: ignore[arg-type]
            tenant = tenants.get(result.stream)
            if tenant is not None:
                member = memory_member(result.stream, result.seq, size)
                account = [keys.tenant_memory(tenant), keys.tenant_usage(tenant)]
                pipe.call(self._account, account, [member, repr(result.capture_ts), size])
        for shard in shards:
            self._shard(shard).trim_in(pipe, self.events_maxlen)
        replies = await pipe.execute()
        for shard, reply in zip(shards, replies[-len(shards) :], strict=True):
            trim = parse_trim(reply)
            if trim.lost:
                EVENTS_DROPPED.labels(DROP_TRIMMED_UNREAD).inc(len(trim.lost))
                log.warning(
                    "%s over its bound of %d unread result events: trimmed %d no alert evaluator had "
                    "read, never evaluated for alerts (%s)",
                    shard,
                    self.events_maxlen,
                    len(trim.lost),
                    trim.describe(),
                )

    def _shard(self, shard: str) -> BoundedStream:
        if shard not in self._shards:
            fields = (keys.R_STREAM, keys.R_SEQ)
            # Where no evaluator ever ran, nobody is owed the events: plain trimming, no group made.
            bounded = BoundedStream(self.redis, shard, keys.ALERTS_GROUP, fields, create_group=False)
            self._shards[shard] = bounded
        return self._shards[shard]

    async def _tenants_of(self, streams: set[str]) -> dict[str, str | None]:
        """Each stream's tenant (as the gateway describes it), cached for TENANT_CACHE_SECONDS."""
        now = time.monotonic()
        stale = sorted(s for s in streams if self._tenants.get(s, (0.0, None))[0] <= now)
        if stale:
            pipe = self.redis.pipeline(transaction=False)
            for stream in stale:
                pipe.hget(keys.stream_meta(stream), keys.M_TENANT)
            for stream, raw in zip(stale, await pipe.execute(), strict=True):
                tenant = text(raw) if raw is not None else None
                self._tenants[stream] = (now + TENANT_CACHE_SECONDS, tenant)
        return {s: self._tenants[s][1] for s in streams}

    async def tenant_usage(self, tenant: str) -> int:
        """Bytes of the tenant's results, as accounted while a budget is set."""
        return int(await self.redis.get(keys.tenant_usage(tenant)) or 0)

    async def enforce_budget(self, tenant: str) -> int:
        """Evict the tenant's oldest results until its bytes fit the budget; how many went."""
        evicted = 0
        while (usage := await self.tenant_usage(tenant)) > self.tenant_max_bytes:
            oldest = cast(
                list[tuple[bytes, float]],
                await self.redis.zrange(keys.tenant_memory(tenant), 0, EVICT_CHUNK - 1, withscores=True),
            )
            if not oldest:
                await self.redis.set(keys.tenant_usage(tenant), 0)  # nothing left to account for
                break
            chosen, freeing = [], 0
            for member, _score in oldest:
                chosen.append(member)
                freeing += parse_memory_member(member)[2]
                if usage - freeing <= self.tenant_max_bytes:
                    break
            count, _freed = await self._evict_members(tenant, chosen, "memory")
            await self._trim_indexes({parse_memory_member(m)[0]: s for m, s in oldest[: len(chosen)]})
            evicted += count
        return evicted

    async def _evict_members(self, tenant: str, members: list[bytes], reason: str) -> tuple[int, int]:
        """Delete the results (each command on one stream's keys), then free their bytes from the
        tenant's account once; (results, bytes) freed by this call."""
        pipe = self.redis.pipeline(transaction=False)
        args: list[bytes | str | int] = []
        for member in members:
            stream, seq, size = parse_memory_member(member)
            result_key, index, index_member = memory_keys(stream, seq)
            pipe.delete(result_key)
            pipe.zrem(index, index_member)
            args += [member, size]
        await pipe.execute()
        count, freed = await self._evict(
            keys=[keys.tenant_memory(tenant), keys.tenant_usage(tenant)], args=args
        )
        EVICTED.labels(reason).inc(int(count))
        EVICTED_BYTES.labels(reason).inc(int(freed))
        return int(count), int(freed)

    async def _trim_indexes(self, cutoffs: dict[str, float]) -> None:
        """Drop class-index entries captured at or before each stream's cutoff."""
        pipe = self.redis.pipeline(transaction=False)
        streams = sorted(cutoffs)
        for stream in streams:
            pipe.smembers(keys.class_indexes(stream))
        registries = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for stream, class_keys in zip(streams, registries, strict=True):
            for class_key in class_keys:
                pipe.zremrangebyscore(class_key, "-inf", cutoffs[stream])
        await pipe.execute()

    async def _trim(self, stream: str, excess: int, tenant: str | None = None) -> None:
        """Delete the stream's ``excess`` oldest results (and their bytes from the tenant's
        account), and their class-index entries (by capture time: up to the newest one deleted)."""
        index = keys.mask_index(stream)
        old = cast(list[bytes], await self.redis.zrange(index, 0, excess - 1))
        if not old:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.mask(stream, int(old[-1])), META_FIELD)
        for seq in old:
            pipe.hstrlen(keys.mask(stream, int(seq)), META_FIELD)
            pipe.hstrlen(keys.mask(stream, int(seq)), LABELS_FIELD)
        newest_meta, *sizes = await pipe.execute()
        if tenant is not None:  # deletes them and counts what it frees
            members = [
                memory_member(stream, int(seq), int(meta) + int(png))
                for seq, meta, png in zip(old, sizes[0::2], sizes[1::2], strict=True)
            ]
            await self._evict_members(tenant, [m.encode() for m in members], "count")
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(*(keys.mask(stream, int(seq)) for seq in old))  # one stream: one slot
            pipe.zrem(index, *old)
            await pipe.execute()
            EVICTED.labels("count").inc(len(old))
            EVICTED_BYTES.labels("count").inc(sum(int(n) for n in sizes))
        if newest_meta is not None:  # else expired already: its index entries go with their keys' TTL
            await self._trim_indexes({stream: float(json.loads(newest_meta)["capture_ts"])})

    async def get(self, stream: str, seq: int, labels: bool = True) -> MaskResult | None:
        (result,) = await self.get_many([(stream, seq)], labels)
        return result

    async def get_many(self, refs: Sequence[tuple[str, int]], labels: bool = True) -> list[MaskResult | None]:
        """Results of (stream, seq) pairs in one round trip, in order; None where there is none.

        With ``labels=False`` only the metadata is read (``labels_png`` is empty): listings and
        statistics need no label maps, which are most of a result's bytes.
        """
        if not refs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for stream, seq in refs:
            if labels:
                pipe.hgetall(keys.mask(stream, seq))
            else:
                pipe.hget(keys.mask(stream, seq), META_FIELD)
        out: list[MaskResult | None] = []
        for reply in await pipe.execute():
            if not reply:
                out.append(None)
            elif labels:
                out.append(MaskResult.from_fields(reply))
            else:
                out.append(MaskResult.from_fields({META_FIELD.encode(): reply}))
        return out

    async def put_edge(self, result: MaskResult) -> None:
        """Persist a mask the edge made, keyed by its capture time: it stays beside any cloud result
        of the same frame (neither overwrites the other), bounded like the cloud's: by count per
        stream, and with a memory budget in its tenant's account, oldest results (either kind) first."""
        micros = round(result.capture_ts * 1_000_000)
        index = keys.edge_mask_index(result.stream)
        fields = result.to_fields()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.edge_mask(result.stream, micros), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(keys.edge_mask(result.stream, micros), self.ttl_seconds)
        pipe.zadd(index, {str(micros): result.capture_ts})
        pipe.zcard(index)
        size = int((await pipe.execute())[-1])
        tenant = (await self._tenants_of({result.stream}))[result.stream] if self.tenant_max_bytes else None
        if tenant is not None:  # once per mask: a resent one is the same member
            size_bytes = sum(len(v) for v in fields.values())
            member = memory_member(result.stream, -micros, size_bytes)
            account = [keys.tenant_memory(tenant), keys.tenant_usage(tenant)]
            await self._account(keys=account, args=[member, repr(result.capture_ts), size_bytes])
        if size > self.max_per_stream:
            old = cast(list[bytes], await self.redis.zrange(index, 0, size - self.max_per_stream - 1))
            pipe = self.redis.pipeline(transaction=False)
            for micros_old in old:
                for name in (META_FIELD, LABELS_FIELD):
                    pipe.hstrlen(keys.edge_mask(result.stream, int(micros_old)), name)
            sizes = await pipe.execute()
            if tenant is not None:  # deletes them, takes them out of the account and counts them
                members = [
                    memory_member(result.stream, -int(m), int(meta) + int(png))
                    for m, meta, png in zip(old, sizes[0::2], sizes[1::2], strict=True)
                ]
                await self._evict_members(tenant, [m.encode() for m in members], "count")
            else:
                pipe = self.redis.pipeline(transaction=False)
                pipe.delete(*(keys.edge_mask(result.stream, int(m)) for m in old))  # one stream: one slot
                pipe.zrem(index, *old)
                await pipe.execute()
                EVICTED.labels("count").inc(len(old))
                EVICTED_BYTES.labels("count").inc(sum(int(n) for n in sizes))
        if tenant is not None:
            await self.enforce_budget(tenant)

    async def edge_masks(self, stream: str, limit: int = 50) -> list[MaskResult]:
        """The newest masks the edge made (metadata only), newest first."""
        found = cast(list[bytes], await self.redis.zrevrange(keys.edge_mask_index(stream), 0, limit - 1))
        pipe = self.redis.pipeline(transaction=False)
        for micros in found:
            pipe.hget(keys.edge_mask(stream, int(micros)), META_FIELD)
        return [MaskResult.from_fields({META_FIELD.encode(): m}) for m in await pipe.execute() if m]

    async def latest_seq(self, stream: str) -> int | None:
        newest = cast(list[bytes], await self.redis.zrange(keys.mask_index(stream), -1, -1))
        return int(newest[0]) if newest else None

    async def seqs(self, stream: str, before: int | None = None, limit: int = 50) -> list[int]:
        """Sequence numbers newest first, strictly below ``before`` when given (cursor paging)."""
        high = f"({before}" if before is not None else "+inf"
        found = cast(
            list[bytes],
            await self.redis.zrevrangebyscore(keys.mask_index(stream), high, "-inf", start=0, num=limit),
        )
        return [int(s) for s in found]
