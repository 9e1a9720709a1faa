"""The segmentation worker: read frames from the consumer group of every shard queue, schedule them
into batches, infer, persist, acknowledge.

These tasks run concurrently:

    readers  one per shard queue (``keys.frame_shard(i)``, i < ``frame_shards``): XREADGROUP (or
             XAUTOCLAIM) whatever has arrived on its queue, blocking up to ``poll_ms`` on that
             queue alone, fetch the frames' bytes from their streams' frame logs
             (services.worker.recovery.load_entries), judge each frame, queue it per stream
             (services.worker.scheduler); a busy shard cannot starve another, as each has its own
             reader and the scheduler is fair across streams. Realtime mode reads eagerly so that
             it sees each stream's newest frame, complete mode only while the queue has room
    runner   when the model is free: form a batch from the queue (fair across streams, newest
             first and deadline-checked in realtime mode, sized to the model's measured time),
             decode it in a thread pool, judge it again, run the model on its dedicated thread,
             then hand it to a persist task (palette PNGs and class shares in the pool,
             MaskStore.put_many, XACK) that overlaps the next batch's inference

A batch is formed only when the model can start it, so no batch waits behind another: a frame
waits in the queue, where it is judged again for every batch, never in a hand-off. In realtime
mode a frame is judged when read, when a batch forms, right before the model runs (each time
with the forecast of what is left: services.worker.batchtime) and once more when its result is
stamped persisted; at each point a frame that cannot be, or was not, persisted within
``max_frame_age`` of its capture is acknowledged and counted, never persisted. On SIGTERM the
reader stops and the runner finishes what is queued.

Spare room in a batch (and an idle model) goes to the backfill lane (services.worker.backfill):
frames edges spooled during an outage, at most half a batch, only as many as let the batch's live
frames still make their deadlines. They are never dropped for age (`FramePolicy.can_make`), their
results are marked ``backfill``, and they are acknowledged on their own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowcloud import keys, redis_client, stages
from flowcloud.clock import RedisClock
from flowcloud.frame_queue import ensure_group, ensure_groups, live_queues
from flowcloud.inference import Segmenter, SegmenterOptions
from flowcloud.labels import LabelSet, class_shares
from flowcloud.percentile import percentile
from flowcloud.results import MaskResult, MaskStore, encode_label_map
from flowcloud.settings import WorkerSettings
from flowcloud.sizes import parse_size
from flowcloud.zoo import load_model

from . import metrics
from .backfill import BackfillLane
from .batchtime import BatchTime
from .lifecycle import DRAINING, READY, WARMING, Heartbeat, default_name
from .policy import (
    DROP_REASONS,
    LATE_AFTER_INFERENCE,
    QUEUE_FULL,
    STALE_BEFORE_INFERENCE,
    STALE_IN_QUEUE,
    STALE_ON_READ,
    FramePolicy,
)
from .recovery import Entry, Recovery, load_entries
from .scheduler import FrameQueue, Queued

log = logging.getLogger(__name__)

T = TypeVar("T")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
BATCH_TIMES_KEPT = 200
CLAIM_IDLE_OVER_P99 = 4  # batch times are measured from the read of a batch's oldest frame to its ack
BATCH_BUDGET_SHARE = 1 / 3  # realtime: a batch waited for, its own, and room for noise fit the bound
READ_COUNT = 64  # realtime: entries one XREADGROUP takes at most
DROP_LOG_INTERVAL = 5.0  # seconds between log lines about dropped frames


@dataclass
class Group:
    """Same-sized decoded frames, stacked for one forward pass."""

    entries: list[Entry]
    tensor: torch.Tensor
    maps: np.ndarray | None = None
    infer_start: float = 0.0
    infer_end: float = 0.0


@dataclass
class Batch:
    read_at: float  # monotonic: when its oldest frame was read
    pixels: float  # the frames' pixels as formed (what the forecast was asked about)
    model_start: float = 0.0  # perf_counter
    groups: list[Group] = field(default_factory=list)
    dropped: list[tuple[Entry, str]] = field(default_factory=list)  # entry, reason
    failed: list[tuple[Entry, str, str]] = field(default_factory=list)  # entry, stage, error


def segmenter_options(s: WorkerSettings) -> SegmenterOptions:
    """How a worker runs its model: compiled graphs want one static batch shape; on a GPU eager
    batches are padded to a few sizes that cudnn.benchmark tunes during the warm-up."""
    return SegmenterOptions(
        device=s.device,
        size=parse_size(s.input_size) if s.input_size else None,
        precision=s.precision,
        channels_last=s.channels_last,
        compile=s.compile_mode if s.compile else None,
        static_batch=s.batch_size if s.compile else None,
        bucket_batches=s.batch_size if s.device.startswith("cuda") and not s.compile else None,
    )


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        redis: Redis | None = None,
        segmenter: Segmenter | None = None,
        clock: RedisClock | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name or default_name()
        self.redis = redis or redis_client.connect_async(
            settings.redis_url, settings.redis_cluster, socket_connect_timeout=5, socket_keepalive=True
        )
        self.queues = live_queues(settings.frame_shards)
        self.policy = FramePolicy(settings.mode, settings.max_frame_age)
        # Frame ages and result times on Redis's clock, as the gateway's are (flowcloud.clock).
        self.clock = clock or RedisClock(gauge=metrics.CLOCK_OFFSET)
        self.store = MaskStore(
            self.redis,
            settings.results_max_per_stream,
            settings.results_ttl,
            settings.results_tenant_max_bytes,
            results_shards=settings.frame_shards,
            events_maxlen=settings.results_events_maxlen,
        )
        self.recovery = Recovery(self.redis, self.name, settings.max_attempts, settings.dead_letter_maxlen)
        self.backfill = BackfillLane(self.redis, self.name, settings.frame_shards)
        self.stop = asyncio.Event()
        self.ready = False
        self.segmenter = segmenter  # built from the settings by start() unless given
        self.cpu_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="frames")
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")  # every model call: one thread
        self.heartbeat = Heartbeat(
            self.redis,
            self.name,
            settings.heartbeat_interval,
            static={
                "device": settings.device,
                "precision": settings.precision,
                "batch_size": settings.batch_size,
                "mode": settings.mode,
            },
            clock=self.clock,
            shards=settings.frame_shards,
        )
        self.batch_times: deque[float] = deque(maxlen=BATCH_TIMES_KEPT)
        self.queue = FrameQueue(self.policy, settings.max_queued_frames)
        self.prepare_time = BatchTime()  # forming a batch to the model's start: decode, judge, stack
        self.run_time = BatchTime()  # the model's start to the results persisted
        self.processed = 0
        self._next_claim = dict.fromkeys(self.queues, 0.0)  # queue -> when its next claim is due
        self._warmup_pixels = float(math.prod(parse_size(settings.warmup_size)))
        self._reading = False
        self._arrived = asyncio.Event()  # the reader queued frames, or stopped
        self._room = asyncio.Event()  # the runner took frames from the queue
        self._dropped_unlogged: dict[str, int] = {}
        self._next_drop_log = 0.0

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        """Load, warm up, serve until SIGTERM/SIGINT, drain. 0 on a clean drain, 1 if it timed out."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        beating = asyncio.create_task(self._beat_forever())
        try:
            await self._unless_stopped(
                self._retry_redis(
                    lambda: ensure_groups(self.redis, self.settings.frame_shards),
                    "create the consumer groups",
                )
            )
            if not self.stop.is_set():
                await self.start()
            if self.stop.is_set():
                return 0
            return await self.serve()
        finally:
            beating.cancel()
            await self.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def close(self) -> None:
        """Leave the worker index (and the group, when nothing is pending), release Redis and threads."""
        self.ready = False
        metrics.READY.set(0)
        await self.heartbeat.leave()
        await self.redis.aclose()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.infer_pool.shutdown(wait=False, cancel_futures=True)

    def request_stop(self) -> None:
        if not self.stop.is_set():
            log.info(
                "stop requested: finishing the batches in flight (deadline %.0fs)",
                self.settings.drain_timeout,
            )
            self.stop.set()

    async def start(self) -> None:
        """Load the model and run one full batch through it; only then is the worker ready."""
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        loop = asyncio.get_running_loop()
        if self.segmenter is None:
            self.segmenter = await loop.run_in_executor(self.infer_pool, self._load)
        if self.stop.is_set():
            return  # stopped while loading: no warm-up
        info = self.segmenter.loaded.info
        await self._sync_clock()  # before the first stamp; the heartbeat keeps it fresh from then on
        self.heartbeat.static = {
            **self.heartbeat.static,
            "model": info.name,
            "model_version": info.version,
            "started": self.clock.now(),
        }
        self.heartbeat.state = WARMING
        await self.heartbeat.beat()
        started = time.perf_counter()
        last_pass = await loop.run_in_executor(self.infer_pool, self._warm_up)
        self.batch_times.append(last_pass)  # the first estimate of a batch's time, before any real batch
        self.run_time.add(s.batch_size * self._warmup_pixels, last_pass, provisional=True)
        log.info("model warmed up in %.2fs (a batch: %.3fs); ready", time.perf_counter() - started, last_pass)
        self.ready = True
        metrics.READY.set(1)
        self.heartbeat.state = READY
        await self.heartbeat.beat()

    def _load(self) -> Segmenter:
        s = self.settings
        loaded = load_model(s.model, s.weights, s.label_set, s.random_weights)
        segmenter = Segmenter(loaded, segmenter_options(s))
        log.info(
            "model %s (version %s, %s) from %s on %s, %s",
            loaded.info.name,
            loaded.info.version,
            loaded.label_set.name,
            loaded.source,
            s.device,
            s.precision,
        )
        return segmenter

    def _warm_up(self) -> float:
        """Run the model until compiled and tuned; the seconds the last full batch took."""
        segmenter = self.segmenter
        assert segmenter is not None
        height, width = parse_size(self.settings.warmup_size)
        full = self.settings.batch_size
        if segmenter.device.type == "cuda":
            # cudnn.benchmark tunes each new shape on first sight: every padded batch size now,
            # rather than on live frames after reporting ready.
            for count in segmenter.batch_shapes(full):
                segmenter.predict_tensor(torch.zeros((count, height, width, 3), dtype=torch.uint8)).cpu()
        took = 0.0
        for _ in range(2 if segmenter.device.type == "cuda" else 1):  # compile and capture graphs
            started = time.perf_counter()
            segmenter.predict_tensor(torch.zeros((full, height, width, 3), dtype=torch.uint8)).cpu()
            took = time.perf_counter() - started
        return took

    async def serve(self) -> int:
        pipeline = asyncio.create_task(self._pipeline())
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({pipeline, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if pipeline.done():
            stopping.cancel()
            pipeline.result()  # a crashed stage raises here
            return 0
        self.ready = False
        metrics.READY.set(0)
        self.heartbeat.state = DRAINING
        await self.heartbeat.beat()
        try:
            async with asyncio.timeout(self.settings.drain_timeout):
                await pipeline
        except TimeoutError:
            log.error("drain deadline passed; unfinished frames stay pending for other workers")
            return 1
        log.info("drained: %d frames processed in all", self.processed)
        return 0

    async def _beat_forever(self) -> None:
        while True:
            self.heartbeat.stats = {
                "frames_processed": self.processed,
                "p99_batch_seconds": self.p99_batch_time(),
            }
            await self.heartbeat.beat()
            await asyncio.sleep(self.settings.heartbeat_interval)

    # --- the pipeline -----------------------------------------------------------------------
    @property
    def budget(self) -> float | None:
        """Realtime: the seconds one batch may take. A frame that arrives as a batch starts waits for
        it, then rides the next: two batch times, and room for reading and noise, fit the bound."""
        return self.policy.max_age * BATCH_BUDGET_SHARE if self.policy.realtime else None

    def forecast(self, pixels: float) -> float:
        """Seconds from forming a batch of ``pixels`` to its results persisted."""
        return self.prepare_time.predict(pixels) + self.run_time.predict(pixels)

    def batch_limit(self) -> int:
        """The configured batch size, or fewer frames (of the queue's mean size) if more would not
        fit the budget of one batch at the model's measured speed."""
        limit = self.settings.batch_size
        budget = self.budget
        pixels = self.queue.mean_pixels() or self._warmup_pixels
        while budget is not None and limit > 1 and self.forecast(limit * pixels) > budget:
            limit -= 1
        metrics.BATCH_LIMIT.set(limit)
        return limit

    async def _pipeline(self) -> None:
        self._reading = True
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._read_frames())
            tasks.create_task(self._run_batches())

    async def _read_frames(self) -> None:
        try:
            async with asyncio.TaskGroup() as readers:
                for queue in self.queues:
                    readers.create_task(self._read_queue(queue))
        finally:
            self._reading = False
            self._arrived.set()

    async def _read_queue(self, queue: str) -> None:
        """Read one shard queue until stopped."""
        while not self.stop.is_set():
            count = self._read_count()
            if count < 1:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.poll_ms / 1000):
                        await self._room.wait()
                continue
            try:
                entries = await self._next_entries(queue, count)
            except REDIS_DOWN as exc:
                await self._redis_down(exc)
                continue
            except ResponseError as exc:
                # NOGROUP, or UNBLOCKED: the queue went away while a read waited on it.
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                log.warning("consumer group missing on %s (Redis lost its data?): creating it again", queue)
                await self._retry_redis(
                    functools.partial(ensure_group, self.redis, queue), "create the group"
                )
                continue
            if entries:
                await self._admit(entries)

    def _intake_limit(self) -> int:
        """Complete mode reads ahead two batches at most: the rest stays in Redis for other workers."""
        return 2 * self.settings.batch_size

    def _read_count(self) -> int:
        """Entries one read of a queue takes at most. Complete mode: a fair share of the room left
        (the shards' reads in flight may overfill the read-ahead by less than one more of it)."""
        if self.policy.realtime:
            return max(READ_COUNT, self.settings.batch_size)
        share = max(1, -(-self._intake_limit() // len(self.queues)))
        return min(share, self._intake_limit() - len(self.queue))

    async def _next_entries(self, queue: str, count: int) -> list[Entry]:
        """Reclaimed idle frames of ``queue`` when a claim is due and finds some, else the frames
        that arrived on it."""
        now = time.monotonic()
        if now >= self._next_claim[queue] or not self.recovery.scan_complete(queue):
            claimed = await self.recovery.claim(queue, self.claim_idle_ms(), self.settings.batch_size)
            if self.recovery.scan_complete(queue):
                self._next_claim[queue] = now + min(max(self.claim_idle_ms() / 2000, 0.1), 5.0)
            if claimed:
                return claimed
        return await self._read(queue, self.settings.poll_ms, count)

    async def _read(self, queue: str, block_ms: int, count: int) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            keys.WORKER_GROUP, self.name, {queue: ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        raw = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return await load_entries(self.redis, queue, raw)

    async def _sync_clock(self) -> None:
        try:
            await self.clock.sync_if_due(self.redis)
        except REDIS_DOWN as exc:  # keep the last offset; the read that follows reports the outage
            log.debug("clock sync with Redis failed: %s", exc)

    async def _admit(self, entries: list[Entry]) -> None:
        """Judge frames as they are read: malformed ones fail, those that cannot be persisted in time
        even alone are dropped, the rest are queued."""
        now = self.clock.now()  # kept measured by the heartbeat (RedisClock.sync_if_due)
        read_at = time.monotonic()
        stale, evicted = [], []
        for entry in entries:
            frame = entry.frame
            if frame is None:
                metrics.FRAMES_FAILED.labels("parse").inc()
                await self._retry_redis(
                    functools.partial(self.recovery.fail, entry, entry.error or "malformed entry"),
                    "record a failure",
                )
            elif not self.policy.can_make(frame, now, self.forecast(frame.width * frame.height)):
                stale.append(entry)
            else:
                entry.read_ts = now  # flowcloud.stages: read
                evicted += self.queue.push(entry, read_at)
        metrics.QUEUED.set(len(self.queue))
        self._arrived.set()
        await self._drop(stale, STALE_ON_READ)
        await self._drop(evicted, QUEUE_FULL)

    async def _run_batches(self) -> None:
        persisting: asyncio.Task[None] | None = None
        try:
            while True:
                if not self.queue:
                    if not self._reading:
                        break
                    spare = await self._backfill_room([], self.batch_limit())  # the model is idle
                    if not spare:
                        self._arrived.clear()
                        with contextlib.suppress(TimeoutError):  # the backfill lane is polled meanwhile
                            async with asyncio.timeout(self.settings.poll_ms / 1000):
                                await self._arrived.wait()
                        continue
                    items = spare
                else:
                    await self._fill()
                    limit = self.batch_limit()
                    taken = self.queue.take(self.clock.now(), limit, self.forecast, self.budget)
                    metrics.QUEUED.set(len(self.queue))
                    self._room.set()
                    await self._drop(taken.expired, STALE_IN_QUEUE)
                    if not taken.batch:
                        continue
                    items = taken.batch + await self._backfill_room(taken.batch, limit)
                batch = await self._prepare(items)
                await self._infer(batch)
                if persisting is not None:
                    await persisting  # one persist in flight: it overlaps this batch's inference
                persisting = asyncio.create_task(self._persist(batch))
        except BaseException:  # cancelled at the drain deadline, or crashed: the persist goes too
            if persisting is not None:
                persisting.cancel()
            raise
        if persisting is not None:
            await persisting

    async def _backfill_room(self, live: list[Queued], limit: int) -> list[Queued]:
        """Backfill frames for a batch's spare room: at most half a batch, and no more than leave
        every live frame of the batch (judged again) its deadline."""
        if self.stop.is_set():
            return []
        now = self.clock.now()
        pixels = sum(item.pixels for item in live)
        each = pixels / len(live) if live else self.queue.mean_pixels() or self._warmup_pixels
        room = min(limit - len(live), max(1, limit // 2))
        while room > 0 and live and not self._room_fits(live, now, self.forecast(pixels + room * each)):
            room -= 1
        if room < 1:
            return []
        try:
            entries = await self.backfill.read(room)
        except REDIS_DOWN as exc:
            log.debug("backfill lane unreadable: %s", exc)
            return []
        read_at = time.monotonic()
        spare = []
        for entry in entries:
            if entry.frame is None:
                metrics.FRAMES_FAILED.labels("parse").inc()
                await self._retry_redis(
                    functools.partial(self.recovery.fail, entry, entry.error or "malformed entry"),
                    "record a failure",
                )
            else:
                spare.append(Queued(entry, read_at, float(entry.frame.width * entry.frame.height)))
        return spare

    def _room_fits(self, live: list[Queued], now: float, needed: float) -> bool:
        budget = self.budget
        if budget is not None and needed > budget:
            return False
        return all(i.entry.frame is None or self.policy.can_make(i.entry.frame, now, needed) for i in live)

    async def _fill(self) -> None:
        """Wait for a fuller batch until the oldest queued frame has waited ``batch_timeout_ms``."""
        oldest = self.queue.oldest_read_at()
        if oldest is None:
            return
        until = oldest + self.settings.batch_timeout_ms / 1000
        while self._reading and len(self.queue) < self.batch_limit():
            left = until - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._arrived.wait()

    async def _prepare(self, items: list[Queued]) -> Batch:
        """Decode the batch in parallel, judge it right before the model runs (what is left to do
        must still fit), stack each size into one tensor."""
        assert self.segmenter is not None
        started = time.perf_counter()
        batch = Batch(read_at=min(item.read_at for item in items), pixels=sum(item.pixels for item in items))
        images = await asyncio.gather(*(self._in_pool(_decode, item.entry) for item in items))
        decoded: list[tuple[Entry, np.ndarray]] = []
        for item, image in zip(items, images, strict=True):
            if isinstance(image, str):
                batch.failed.append((item.entry, "decode", image))
            else:
                decoded.append((item.entry, image))
        now = self.clock.now()
        needed = self.run_time.predict(sum(float(image.shape[0] * image.shape[1]) for _, image in decoded))
        by_size: dict[tuple[int, ...], list[tuple[Entry, np.ndarray]]] = {}
        for entry, image in decoded:
            assert entry.frame is not None
            if self.policy.can_make(entry.frame, now, needed):
                by_size.setdefault(image.shape, []).append((entry, image))
            else:
                batch.dropped.append((entry, STALE_BEFORE_INFERENCE))
        for pairs in by_size.values():
            tensor = await self._in_pool(self.segmenter.to_tensor, [image for _, image in pairs])
            batch.groups.append(Group([entry for entry, _ in pairs], tensor))
        self.prepare_time.add(batch.pixels, time.perf_counter() - started)
        return batch

    async def _infer(self, batch: Batch) -> None:
        loop = asyncio.get_running_loop()
        batch.model_start = time.perf_counter()
        ok = []
        for group in batch.groups:
            group.infer_start = self.clock.now()
            started = time.perf_counter()  # the duration: not from the clock, which may resync meanwhile
            try:
                group.maps = await loop.run_in_executor(self.infer_pool, self._infer_maps, group.tensor)
            except Exception as exc:  # a bad batch fails its frames, not the worker
                log.exception("inference failed on %d frames", len(group.entries))
                batch.failed.extend((e, "inference", f"{type(exc).__name__}: {exc}") for e in group.entries)
                continue
            group.infer_end = self.clock.now()
            metrics.BATCH_SIZE.observe(len(group.entries))
            metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
            ok.append(group)
        batch.groups = ok

    def _infer_maps(self, tensor: torch.Tensor) -> np.ndarray:
        assert self.segmenter is not None
        return self.segmenter.predict_tensor(tensor).cpu().numpy()

    async def _persist(self, batch: Batch) -> None:
        assert self.segmenter is not None
        info = self.segmenter.loaded.info
        label_set = self.segmenter.label_set
        pending: list[tuple[Entry, Group, np.ndarray]] = [
            (entry, group, class_map)
            for group in batch.groups
            if group.maps is not None
            for entry, class_map in zip(group.entries, group.maps, strict=True)
        ]
        encoded = await asyncio.gather(*(self._in_pool(_encode, m, label_set) for _, _, m in pending))
        results = []
        for (entry, group, _), (png, shares) in zip(pending, encoded, strict=True):
            frame = entry.frame
            assert frame is not None
            results.append(
                (
                    entry,
                    MaskResult(
                        stream=frame.stream,
                        seq=frame.seq,
                        capture_ts=frame.capture_ts,
                        recv_ts=frame.recv_ts,
                        infer_start=group.infer_start,
                        infer_end=group.infer_end,
                        persisted_ts=0.0,
                        model=info.name,
                        model_version=info.version,
                        label_set=label_set.name,
                        width=frame.width,
                        height=frame.height,
                        shares=shares,
                        labels_png=png,
                        backfill=frame.backfill,
                        sent_ts=frame.sent_ts,
                        decoded_ts=frame.decoded_ts,
                        published_ts=frame.published_ts,
                        read_ts=entry.read_ts,
                    ),
                )
            )
        stored: list[MaskResult] = []
        await self._retry_redis(lambda: self._store_and_ack(results, batch, stored), "persist results")
        for entry, stage, error in batch.failed:
            metrics.FRAMES_FAILED.labels(stage).inc()
            await self._retry_redis(functools.partial(self.recovery.fail, entry, error), "record a failure")
        for result in stored:
            if result.backfill:  # its latency is the outage's length, not the pipeline's
                continue
            metrics.END_TO_END_SECONDS.observe(result.latency)
            stages.observe(metrics.STAGE_SECONDS, stages.stamps_of(result), stages.WORKER_STAGES)
        metrics.FRAMES_PROCESSED.inc(len(stored))
        for reason in DROP_REASONS:
            self._count_drops([e for e, r in batch.dropped if r == reason], reason)
        self.processed += len(stored)
        ran = sum(float(e.frame.width * e.frame.height) for g in batch.groups for e in g.entries if e.frame)
        if ran:  # a batch dropped whole before the model says nothing about the model's speed
            self.run_time.add(ran, time.perf_counter() - batch.model_start)
        self.batch_times.append(time.monotonic() - batch.read_at)
        metrics.BATCH_SECONDS.observe(self.batch_times[-1])

    async def _store_and_ack(
        self, results: list[tuple[Entry, MaskResult]], batch: Batch, stored: list[MaskResult]
    ) -> None:
        """Stamp the results persisted, store those still within their bound (realtime: a result
        that missed it is dropped, never persisted), acknowledge every frame of the batch."""
        persisted = self.clock.now()
        # A retry (Redis was down) stamps and judges again.
        batch.dropped = [(e, r) for e, r in batch.dropped if r != LATE_AFTER_INFERENCE]
        stored.clear()
        for entry, result in results:
            assert entry.frame is not None
            if self.policy.can_make(entry.frame, persisted, 0.0):
                result.persisted_ts = persisted
                stored.append(result)
            else:
                batch.dropped.append((entry, LATE_AFTER_INFERENCE))
        await self.store.put_many(stored)
        acked = [entry for entry, _ in results] + [entry for entry, _ in batch.dropped]
        await self._ack(acked)

    async def _drop(self, entries: list[Entry], reason: str) -> None:
        """Acknowledge frames that will get no result, and count them."""
        if not entries:
            return
        await self._retry_redis(functools.partial(self._ack, entries), "acknowledge dropped frames")
        self._count_drops(entries, reason)

    async def _ack(self, entries: list[Entry]) -> None:
        """XACK each entry on the queue it was read from (a shard queue or a backfill lane), then drop
        the failure counters of the reclaimed ones: one round trip, however many queues."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in {e.queue for e in entries}:
            pipe.xack(queue, keys.WORKER_GROUP, *(e.id for e in entries if e.queue == queue))
        self.recovery.forget_failures_in(pipe, entries)
        await pipe.execute()

    def _count_drops(self, entries: list[Entry], reason: str) -> None:
        if not entries:
            return
        metrics.FRAMES_DROPPED.labels(reason).inc(len(entries))
        self._dropped_unlogged[reason] = self._dropped_unlogged.get(reason, 0) + len(entries)
        now = time.monotonic()
        if now >= self._next_drop_log:  # a summary every few seconds, not a line per batch
            counts = ", ".join(f"{n} {r}" for r, n in sorted(self._dropped_unlogged.items()))
            log.info("dropped frames (bound %.1fs): %s", self.policy.max_age, counts)
            self._dropped_unlogged.clear()
            self._next_drop_log = now + DROP_LOG_INTERVAL

    # --- helpers ----------------------------------------------------------------------------
    def claim_idle_ms(self) -> int:
        """The configured claim idle time, raised to stay well above the observed p99 batch time."""
        return max(self.settings.claim_idle_ms, int(CLAIM_IDLE_OVER_P99 * self.p99_batch_time() * 1000))

    def p99_batch_time(self) -> float:
        return percentile(self.batch_times, 99) if self.batch_times else 0.0

    async def _in_pool(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    async def _redis_down(self, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        log.warning("Redis unavailable (%s); retrying", exc)
        await asyncio.sleep(0.5)

    async def _retry_redis(self, op: Callable[[], Awaitable[object]], what: str) -> None:
        """Run ``op`` until Redis answers (idempotent operations only), backing off to 2 s."""
        delay = 0.1
        while True:
            try:
                await op()
                return
            except REDIS_DOWN as exc:
                metrics.REDIS_ERRORS.inc()
                log.warning("cannot %s, Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _unless_stopped(self, work: Awaitable[object]) -> None:
        """Await ``work``, or cancel it as soon as a stop is requested (start-up honours SIGTERM)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        task.result()


def _decode(entry: Entry) -> np.ndarray | str:
    """The frame's RGB image, or the reason it cannot be decoded."""
    assert entry.frame is not None
    try:
        return entry.frame.image()
    except Exception as exc:  # FrameFormatError, or whatever else a corrupt frame makes the decoder raise
        return str(exc) or type(exc).__name__


def _encode(class_map: np.ndarray, label_set: LabelSet) -> tuple[bytes, dict[int, float]]:
    """The label map as a palette PNG, and each class's share of its pixels."""
    return encode_label_map(class_map, label_set), class_shares(class_map, label_set.num_classes)
