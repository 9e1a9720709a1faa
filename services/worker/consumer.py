"""The segmentation worker: read frames from the consumer group in batches, infer, persist, acknowledge.

Three stages run concurrently, joined by one-slot queues so that each works on a different batch:

    source   XREADGROUP (or XAUTOCLAIM) a batch, drop stale frames, decode JPEGs in a thread pool,
             group by size and stack each group into one (pinned) uint8 tensor
    infer    the model on each group, in one dedicated thread (the GPU's, or torch's CPU pool)
    persist  label maps to palette PNGs and class shares (thread pool), MaskStore.put_many, XACK

So the CPU decodes batch n+1 and encodes batch n-1 while the model runs batch n. On SIGTERM the
source stops reading and the batches already read go through to their acknowledgement.
"""

from __future__ import annotations

import asyncio
import functools
import logging
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

from flowcloud import keys
from flowcloud.clock import RedisClock
from flowcloud.inference import Segmenter, SegmenterOptions
from flowcloud.labels import LabelSet, class_shares
from flowcloud.percentile import percentile
from flowcloud.results import MaskResult, MaskStore, encode_label_map
from flowcloud.settings import WorkerSettings
from flowcloud.sizes import parse_size
from flowcloud.zoo import load_model

from . import metrics
from .lifecycle import DRAINING, READY, WARMING, Heartbeat, default_name
from .policy import FramePolicy
from .recovery import Entry, Recovery, ensure_group, parse_entries

log = logging.getLogger(__name__)

