"""The worker's drop policy and stream-entry parsing (no Redis, no model)."""

from __future__ import annotations

import pytest

from flowcloud import keys
from flowcloud.frames import Frame
from services.worker.policy import FramePolicy, frame_age
from services.worker.recovery import parse_entries


def _frame(capture_ts: float) -> Frame:
    return Frame("cam", 1, capture_ts, capture_ts, 16, 8, "raw", bytes(16 * 8 * 3))


def test_realtime_drops_only_frames_older_than_max_age() -> None:
    policy = FramePolicy("realtime", max_age=2.0)
    # Received 0.5 s after capture (gateway clock), queued at 1000.0 (Redis clock).
    late = Frame("cam", 1, 100.0, 100.5, 16, 8, "raw", bytes(16 * 8 * 3))
    assert frame_age(late, queued_at=1000.0, now=1001.25) == pytest.approx(1.75)
    assert not policy.is_stale(late, queued_at=1000.0, now=1001.4)
    assert not policy.is_stale(late, queued_at=1000.0, now=1001.5)
    assert policy.is_stale(late, queued_at=1000.0, now=1001.51)


def test_frame_age_compares_no_two_clocks() -> None:
    """The gateway's clock (capture, receipt) is 10 000 s away from Redis's: no effect on the age."""
    frame = _frame(5.0)
    assert frame_age(frame, queued_at=10_005.0, now=10_005.3) == pytest.approx(0.3)
    # A receipt before the capture (an edge clock-sync error) or a clock stepping back count as 0.
    assert frame_age(Frame("cam", 1, 7.0, 6.0, 16, 8, "raw", b""), queued_at=50.0, now=49.0) == 0.0


def test_complete_mode_keeps_every_frame() -> None:
    assert not FramePolicy("complete", max_age=2.0).is_stale(_frame(0.0), queued_at=0.0, now=1e9)


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
