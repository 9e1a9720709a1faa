"""The worker's drop policy and stream-entry parsing (no Redis, no model)."""

from __future__ import annotations

import dataclasses

import pytest

from flowcloud.frames import Frame
from services.worker.policy import FramePolicy


def _frame(capture_ts: float) -> Frame:
    return Frame("cam", 1, capture_ts, capture_ts, 16, 8, "raw", bytes(16 * 8 * 3))


def test_realtime_drops_only_frames_older_than_max_age() -> None:
    policy = FramePolicy("realtime", max_age=2.0)
    assert not policy.is_stale(_frame(100.0), now=101.9)
    assert not policy.is_stale(_frame(100.0), now=102.0)
    assert policy.is_stale(_frame(100.0), now=102.01)


def test_complete_mode_keeps_every_frame() -> None:
    assert not FramePolicy("complete", max_age=2.0).is_stale(_frame(0.0), now=1e9)


def test_a_backfill_frame_is_never_too_old_even_in_realtime_mode() -> None:
    policy = FramePolicy("realtime", max_age=2.0)
    spooled = dataclasses.replace(_frame(0.0), backfill=True)
    assert policy.can_make(spooled, now=3600.0, needed=10.0) and not policy.is_stale(spooled, now=3600.0)
    assert not policy.can_make(_frame(0.0), now=3600.0, needed=10.0)


@pytest.mark.parametrize(
    ("mode", "age", "message"), [("fast", 1.0, "mode must be"), ("realtime", 0, "positive")]
)
def test_bad_policy_is_refused(mode: str, age: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FramePolicy(mode, age)