T = TypeVar("T")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
BATCH_TIMES_KEPT = 200
CLAIM_IDLE_OVER_P99 = 4  # a frame waits up to ~3 batch times between read and ack (queues of one)


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
    read_at: float
    groups: list[Group] = field(default_factory=list)
    dropped: list[Entry] = field(default_factory=list)
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
        self.redis = redis or Redis.from_url(
            settings.redis_url, socket_connect_timeout=5, socket_keepalive=True
        )
        self.policy = FramePolicy(settings.mode, settings.max_frame_age)
        # Frame ages and result times on Redis's clock, as the gateway's are (flowcloud.clock).
        self.clock = clock or RedisClock(gauge=metrics.CLOCK_OFFSET)
        self.store = MaskStore(self.redis, settings.results_max_per_stream, settings.results_ttl)
        self.recovery = Recovery(self.redis, self.name, settings.max_attempts, settings.dead_letter_maxlen)
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
        )
        self.batch_times: deque[float] = deque(maxlen=BATCH_TIMES_KEPT)
        self.processed = 0
        self._next_claim = 0.0

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        """Load, warm up, serve until SIGTERM/SIGINT, drain. 0 on a clean drain, 1 if it timed out."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        beating = asyncio.create_task(self._beat_forever())
        try:
            await self._unless_stopped(
                self._retry_redis(lambda: ensure_group(self.redis), "create the consumer group")
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
    async def _pipeline(self) -> None:
        decoded: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        inferred: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._source(decoded))
            tasks.create_task(self._infer_stage(decoded, inferred))
            tasks.create_task(self._persist_stage(inferred))

    async def _source(self, out: asyncio.Queue[Batch | None]) -> None:
        while not self.stop.is_set():
            try:
                entries = await self._next_entries()
            except REDIS_DOWN as exc:
                await self._redis_down(exc)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group missing (Redis lost its data?): creating it again")
                await self._retry_redis(lambda: ensure_group(self.redis), "create the consumer group")
                continue
            if entries:
                await out.put(await self._prepare(entries))
        await out.put(None)

    async def _next_entries(self) -> list[Entry]:
        """Reclaimed idle frames when a claim is due and finds some, else a batch of new frames."""
        s = self.settings
        now = time.monotonic()
        if now >= self._next_claim or not self.recovery.scan_complete:
            claimed = await self.recovery.claim(self.claim_idle_ms(), s.batch_size)
            if self.recovery.scan_complete:
                self._next_claim = now + min(max(self.claim_idle_ms() / 2000, 0.1), 5.0)
            if claimed:
                return claimed
        entries = await self._read(s.poll_ms)
        if not entries:
            return []
        deadline = time.monotonic() + s.batch_timeout_ms / 1000
        while len(entries) < s.batch_size:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms < 1:
                break
            try:
                more = await self._read(left_ms, s.batch_size - len(entries))
            except REDIS_DOWN:
                break  # keep what was read; the next read reports the outage
            if not more:
                break
            entries.extend(more)
        return entries

    async def _read(self, block_ms: int, count: int | None = None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            keys.WORKER_GROUP,
            self.name,
            {keys.FRAMES_STREAM: ">"},
            count=count or self.settings.batch_size,
            block=block_ms,
        )
        if not reply:
            return []
        raw = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return parse_entries(raw)

    async def _sync_clock(self) -> None:
        try:
            await self.clock.sync_if_due(self.redis)
        except REDIS_DOWN as exc:  # keep the last offset; the read that follows reports the outage
            log.debug("clock sync with Redis failed: %s", exc)

    async def _prepare(self, entries: list[Entry]) -> Batch:
        """Drop stale frames, decode the rest in parallel, stack each size into one tensor."""
        assert self.segmenter is not None
        batch = Batch(read_at=time.monotonic())
        now = self.clock.now()  # kept measured by the heartbeat (RedisClock.sync_if_due)
        todo = []
        for entry in entries:
            if entry.frame is None:
                batch.failed.append((entry, "parse", entry.error or "malformed entry"))
            elif self.policy.is_stale(entry.frame, now):
                batch.dropped.append(entry)
            else:
                todo.append(entry)
        images = await asyncio.gather(*(self._in_pool(_decode, e) for e in todo))
        by_size: dict[tuple[int, ...], list[tuple[Entry, np.ndarray]]] = {}
        for entry, image in zip(todo, images, strict=True):
            if isinstance(image, str):
                batch.failed.append((entry, "decode", image))
            else:
                by_size.setdefault(image.shape, []).append((entry, image))
        for pairs in by_size.values():
            tensor = await self._in_pool(self.segmenter.to_tensor, [image for _, image in pairs])
            batch.groups.append(Group([entry for entry, _ in pairs], tensor))
        return batch

    async def _infer_stage(self, inp: asyncio.Queue[Batch | None], out: asyncio.Queue[Batch | None]) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await inp.get()) is not None:
            ok = []
            for group in batch.groups:
                group.infer_start = self.clock.now()
                started = time.perf_counter()  # the duration: not from the clock, which may resync meanwhile
                try:
                    group.maps = await loop.run_in_executor(self.infer_pool, self._infer, group.tensor)
                except Exception as exc:  # a bad batch fails its frames, not the worker
                    log.exception("inference failed on %d frames", len(group.entries))
                    batch.failed.extend(
                        (e, "inference", f"{type(exc).__name__}: {exc}") for e in group.entries
                    )
                    continue
                group.infer_end = self.clock.now()
                metrics.BATCH_SIZE.observe(len(group.entries))
                metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
                ok.append(group)
            batch.groups = ok
            await out.put(batch)
        await out.put(None)

    def _infer(self, tensor: torch.Tensor) -> np.ndarray:
        assert self.segmenter is not None
        return self.segmenter.predict_tensor(tensor).cpu().numpy()

    async def _persist_stage(self, inp: asyncio.Queue[Batch | None]) -> None:
        while (batch := await inp.get()) is not None:
            await self._persist(batch)

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
                )
            )
        done = [entry for entry, _, _ in pending]
        await self._retry_redis(lambda: self._store_and_ack(results, done + batch.dropped), "persist results")
        for entry, stage, error in batch.failed:
            metrics.FRAMES_FAILED.labels(stage).inc()
            await self._retry_redis(functools.partial(self.recovery.fail, entry, error), "record a failure")
        for result in results:
            metrics.END_TO_END_SECONDS.observe(result.latency)
        metrics.FRAMES_PROCESSED.inc(len(results))
        if batch.dropped:
            metrics.FRAMES_DROPPED.labels("stale").inc(len(batch.dropped))
            log.info("dropped %d stale frames (older than %.1fs)", len(batch.dropped), self.policy.max_age)
        self.processed += len(results)
        self.batch_times.append(time.monotonic() - batch.read_at)
        metrics.BATCH_SECONDS.observe(self.batch_times[-1])

    async def _store_and_ack(self, results: list[MaskResult], acked: list[Entry]) -> None:
        persisted = self.clock.now()
        for result in results:
            result.persisted_ts = persisted
        await self.store.put_many(results)
        if acked:
            await self.redis.xack(keys.FRAMES_STREAM, keys.WORKER_GROUP, *(e.id for e in acked))
        await self.recovery.forget_failures(acked)

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
