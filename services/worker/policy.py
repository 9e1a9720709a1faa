"""Which frames get inference: in real-time mode stale frames are dropped so the newest win."""

from __future__ import annotations

from dataclasses import dataclass

from flowcloud.frames import Frame

MODES = ("realtime", "complete")


@dataclass(frozen=True)
class FramePolicy:
    """``realtime``: a frame older than ``max_age`` seconds (capture to now, `frame_age`) is dropped unseen.

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

    def is_stale(self, frame: Frame, queued_at: float, now: float) -> bool:
        """Whether ``frame`` is too old to segment; ``queued_at`` (its entry's time) and ``now`` are
        Redis's clock (`flowcloud.clock`). See `frame_age`."""
        return self.mode == "realtime" and frame_age(frame, queued_at, now) > self.max_age


def frame_age(frame: Frame, queued_at: float, now: float) -> float:
    """Seconds since ``frame`` was captured, measured without comparing two machines' clocks: its
    time on the frames stream (``now - queued_at``, both on Redis's clock) plus its way there
    (receipt minus capture, both on the gateway's clock; the capture time was mapped to it by the
    handshake's clock sync). The decode and publish time in the gateway (milliseconds) is left out."""
    return max(0.0, now - queued_at) + max(0.0, frame.recv_ts - frame.capture_ts)
