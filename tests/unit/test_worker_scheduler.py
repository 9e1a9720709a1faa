"""The worker's scheduling on its own (no Redis, no model): fair order, newest first, deadlines,
the batch budget, the queue's bound, and the batch-time forecast."""

from __future__ import annotations

from collections import Counter

import pytest

from flowcloud.frames import Frame
from services.worker.batchtime import BatchTime
from services.worker.policy import FramePolicy
from services.worker.recovery import Entry
from services.worker.scheduler import Forecast, FrameQueue, Queued

PIXELS = 16 * 8


def entry(stream: str, seq: int, capture_ts: float) -> Entry:
    frame = Frame(stream, seq, capture_ts, capture_ts, 16, 8, "raw", bytes(PIXELS * 3))
    return Entry(f"{seq}-{stream}", {}, frame)


def per_frame(seconds: float) -> Forecast:
    return lambda pixels: seconds * pixels / PIXELS


def seqs(batch: list[Queued]) -> list[tuple[str, int]]:
    return [(q.entry.frame.stream, q.entry.frame.seq) for q in batch if q.entry.frame]


def test_realtime_serves_the_newest_frame_of_each_stream_first() -> None:
    queue = FrameQueue(FramePolicy("realtime", 10.0), capacity=100)
    for seq in range(5):
        queue.push(entry("a", seq, 100.0 + seq * 0.1), 0.0)
    queue.push(entry("b", 0, 100.0), 0.0)
    taken = queue.take(100.5, limit=3, forecast=per_frame(0.01), budget=None)
    assert seqs(taken.batch) == [("a", 4), ("b", 0), ("a", 3)]
    assert len(queue) == 3


def test_complete_mode_goes_oldest_first_and_never_drops() -> None:
    queue = FrameQueue(FramePolicy("complete", 1.0), capacity=2)
    for seq in range(4):
        assert queue.push(entry("a", seq, 0.0), 0.0) == []
    taken = queue.take(1e9, limit=3, forecast=per_frame(1.0), budget=0.1)
    assert seqs(taken.batch) == [("a", 0), ("a", 1), ("a", 2)] and taken.expired == []


def test_max_min_fair_share_between_a_30_15_and_5_fps_stream() -> None:
    """One frame per step of capacity; 50 fps offered to 15 fps: 5 fps gets all, the rest split evenly."""
    queue = FrameQueue(FramePolicy("realtime", 1.0), capacity=1000)
    rates = {"a": 30, "b": 15, "c": 5}
    served: Counter[str] = Counter()
    offered: Counter[str] = Counter()
    for tick in range(60 * 15):  # 60 s, a batch of one frame every 1/15 s
        now = tick / 15
        for stream, fps in rates.items():
            while offered[stream] < int(now * fps) + 1:
                queue.push(entry(stream, offered[stream], offered[stream] / fps), now)
                offered[stream] += 1
        for item in queue.take(now, limit=1, forecast=per_frame(0.05), budget=None).batch:
            served[item.entry.frame.stream] += 1  # type: ignore[union-attr]
    assert served["c"] == pytest.approx(offered["c"], rel=0.02)
    assert served["a"] == pytest.approx(served["b"], rel=0.05)
    assert served["a"] == pytest.approx((15 * 60 - offered["c"]) / 2, rel=0.05)


def test_a_batch_stops_before_it_would_make_a_frame_late_or_overrun_the_budget() -> None:
    queue = FrameQueue(FramePolicy("realtime", 1.0), capacity=100)
    for seq in range(6):
        queue.push(entry("a", seq, 100.0), 0.0)
    # Each frame takes 0.2 s: at 100.3 four frames would end at 101.1, after their deadline 101.0.
    taken = queue.take(100.3, limit=8, forecast=per_frame(0.2), budget=None)
    assert len(taken.batch) == 3
    # The budget of one batch (0.5 s) allows two.
    assert len(queue.take(100.0, limit=8, forecast=per_frame(0.2), budget=0.5).batch) == 2


def test_frames_that_cannot_make_it_even_alone_expire_when_a_batch_forms() -> None:
    queue = FrameQueue(FramePolicy("realtime", 1.0), capacity=100)
    queue.push(entry("a", 0, 99.0), 0.0)  # deadline 100.0: hopeless at 99.95 with 0.1 s to go
    queue.push(entry("a", 1, 99.5), 0.0)
    taken = queue.take(99.95, limit=8, forecast=per_frame(0.1), budget=None)
    assert [e.frame.seq for e in taken.expired] == [0]  # type: ignore[union-attr]
    assert seqs(taken.batch) == [("a", 1)]


def test_a_full_queue_pushes_out_the_oldest_frame_of_the_longest_stream() -> None:
    queue = FrameQueue(FramePolicy("realtime", 10.0), capacity=3)
    queue.push(entry("a", 0, 1.0), 0.0)
    queue.push(entry("a", 1, 1.1), 0.0)
    queue.push(entry("b", 0, 1.0), 0.0)
    evicted = queue.push(entry("b", 1, 1.2), 0.0)
    assert [(e.frame.stream, e.frame.seq) for e in evicted] == [("a", 0)]  # type: ignore[union-attr]
    assert len(queue) == 3


def test_an_idle_stream_gets_no_credit_for_its_idle_time() -> None:
    queue = FrameQueue(FramePolicy("realtime", 100.0), capacity=100)
    for seq in range(10):
        queue.push(entry("a", seq, 0.0), 0.0)
        queue.take(0.0, limit=1, forecast=per_frame(0.0), budget=None)
    for seq in range(4):
        queue.push(entry("a", 10 + seq, 0.0), 0.0)
        queue.push(entry("b", seq, 0.0), 0.0)
    order = [q.entry.frame.stream for q in queue.take(0.0, 8, per_frame(0.0), None).batch]  # type: ignore[union-attr]
    assert order[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])  # alternating, not b four times


def test_batch_time_fits_fixed_and_per_pixel_costs_and_errs_slow() -> None:
    times = BatchTime()
    assert times.predict(1000) == 0.0
    for pixels in (1000, 2000, 4000, 8000):
        times.add(pixels, 0.05 + pixels * 1e-5)
    assert times.predict(3000) == pytest.approx(0.05 + 0.03)
    times.add(2000, 0.5)  # one slow batch among five: the p90 margin covers it
    assert times.predict(2000) > 0.07
    single = BatchTime()
    single.add(4000, 4.0, provisional=True)  # a cold warm-up pass: only until a real batch is measured
    assert single.predict(2000) == pytest.approx(2.0)
    single.add(4000, 0.4)  # one size only: proportional to pixels
    assert single.predict(2000) == pytest.approx(0.2)
