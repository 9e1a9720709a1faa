"""Publishing decoded frames to Redis: the frames stream, each stream's recent frames, its metadata.

One `FramePublisher` per gateway. Sessions hand it decoded frames without waiting
(`submit`); a single task writes them in pipelined batches, so per-stream order is the order of
submission. The queue is bounded: when Redis is slow or down the oldest frames are dropped and
counted, sessions stay alive, memory stays bounded, and publishing resumes when Redis answers
again. The publisher assigns each frame its ``seq`` from a counter in Redis, the stream's
metadata hash field ``keys.M_LAST_SEQ``: one HINCRBY per stream and batch reserves the batch's
seqs before its XADDs. Seqs therefore stay unique and increasing across reconnects, gateway
restarts and gateway replicas (two replicas may briefly both publish a device's frames while one
closes a replaced session), and results, keyed by seq, never collide. A reserved seq whose frame
is not written (Redis failed mid-batch) is a gap, never reused.

The frames stream is bounded by ``frames_maxlen``, trimmed after each batch by
`flowcloud.frame_queue.FrameQueue.trim`: delivered frames go first; a frame no worker has read is
trimmed only when more than ``frames_maxlen`` of them wait, and each such frame is counted
(``flowcloud_gateway_frames_dropped_total{reason="trimmed_unread"}``, and per stream in the
stream's metadata hash, ``keys.M_TRIMMED_UNREAD``) and logged with its seqs. A backfill frame
(an edge's spooled video, `Frame.backfill`) takes a seq its live session reserved
(services.gateway.backfill) and goes to ``keys.BACKFILL_FRAMES_STREAM`` instead, bounded by
``backfill_maxlen`` and trimmed the same way (its unread frames lost to the bound counted alike).

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
from redis.exceptions import RedisError

from flowcloud import keys, stages
from flowcloud.clock import RedisClock
from flowcloud.frame_queue import FrameQueue, parse_trim
from flowcloud.frames import Frame
from flowcloud.streams import StreamMeta
from services.gateway import metrics
from services.gateway.backfill import take_backfill_seqs

log = logging.getLogger(__name__)

RECENT_MAXLEN = 64
BATCH_MAX = 64
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0


UNASSIGNED_SEQ = 0  # a queued frame's seq: the publisher assigns the real one when it writes


class FramePublisher:
    def __init__(
        self,
        redis: Redis,
        frames_maxlen: int,
        queue_max: int = 512,
        recent_maxlen: int = RECENT_MAXLEN,
        clock: RedisClock | None = None,
        backfill_maxlen: int = 10_000,
    ):
        self.redis = redis
        self.clock = clock or RedisClock(gauge=metrics.CLOCK_OFFSET)
        self.frames_maxlen = frames_maxlen
        self.backfill_maxlen = backfill_maxlen
        self.recent_maxlen = recent_maxlen
        self._queue: deque[Frame] = deque()
        self._queue_max = queue_max
        self._wakeup = asyncio.Event()
        self._meta: dict[str, dict[str, str]] = {}  # stream -> fields still to write
        self._trimmed: Counter[str] = Counter()  # stream -> unread frames trimmed, still to add to its hash
        self.queue = FrameQueue(redis)
        self.backfill_queue = FrameQueue(redis, keys.BACKFILL_FRAMES_STREAM)
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
            log.warning("publisher: %d frames left unpublished at shutdown", len(self._queue))
            metrics.drop(metrics.DROP_REDIS_UNAVAILABLE, len(self._queue))
            self._queue.clear()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

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
            try:
                await self._publish(batch)
            except (RedisError, OSError) as exc:
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
        pipe = self.redis.pipeline(transaction=False)
        published_ts = self.clock.now()
        frames = []
        for pending in batch:
            frame = replace(
                pending,
                seq=backfill_seqs[pending.stream].pop(0) if pending.backfill else seqs[pending.stream],
                capture_ts=pending.capture_ts + offset,  # this machine's clock -> Redis's
                recv_ts=pending.recv_ts + offset,
                sent_ts=pending.sent_ts + offset if pending.sent_ts is not None else None,
                decoded_ts=pending.decoded_ts + offset if pending.decoded_ts is not None else None,
                published_ts=published_ts,
            )
            entry = frame.to_fields()
            if pending.backfill:  # its own lane; not in the recent window (that is for live overlays)
                pipe.xadd(keys.BACKFILL_FRAMES_STREAM, entry)  # type: ignore[arg-type]
                continue
            frames.append(frame)  # (stage times are live frames': a spooled one waited out an outage)
            seqs[pending.stream] += 1
            pipe.xadd(keys.FRAMES_STREAM, entry)  # type: ignore[arg-type]
            pipe.xadd(
                keys.recent_frames(pending.stream),
                entry,  # type: ignore[arg-type]
                maxlen=self.recent_maxlen,
                approximate=True,
            )
        now = self.clock.now()
        for stream in seqs:
            meta.setdefault(stream, {}).update(StreamMeta(last_seen=now).to_fields())
        for stream, fields in meta.items():
            pipe.hset(keys.stream_meta(stream), mapping=fields)  # type: ignore[arg-type]
            seen = float(fields.get(keys.M_LAST_SEEN, now))
            pipe.zadd(keys.STREAMS_INDEX, {stream: seen})
            if stream in self._tenants:  # a reader's /streams reads only its tenant's index
                pipe.zadd(keys.tenant_streams(self._tenants[stream]), {stream: seen})
        trimmed, self._trimmed = self._trimmed, Counter()
        for stream, count in trimmed.items():
            pipe.hincrby(keys.stream_meta(stream), keys.M_TRIMMED_UNREAD, count)
        live = len(batch) > sum(spooled.values())  # (the trim needs the stream: a live frame made it)
        if live:
            await self.queue.trim_in(pipe, self.frames_maxlen)
        if spooled:
            await self.backfill_queue.trim_in(pipe, self.backfill_maxlen)
        try:
            replies = await pipe.execute()
        except BaseException:
            # Put the metadata back (newer updates win); frames of a failed batch are not retried.
            for stream, fields in meta.items():
                fields.pop(keys.M_LAST_SEEN, None)
                if fields:
                    self._meta[stream] = {**fields, **self._meta.get(stream, {})}
            self._trimmed.update(trimmed)
            raise
        if spooled:
            self._count_trimmed(
                parse_trim(replies.pop()).lost, self.backfill_queue.stream, self.backfill_maxlen
            )
        if live:
            self._count_trimmed(parse_trim(replies[-1]).lost, self.queue.stream, self.frames_maxlen)
        self._last_seq.update({stream: seq - 1 for stream, seq in seqs.items()})
        self.published += len(batch)
        metrics.FRAMES_PUBLISHED.inc(len(batch))
        for frame in frames:
            stages.observe(metrics.STAGE_SECONDS, stages.stamps_of(frame), stages.GATEWAY_STAGES)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)

    def _count_trimmed(self, lost: list[tuple[str, int]], queue: str, bound: int) -> None:
        """Count and log frames the stream's bound removed before any worker read them."""
        if not lost:
            return
        metrics.drop(metrics.DROP_TRIMMED_UNREAD, len(lost))
        by_stream: dict[str, list[int]] = {}
        for stream, seq in lost:
            by_stream.setdefault(stream, []).append(seq)
        self._trimmed.update({stream: len(seqs) for stream, seqs in by_stream.items()})
        self._wakeup.set()
        log.warning(
            "%s over its bound of %d unread frames: trimmed %d no worker had read (%s)",
            queue,
            bound,
            len(lost),
            "; ".join(f"{stream} seqs {seq_ranges(seqs)}" for stream, seqs in by_stream.items()),
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


def seq_ranges(seqs: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    out: list[str] = []
    start = previous = seqs[0]
    for seq in [*seqs[1:], None]:
        if seq is not None and seq == previous + 1:
            previous = seq
            continue
        out.append(str(start) if start == previous else f"{start}-{previous}")
        if seq is not None:
            start = previous = seq
    return ", ".join(out)
