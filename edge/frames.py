"""What flows through the edge daemon: captured pictures and encoded access units."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StreamShape:
    """The stream description the edge announces in its HELLO."""

    width: int
    height: int
    fps: float


@dataclass
class Picture:
    """A captured picture: HxWx3 uint8 RGB, and the edge time it was captured (unix seconds)."""

    image: np.ndarray
    capture_time: float


@dataclass
class EncodedFrame:
    """One H.264 access unit ready to send: its NAL units (no start codes) and capture time."""

    nals: list[bytes]
    keyframe: bool
    capture_time: float

    @property
    def size(self) -> int:
        return sum(len(n) for n in self.nals)
