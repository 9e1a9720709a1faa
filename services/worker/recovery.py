"""At-least-once delivery: frame references read from the shard queues, their frames fetched,
reclaiming stuck work, counting failures, dead letters.

A worker reads references (flowcloud.frame_log) from each shard queue through the consumer group
and fetches each frame's bytes from its stream's frame log (`load_entries`); a reference whose
frame has left the log (evicted by the log's bound before any worker got to it) is acknowledged and
counted (``flowcloud_worker_frames_dropped_total{reason="evicted"}``, and per stream in its
metadata hash, ``keys.M_EVICTED``). A reference read by a worker stays pending in its queue's group
until it is acknowledged. If that worker
dies, its pending frames go idle; any worker takes them over with XAUTOCLAIM once they have been
idle longer than the claim idle time (which must exceed the p99 batch time, or live workers lose
frames they are still processing: harmless but wasteful, since results are idempotent).
A frame that fails is left pending and retried after the idle time; after ``max_attempts``
failures (or as many deliveries without an acknowledgement: a frame that kills its worker) it
moves to the dead-letter stream (the reference, its error and its queue), and is acknowledged.
Reclaiming runs per shard queue: each has its own XAUTOCLAIM cursor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from flowcloud import frame_log, groups, keys
from flowcloud.frames import Frame
from flowcloud.replies import text, text_keys

from . import metrics

log = logging.getLogger(__name__)

ATTEMPTS_TTL = 24 * 3600  # failure counters outlive any sane retry schedule, but not forever
START_ID = "0-0"
DROP_TRIMMED_PENDING = "trimmed_pending"  # read by a worker that died, trimmed before another reclaimed it
DROP_EVICTED = "evicted"  # its bytes left the stream's frame log before a worker fetched them
# Why a reference was dead-lettered (flowcloud_worker_frames_dead_lettered_total{reason}).
DEAD_MALFORMED = "malformed"  # the reference or its frame cannot be parsed: no retry can help
DEAD_FAILED = "failed"  # it failed max_attempts times
DEAD_REDELIVERED = "redelivered"  # delivered more than max_attempts times, never acknowledged


@dataclass
class Entry:
    """One reference read from a shard queue, with its frame; ``frame`` is None when the reference
    or the frame is malformed (``error`` says how)."""

    id: str  # its id on its queue
    fields: dict[bytes, bytes]  # the reference's fields (no frame bytes)
    frame: Frame | None = None
    error: str | None = None
    deliveries: int = 1
    queue: str = ""  # the shard queue it was read from (acknowledged there)
    read_ts: float | None = None  # when this worker read it, on Redis's clock (flowcloud.stages)

    @property
    def reclaimed(self) -> bool:
        return self.deliveries > 1


async def load_entries(redis: Redis, queue: str, raw: Any) -> list[Entry]:
    """The references ``raw`` (as redis-py returns them) read from ``queue``, each with its frame
    fetched from its frame log (one pipelined round trip). A malformed one carries its error; one
    whose frame has left its log is acknowledged, counted and left out."""
    entries = [Entry(text(entry_id), fields, queue=queue) for entry_id, fields in raw if fields is not None]
    located = []  # (entry, (log, id))
    for entry in entries:
        location = frame_log.ref_location(entry.fields)
        if location is None:
            entry.error = "frame reference lacks a valid stream or frame id"
        else:
            located.append((entry, location))
    found = await frame_log.fetch(redis, [location for _, location in located])
    evicted = []
    for (entry, _), log_fields in zip(located, found, strict=True):
        if log_fields is None:
            evicted.append(entry)
            continue
        try:
            entry.frame = Frame.from_fields(log_fields)
        except ValueError as exc:
            entry.error = str(exc)
    if evicted:
        await _count_evicted(redis, queue, evicted)
    gone = {id(entry) for entry in evicted}
    return [entry for entry in entries if id(entry) not in gone]


async def _count_evicted(redis: Redis, queue: str, evicted: list[Entry]) -> None:
    """Acknowledge references whose frames left their logs, and count them (per stream too)."""
    streams: dict[str, int] = {}
    for entry in evicted:
        stream = text(text_keys(entry.fields)[keys.F_STREAM])
        streams[stream] = streams.get(stream, 0) + 1
    pipe = redis.pipeline(transaction=False)
    pipe.xack(queue, keys.WORKER_GROUP, *(entry.id for entry in evicted))
    for stream, count in streams.items():
        pipe.hincrby(keys.stream_meta(stream), keys.M_EVICTED, count)
    await pipe.execute()
    metrics.FRAMES_DROPPED.labels(DROP_EVICTED).inc(len(evicted))
    log.warning(
        "%d frames had left their frame logs before a worker fetched them (%s): acknowledged",
        len(evicted),
        ", ".join(f"{stream}: {count}" for stream, count in sorted(streams.items())),
    )


def count_trimmed_pending(queue: str, reply: Any) -> None:
    """Count the frame references an XAUTOCLAIM ``reply`` on ``queue`` names as trimmed while pending."""
    groups.count_trimmed_pending(reply, metrics.FRAMES_DROPPED, DROP_TRIMMED_PENDING, "frames", queue)


@dataclass
class Recovery:
    redis: Redis
    consumer: str
    max_attempts: int = 3
    dead_letter_maxlen: int = 10_000
    _cursors: dict[str, str] = field(default_factory=dict, init=False)  # queue -> XAUTOCLAIM cursor

    def scan_complete(self, queue: str) -> bool:
        """True when the last claim on ``queue`` reached the end of its pending list."""
        return self._cursors.get(queue, START_ID) == START_ID

    async def claim(self, queue: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over up to ``count`` entries of ``queue`` idle longer than ``min_idle_ms``; frames that
        were delivered too often without an acknowledgement are dead-lettered instead of returned."""
        reply = await self.redis.xautoclaim(
            queue,
            keys.WORKER_GROUP,
            self.consumer,
            min_idle_ms,
            self._cursors.get(queue, START_ID),
            count=count,
        )
        cursor, raw = reply[0], reply[1]
        self._cursors[queue] = text(cursor)
        count_trimmed_pending(queue, reply)
        entries = await load_entries(self.redis, queue, raw)
        if not entries:
            return []
        metrics.FRAMES_RECLAIMED.inc(len(entries))
        pending = await self.redis.xpending_range(
            queue,
            keys.WORKER_GROUP,
            min=entries[0].id,
            max=entries[-1].id,
            count=len(entries) * 4,
            consumername=self.consumer,
        )
        deliveries = {text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        alive = []
        for entry in entries:
            entry.deliveries = deliveries.get(entry.id, 2)
            if entry.deliveries > self.max_attempts:
                error = f"delivered {entry.deliveries} times and never acknowledged (did it kill its worker?)"
                await self.dead_letter(entry, error, entry.deliveries, DEAD_REDELIVERED)
            else:
                alive.append(entry)
        log.info(
            "reclaimed %d idle pending frames (%d dead-lettered)", len(entries), len(entries) - len(alive)
        )
        return alive

    async def fail(self, entry: Entry, error: str) -> bool:
        """Count a failure; dead-letter the entry once it has failed ``max_attempts`` times.

        Returns True when the entry was dead-lettered (and acknowledged), False when it stays
        pending to be retried after the claim idle time.
        """
        if entry.frame is None:  # malformed: no retry can help
            await self.dead_letter(entry, entry.error or error, 1, DEAD_MALFORMED)
            return True
        counter = keys.attempts(entry.frame.stream, entry.frame.seq)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(counter)
        pipe.expire(counter, ATTEMPTS_TTL)
        attempts = int((await pipe.execute())[0])
        if attempts < self.max_attempts:
            log.warning(
                "frame %s failed (attempt %d of %d): %s", entry.id, attempts, self.max_attempts, error
            )
            return False
        await self.dead_letter(entry, error, attempts, DEAD_FAILED)
        return True

    async def dead_letter(self, entry: Entry, error: str, attempts: int, reason: str) -> None:
        fields: dict[Any, Any] = dict(entry.fields)
        fields.update(
            {
                keys.F_ERROR: error[:2000],
                keys.F_ATTEMPTS: attempts,
                keys.F_SOURCE_ID: entry.id,
                keys.F_SOURCE_QUEUE: entry.queue,
                keys.F_CONSUMER: self.consumer,
            }
        )
        # Three keys, three slots: not a transaction. The dead letter goes first; a crash before the
        # acknowledgement leaves the reference pending, to be dead-lettered again (rare; harmless).
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(keys.DEAD_LETTER_STREAM, fields, maxlen=self.dead_letter_maxlen, approximate=True)
        pipe.xack(entry.queue, keys.WORKER_GROUP, entry.id)
        if entry.frame is not None:
            pipe.delete(keys.attempts(entry.frame.stream, entry.frame.seq))
        await pipe.execute()
        metrics.FRAMES_DEAD_LETTERED.labels(reason).inc()
        log.error("frame %s dead-lettered after %d attempts: %s", entry.id, attempts, error)

    def forget_failures_in(self, pipe: Pipeline, entries: list[Entry]) -> None:
        """Queue in ``pipe`` the removal of the failure counters of reclaimed frames that have now
        succeeded (one DELETE per key: they may sit in different slots)."""
        for entry in entries:
            if entry.reclaimed and entry.frame:
                pipe.delete(keys.attempts(entry.frame.stream, entry.frame.seq))
