"""At-least-once delivery: the consumer group, reclaiming stuck work, counting failures, dead letters.

A frame read by a worker stays pending in the group until it is acknowledged. If that worker
dies, its pending frames go idle; any worker takes them over with XAUTOCLAIM once they have been
idle longer than the claim idle time (which must exceed the p99 batch time, or live workers lose
frames they are still processing: harmless but wasteful, since results are idempotent).
A frame that fails is left pending and retried after the idle time; after ``max_attempts``
failures (or as many deliveries without an acknowledgement: a frame that kills its worker) it
moves to the dead-letter stream with its error, and is acknowledged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.replies import text

from . import metrics

log = logging.getLogger(__name__)

ATTEMPTS_TTL = 24 * 3600  # failure counters outlive any sane retry schedule, but not forever
START_ID = "0-0"
DROP_TRIMMED_PENDING = "trimmed_pending"  # read by a worker that died, trimmed before another reclaimed it


@dataclass
class Entry:
    """One entry read from the frames stream; ``frame`` is None when the entry is malformed."""

    id: str
    fields: dict[bytes, bytes]
    frame: Frame | None = None
    error: str | None = None
    deliveries: int = 1
    stream: str = keys.FRAMES_STREAM  # the stream it was read from (acknowledged there)
    read_ts: float | None = None  # when this worker read it, on Redis's clock (flowcloud.stages)

    @property
    def reclaimed(self) -> bool:
        return self.deliveries > 1


def parse_entries(raw: Any) -> list[Entry]:
    """Entries as redis-py returns them; a malformed one carries its parse error instead of a frame."""
    out = []
    for entry_id, fields in raw:
        eid = text(entry_id)
        if fields is None:  # deleted by retention while pending
            continue
        entry = Entry(eid, fields)
        try:
            entry.frame = Frame.from_fields(fields)
        except ValueError as exc:
            entry.error = str(exc)
        out.append(entry)
    return out


@dataclass
class Recovery:
    redis: Redis
    consumer: str
    max_attempts: int = 3
    dead_letter_maxlen: int = 10_000
    _cursor: str = field(default=START_ID, init=False)

    @property
    def scan_complete(self) -> bool:
        """True when the last claim reached the end of the pending list."""
        return self._cursor == START_ID

    async def claim(self, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over up to ``count`` entries idle longer than ``min_idle_ms``; frames that were
        delivered too often without an acknowledgement are dead-lettered instead of returned."""
        reply = await self.redis.xautoclaim(
            keys.FRAMES_STREAM, keys.WORKER_GROUP, self.consumer, min_idle_ms, self._cursor, count=count
        )
        cursor, raw = reply[0], reply[1]
        self._cursor = text(cursor)
        if len(reply) > 2 and reply[2]:  # pending, but trimmed away (Redis removed them from the group)
            metrics.FRAMES_DROPPED.labels(DROP_TRIMMED_PENDING).inc(len(reply[2]))
            log.warning("%d pending frames were trimmed from the stream before a worker acknowledged them",
                        len(reply[2]))  # fmt: skip
        entries = parse_entries(raw)
        if not entries:
            return []
        metrics.FRAMES_RECLAIMED.inc(len(entries))
        pending = await self.redis.xpending_range(
            keys.FRAMES_STREAM,
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
                await self.dead_letter(entry, error, entry.deliveries)
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
            await self.dead_letter(entry, entry.error or error, 1)
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
        await self.dead_letter(entry, error, attempts)
        return True

    async def dead_letter(self, entry: Entry, error: str, attempts: int) -> None:
        fields: dict[Any, Any] = dict(entry.fields)
        fields.update(
            {
                keys.F_ERROR: error[:2000],
                keys.F_ATTEMPTS: attempts,
                keys.F_SOURCE_ID: entry.id,
                keys.F_CONSUMER: self.consumer,
            }
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(keys.DEAD_LETTER_STREAM, fields, maxlen=self.dead_letter_maxlen, approximate=True)
        pipe.xack(entry.stream, keys.WORKER_GROUP, entry.id)
        if entry.frame is not None:
            pipe.delete(keys.attempts(entry.frame.stream, entry.frame.seq))
        await pipe.execute()
        metrics.FRAMES_DEAD_LETTERED.inc()
        log.error("frame %s dead-lettered after %d attempts: %s", entry.id, attempts, error)

    async def forget_failures(self, entries: list[Entry]) -> None:
        """Drop the failure counters of reclaimed frames that have now succeeded."""
        names = [keys.attempts(e.frame.stream, e.frame.seq) for e in entries if e.reclaimed and e.frame]
        if names:
            await self.redis.delete(*names)
