"""Publishing decoded frames to Redis: each stream's frame log, the shard queues, its metadata.

One `FramePublisher` per gateway. Sessions hand it decoded frames without waiting
(`submit`); a single task writes them in pipelined batches, so per-stream order is the order of
submission. The queue is bounded: when Redis is slow or down the oldest frames are dropped and
counted, sessions stay alive, memory stays bounded, and publishing resumes when Redis answers
again. The publisher assigns each frame its ``seq`` from a counter in Redis, the stream's
metadata hash field ``keys.M_LAST_SEQ``: one HINCRBY per stream and batch reserves the batch's
seqs before its writes. Seqs therefore stay unique and increasing across reconnects, gateway
restarts and gateway replicas, and results, keyed by seq, never collide. A reserved seq whose frame
is not written (Redis failed mid-batch, or the frame was fenced off) is a gap, never reused.

Each frame's bytes are written once (flowcloud.frame_log): per batch and stream, one Lua script on
the stream's slot checks the session's lease generation (a frame of an older generation than the
stream's metadata names is not written, and counted,
``flowcloud_gateway_frames_dropped_total{reason="fenced"}``), appends the frames to the stream's
frame log (``MAXLEN ~ stream_frames_maxlen``) and stamps its last-seen time. Then a reference to
each frame (its fields without the bytes, and its log entry id) goes to the queue of the stream's
shard, ``keys.frame_shard(keys.shard_of(stream, frame_shards))``. No command touches two streams'
or two shards' keys; the pipelines are not transactions, so a cluster client splits them by node.

Each shard queue is bounded by ``frames_maxlen``, trimmed after each batch by
`flowcloud.frame_queue.FrameQueue.trim`: delivered references go first; one no worker has read is
trimmed only when more than ``frames_maxlen`` of them wait, and each such frame is counted
(``flowcloud_gateway_frames_dropped_total{reason="trimmed_unread"}``, and per stream in the
stream's metadata hash, ``keys.M_TRIMMED_UNREAD``) and logged with its seqs. A backfill frame
(an edge's spooled video, `Frame.backfill`) takes a seq its live session reserved
(services.gateway.backfill) and goes to the stream's backfill log (``backfill_maxlen``, apart from
its live frames, so a backfill burst never evicts them) and the shard's backfill lane,
``keys.backfill_shard(i)``, bounded by ``backfill_maxlen`` and trimmed the same way.

Times leave the gateway on Redis's clock (`flowcloud.clock.RedisClock`, measured with TIME every
30 s): a frame's capture and receipt times, and the stream's last-seen time, are shifted by the
offset of Redis's clock from this machine's. Workers judge frame ages and stamp results on the
same clock, so no two machines' clocks are ever compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import replace

from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from flowcloud import frame_log, keys, stages
from flowcloud.bounded_stream import Trim, parse_trim
from flowcloud.clock import RedisClock
from flowcloud.frame_queue import FrameQueue
from flowcloud.frames import Frame
from flowcloud.scripts import ScriptPipeline
from services.gateway import metrics
from services.gateway.backfill import take_backfill_seqs

log = logging.getLogger(__name__)

STREAM_FRAMES_MAXLEN = 300
BATCH_MAX = 64
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
# Redis could not take a batch: it is down, or (a cluster) its slots are not all served yet, as
# while a replica takes over (RedisClusterException is no RedisError).
REDIS_DOWN = (RedisError, RedisClusterException, OSError)


UNASSIGNED_SEQ = 0  # a queued frame's seq: the publisher assigns the real one when it writes


class FramePublisher:
    def __init__(
        self,
        redis: Redis,
        frames_maxlen: int,
        queue_max: int = 512,
        stream_frames_maxlen: int = STREAM_FRAMES_MAXLEN,
        stream_frames_ttl: int = 3600,
        clock: RedisClock | None = None,
        backfill_maxlen: int = 10_000,
        shards: int = 1,
    ):
        self.redis = redis
        self.clock = clock or RedisClock(gauge=metrics.CLOCK_OFFSET)
        self.frames_maxlen = frames_maxlen
        self.backfill_maxlen = backfill_maxlen
        self.stream_frames_maxlen = stream_frames_maxlen
        self.stream_frames_ttl = stream_frames_ttl
        self.shards = shards
        self._queue: deque[Frame] = deque()
        self._in_flight: list[Frame] = []  # the batch being written
        self._queue_max = queue_max
        self._wakeup = asyncio.Event()
        self._meta: dict[str, dict[str, str]] = {}  # stream -> fields still to write
        self._trimmed: Counter[str] = Counter()  # stream -> unread frames trimmed, still to add to its hash
        self._queues: dict[str, FrameQueue] = {}  # shard queue key -> its trimmer
        self._append = redis.register_script(frame_log.APPEND_SCRIPT)
        self._tenants: dict[str, str] = {}  # stream -> tenant, for the per-tenant stream index
        self._last_seq: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.redis_up = True
        self.published = 0

    # --- used by sessions ---------------------------------------------------------------------

    def submit(self, frame: Frame) -> None:
        """Queue a frame for publishing; never blocks (the oldest frame goes when the queue is full)."""
        if len(self._queue) >= self._queue_max:
            self._queue.popleft()
            metrics.drop(metrics.DROP_PUBLISH_BACKLOG)
        self._queue.append(frame)
        metrics.PUBLISH_QUEUE.set(len(self._queue))
        self._wakeup.set()

    def set_meta(self, stream: str, fields: dict[str, str]) -> None:
        """Fields of the stream's metadata hash (`StreamMeta.to_fields`), written with the next batch
        (retried until written)."""
        self._meta.setdefault(stream, {}).update(fields)
        if keys.M_TENANT in fields:
            self._tenants[stream] = fields[keys.M_TENANT]
        self._wakeup.set()

    def last_seq(self, stream: str) -> int:
        """The seq of the stream's last frame published by this process (0: none yet)."""
        return self._last_seq.get(stream, 0)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def close(self, timeout: float = 2.0) -> None:
        """Publish what is queued (within ``timeout``), then stop."""
        self._stopping = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            # The batch cut short (written in part at most) counts with the queue behind it.
            left = len(self._in_flight) + len(self._queue)
            log.warning("publisher: %d frames left unpublished at shutdown", left)
            metrics.drop(metrics.DROP_REDIS_UNAVAILABLE, left)
            self._in_flight = []
            self._queue.clear()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            if not self._queue and not self._meta and not self._trimmed:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(BATCH_MAX, len(self._queue)))]
            metrics.PUBLISH_QUEUE.set(len(self._queue))
            self._in_flight = batch
            try:
                await self._publish(batch)
                self._in_flight = []  # (a cancelled publish leaves it for close() to count)
            except REDIS_DOWN as exc:
                self._in_flight = []
                if batch:
                    metrics.drop(metrics.DROP_REDIS_UNAVAILABLE, len(batch))
                if self.redis_up:
                    log.warning("Redis unavailable, dropping frames until it answers: %s", exc)
                self.redis_up = False
                metrics.REDIS_UP.set(0)
                if self._stopping:
                    metrics.drop(metrics.DROP_REDIS_UNAVAILABLE, len(self._queue))
                    self._queue.clear()
                    return
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            if not self.redis_up:
                log.info("Redis answers again; publishing resumed")
            self.redis_up = True
            metrics.REDIS_UP.set(1)
            backoff = BACKOFF_MIN

    async def _publish(self, batch: list[Frame]) -> None:
        started = time.perf_counter()
        await self.clock.sync_if_due(self.redis)
        offset = self.clock.offset
        seqs = await self._reserve_seqs(Counter(f.stream for f in batch if not f.backfill))  # next of each
        spooled = Counter(f.stream for f in batch if f.backfill)
        backfill_seqs = await take_backfill_seqs(self.redis, spooled) if spooled else {}
        meta, self._meta = self._meta, {}
        published_ts = self.clock.now()
        # One append per stream, lane and lease generation (a takeover may mix two in one batch).
        appends: dict[tuple[str, bool, int], list[Frame]] = {}
        for pending in batch:
            if pending.backfill:
                seq = backfill_seqs[pending.stream].pop(0)
            else:
                seq = seqs[pending.stream]
                seqs[pending.stream] += 1
            frame = replace(
                pending,
                seq=seq,
                capture_ts=pending.capture_ts + offset,  # this machine's clock -> Redis's
                recv_ts=pending.recv_ts + offset,
                sent_ts=pending.sent_ts + offset if pending.sent_ts is not None else None,
                decoded_ts=pending.decoded_ts + offset if pending.decoded_ts is not None else None,
                published_ts=published_ts,
            )
            appends.setdefault((frame.stream, frame.backfill, frame.generation), []).append(frame)
        now = self.clock.now()
        logged = {lane: [frame.to_fields() for frame in frames] for lane, frames in appends.items()}
        scripts = ScriptPipeline(self.redis)
        for (stream, backfill, generation), entries in logged.items():
            maxlen = self.backfill_maxlen if backfill else self.stream_frames_maxlen
            last_seen = None if backfill else now
            call = frame_log.append_call(
                stream, backfill, entries, maxlen, generation, last_seen, self.stream_frames_ttl
            )
            scripts.call(self._append, *call)
        pipe = scripts.pipe
        for stream, fields in meta.items():
            pipe.hset(keys.stream_meta(stream), mapping=fields)  # type: ignore[arg-type]
        for stream in {*meta, *seqs}:
            seen = float(meta.get(stream, {}).get(keys.M_LAST_SEEN, now))
            pipe.zadd(keys.STREAMS_INDEX, {stream: seen})
            if stream in self._tenants:  # a reader's /streams reads only its tenant's index
                pipe.zadd(keys.tenant_streams(self._tenants[stream]), {stream: seen})
        trimmed, self._trimmed = self._trimmed, Counter()
        for stream, count in trimmed.items():
            pipe.hincrby(keys.stream_meta(stream), keys.M_TRIMMED_UNREAD, count)
        try:
            replies = await scripts.execute()
        except BaseException:
            # Put the metadata back (newer updates win); frames of a failed batch are not retried.
            for stream, fields in meta.items():
                if fields:
                    self._meta[stream] = {**fields, **self._meta.get(stream, {})}
            self._trimmed.update(trimmed)
            raise
        written = await self._enqueue_refs(appends, logged, replies[: len(appends)])
        self._last_seq.update({stream: seq - 1 for stream, seq in seqs.items()})
        self.published += len(written)
        metrics.FRAMES_PUBLISHED.inc(len(written))
        for frame in written:
            if not frame.backfill:  # (stage times are live frames': a spooled one waited out an outage)
                stages.observe(metrics.STAGE_SECONDS, stages.stamps_of(frame), stages.GATEWAY_STAGES)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)

    async def _enqueue_refs(
        self,
        appends: dict[tuple[str, bool, int], list[Frame]],
        logged: dict[tuple[str, bool, int], list[frame_log.Fields]],
        replies: list[object],
    ) -> list[Frame]:
        """Put a reference to each appended frame (``logged``: its log entry) on its shard's queue,
        trim the queues touched, and count the frames the lease fenced off; the frames written."""
        pipe = ScriptPipeline(self.redis)
        bounds: dict[str, int] = {}  # queue -> its bound
        written: list[Frame] = []
        for (stream, backfill, generation), reply in zip(appends, replies, strict=True):
            frames = appends[stream, backfill, generation]
            ids = frame_log.parse_append(reply)
            if ids is None:
                metrics.drop(metrics.DROP_FENCED, len(frames))
                log.info(
                    "fenced off %d frames of %s: their session (generation %d) lost the stream's lease",
                    len(frames),
                    stream,
                    generation,
                )
                continue
            shard = keys.shard_of(stream, self.shards)
            queue = keys.backfill_shard(shard) if backfill else keys.frame_shard(shard)
            bounds[queue] = self.backfill_maxlen if backfill else self.frames_maxlen
            for entry, frame_id in zip(logged[stream, backfill, generation], ids, strict=True):
                pipe.pipe.xadd(queue, frame_log.ref_fields(entry, frame_id))  # type: ignore[arg-type]
            written += frames
        for queue, bound in bounds.items():
            self._trimmer(queue).trim_in(pipe, bound)
        if not bounds:
            return written
        replies = await pipe.execute()
        for (queue, bound), reply in zip(bounds.items(), replies[-len(bounds) :], strict=True):
            self._count_trimmed(parse_trim(reply), queue, bound)
        return written

    def _trimmer(self, queue: str) -> FrameQueue:
        if queue not in self._queues:
            self._queues[queue] = FrameQueue(self.redis, queue)
        return self._queues[queue]

    def _count_trimmed(self, trim: Trim, queue: str, bound: int) -> None:
        """Count and log frames the stream's bound removed before any worker read them."""
        if not trim.lost:
            return
        metrics.drop(metrics.DROP_TRIMMED_UNREAD, len(trim.lost))
        self._trimmed.update({stream: len(seqs) for stream, seqs in trim.by_stream().items()})
        self._wakeup.set()
        log.warning(
            "%s over its bound of %d unread frames: trimmed %d no worker had read (%s)",
            queue,
            bound,
            len(trim.lost),
            trim.describe(),
        )

    async def _reserve_seqs(self, counts: Counter[str]) -> dict[str, int]:
        """The first of ``counts[stream]`` consecutive new seqs of each stream (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream, count in counts.items():
            pipe.hincrby(keys.stream_meta(stream), keys.M_LAST_SEQ, count)
        lasts = await pipe.execute()
        return {
            stream: int(last) - count + 1 for (stream, count), last in zip(counts.items(), lasts, strict=True)
        }
