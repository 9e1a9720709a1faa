"""The worker's drop policy and stream-entry parsing (no Redis, no model)."""

from __future__ import annotations

import dataclasses

import pytest

from flowcloud import keys
from flowcloud.frames import Frame
from services.worker.policy import FramePolicy
from services.worker.recovery import parse_entries


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


def test_parse_entries_keeps_malformed_entries_with_their_error_and_skips_deleted_ones() -> None:
    good = {
        k.encode(): str(v).encode() if not isinstance(v, bytes) else v
        for k, v in _frame(5.0).to_fields().items()
    }
    bad = dict(good)
    del bad[keys.F_SEQ.encode()]
    entries = parse_entries([(b"1-0", good), (b"2-0", bad), (b"3-0", None)])
    assert [e.id for e in entries] == ["1-0", "2-0"]
    assert entries[0].frame == _frame(5.0) and entries[0].error is None
    assert entries[1].frame is None and entries[1].error == "frame entry lacks field 'seq'"
    assert not entries[0].reclaimed
