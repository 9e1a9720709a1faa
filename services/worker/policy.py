"""Which frames get inference: in real-time mode a frame that cannot be persisted within its age
bound is dropped, so the newest win."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from flowcloud.frames import Frame
from flowcloud.settings import FrameMode

MODES: tuple[str, ...] = get_args(FrameMode)

# Why a frame was acknowledged without a result (the ``reason`` of frames_dropped_total): where
# it was found unable to be persisted within its bound, or pushed out of a full queue.
STALE_ON_READ = "stale"
STALE_IN_QUEUE = "stale_in_queue"
STALE_BEFORE_INFERENCE = "stale_before_inference"
LATE_AFTER_INFERENCE = "late_after_inference"  # the model ran slower than forecast: not persisted
QUEUE_FULL = "queue_full"
DROP_REASONS = (STALE_ON_READ, STALE_IN_QUEUE, STALE_BEFORE_INFERENCE, LATE_AFTER_INFERENCE, QUEUE_FULL)


@dataclass(frozen=True)
class FramePolicy:
    """``realtime``: a frame's result must be persisted within ``max_age`` seconds of its capture
    (its deadline); a frame that can no longer make it is dropped unseen.

    Under overload the backlog then ages out cheaply (parse and acknowledge, no decode, no
    inference), so the worker catches up with the newest frames instead of falling further
    behind. ``complete``: every frame is processed, however late.
    """

    mode: str = "realtime"
    max_age: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_age <= 0:
            raise ValueError(f"max_age must be positive, got {self.max_age}")

    @property
    def realtime(self) -> bool:
        return self.mode == "realtime"

    def deadline(self, frame: Frame) -> float:
        """When ``frame``'s result must be persisted at the latest (realtime mode)."""
        return frame.capture_ts + self.max_age

    def can_make(self, frame: Frame, now: float, needed: float) -> bool:
        """Whether ``frame`` can still be persisted in time when its result needs ``needed`` more
        seconds from ``now``; always in complete mode, and for a backfill frame (an edge's spooled
        video: processed in complete mode whatever the worker's mode)."""
        return not self.realtime or frame.backfill or now + needed <= self.deadline(frame)

    def is_stale(self, frame: Frame, now: float) -> bool:
        """Whether ``frame`` is older than ``max_age``; ``now`` is on Redis's clock, as the frame's
        capture time is (the gateway publishes it so; see `flowcloud.clock`)."""
        return not self.can_make(frame, now, 0.0)
