"""The frames a worker has read and not yet started, and which of them the next batch takes.

One queue per stream. A batch is formed only when the model is free to run it, so no batch waits
behind another; it takes frames stream by stream in max-min fair order (start-time fair queueing
on pixels: the stream that has received the least service goes next, and a stream that was idle
gets no credit for it), so a 30 fps stream cannot starve a 5 fps one, and a stream offering less
than its share gets all of its frames.

In ``realtime`` mode each stream is served newest first, every frame is judged against its
deadline (capture + ``max_frame_age``) with the forecast time of the batch it would join, and the
batch stops growing before it would make any of its frames late or overrun the time budget of one
batch. Frames that can no longer make it leave the queue as drops. In ``complete`` mode frames go
oldest first and nothing is dropped.

The queue is plain data (no asyncio, no Redis), so the scheduling is tested on its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .policy import FramePolicy
from .recovery import Entry

Forecast = Callable[[float], float]  # pixels -> seconds until the batch's results are persisted


@dataclass
class Queued:
    entry: Entry
    read_at: float  # monotonic seconds: when the worker read it
    pixels: float


@dataclass
class Taken:
    """What forming one batch decided: the frames to run, and the ones that can no longer make it."""

    batch: list[Queued]
    expired: list[Entry]


class FrameQueue:
    def __init__(self, policy: FramePolicy, capacity: int) -> None:
        self.policy = policy
        self.capacity = capacity
        self._streams: dict[str, deque[Queued]] = {}
        self._tags: dict[str, float] = {}  # per stream: its virtual service time (pixels served)
        self._vtime = 0.0  # the start tag of the last frame taken
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def oldest_read_at(self) -> float | None:
        return min((q[0].read_at for q in self._streams.values() if q), default=None)

    def mean_pixels(self) -> float:
        total = sum(item.pixels for q in self._streams.values() for item in q)
        return total / self.size if self.size else 0.0

    def push(self, entry: Entry, read_at: float) -> list[Entry]:
        """Queue ``entry`` (a parsed frame); returns the frames pushed out to stay within capacity
        (realtime: the oldest frame of the longest queue; complete mode never overfills, as its
        reader waits for room)."""
        frame = entry.frame
        assert frame is not None
        queue = self._streams.get(frame.stream)
        if queue is None:
            queue = self._streams[frame.stream] = deque()
        if not queue:  # (re)joining: no credit for the time it was idle
            self._tags[frame.stream] = max(self._tags.get(frame.stream, 0.0), self._vtime)
        queue.append(Queued(entry, read_at, float(frame.width * frame.height)))
        self.size += 1
        evicted = []
        while self.policy.realtime and self.size > self.capacity:
            longest = max(self._streams.values(), key=len)
            evicted.append(longest.popleft().entry)
            self.size -= 1
        return evicted

    def expire(self, now: float, forecast: Forecast) -> list[Entry]:
        """Remove the frames that cannot be persisted in time even in a batch of their own."""
        if not self.policy.realtime:
            return []
        expired = []
        for queue in self._streams.values():
            keep = []
            for item in queue:
                if self._can_make(item, now, forecast(item.pixels)):
                    keep.append(item)
                else:
                    expired.append(item.entry)
            if len(keep) != len(queue):
                queue.clear()
                queue.extend(keep)
        self.size -= len(expired)
        return expired

    def take(self, now: float, limit: int, forecast: Forecast, budget: float | None) -> Taken:
        """Form the next batch: at most ``limit`` frames in fair order, and in realtime mode only as
        many as finish (``forecast`` of their pixels from ``now``) before the earliest deadline among
        them and within ``budget`` seconds. The first frame of a batch is never refused for the
        budget, only for its deadline."""
        expired = self.expire(now, forecast)
        batch: list[Queued] = []
        pixels = 0.0
        deadline = float("inf")
        realtime = self.policy.realtime
        while len(batch) < limit:
            stream = self._next_stream()
            if stream is None:
                break
            queue = self._streams[stream]
            item = queue[-1] if realtime else queue[0]
            if realtime and batch:
                frame = item.entry.frame
                assert frame is not None
                needed = forecast(pixels + item.pixels)
                if now + needed > min(deadline, self.policy.deadline(frame)) or (
                    budget is not None and needed > budget
                ):
                    break
            if realtime:
                queue.pop()
                frame = item.entry.frame
                assert frame is not None
                deadline = min(deadline, self.policy.deadline(frame))
            else:
                queue.popleft()
            self.size -= 1
            self._vtime = self._tags[stream]
            self._tags[stream] += item.pixels
            pixels += item.pixels
            batch.append(item)
        self._forget_idle()
        return Taken(batch, expired)

    def drain(self) -> list[Entry]:
        """Everything still queued, oldest first per stream (the queue is left empty)."""
        left = [item.entry for queue in self._streams.values() for item in queue]
        self._streams.clear()
        self.size = 0
        return left

    def _next_stream(self) -> str | None:
        waiting = [(tag, name) for name, tag in self._tags.items() if self._streams.get(name)]
        return min(waiting)[1] if waiting else None

    def _can_make(self, item: Queued, now: float, needed: float) -> bool:
        frame = item.entry.frame
        assert frame is not None
        return self.policy.can_make(frame, now, needed)

    def _forget_idle(self) -> None:
        """Streams with nothing queued whose tag is behind the virtual time would restart from it
        anyway: forget them, so the queue's memory follows the live streams."""
        for name in [n for n, q in self._streams.items() if not q and self._tags[n] <= self._vtime]:
            del self._streams[name]
            del self._tags[name]
