"""Both encoders answer a keyframe request with an IDR on the next picture, and lose nothing."""

from __future__ import annotations

import time

import pytest

from edge.encoder import make_encoder
from edge.frames import Picture, StreamShape
from edge.sources import TestPattern as Pattern

SHAPE = StreamShape(96, 64, 30.0)


@pytest.mark.parametrize("name", ["libx264", "x264enc"])
def test_a_requested_keyframe_is_the_next_picture(name: str) -> None:
    encoder = make_encoder(name, SHAPE, 300_000, 300)
    pattern = Pattern(SHAPE.width, SHAPE.height)
    start = time.time()
    out = []
    try:
        for i in range(12):
            if i == 6:
                encoder.request_keyframe()
            out += encoder.encode(Picture(pattern.frame(i), start + i / SHAPE.fps))
        out += encoder.flush()
    finally:
        encoder.close()
    assert len(out) == 12
    assert [f.capture_time for f in out] == [start + i / SHAPE.fps for i in range(12)]
    assert [i for i, f in enumerate(out) if f.keyframe] == [0, 6]
