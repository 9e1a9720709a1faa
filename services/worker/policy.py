"""Which frames get inference: in real-time mode stale frames are dropped so the newest win."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from flowcloud.frames import Frame
from flowcloud.settings import FrameMode

MODES: tuple[str, ...] = get_args(FrameMode)


@dataclass(frozen=True)
class FramePolicy:
    """``realtime``: a frame older than ``max_age`` seconds (capture to now) is dropped unseen.

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

    def is_stale(self, frame: Frame, now: float) -> bool:
        """Whether ``frame`` is older than ``max_age``; ``now`` is on Redis's clock, as the frame's
        capture time is (the gateway publishes it so; see `flowcloud.clock`)."""
        return self.mode == "realtime" and now - frame.capture_ts > self.max_age
