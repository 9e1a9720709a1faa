"""The core's one owner of each small rule: Redis replies as text, the percentile, libx264."""

from __future__ import annotations

import numpy as np
import pytest

from flowcloud.percentile import percentile
from flowcloud.protocol.h264 import NAL_TYPE_IDR, nal_type
from flowcloud.replies import field_text, text, text_keys
from flowcloud.x264 import encode_access_units, libx264_encoder


def test_reply_values_as_text() -> None:
    assert text(b"cam-1") == "cam-1" and text("cam-1") == "cam-1" and text(7) == "7"
    assert text(b"\xffcam") == "\ufffdcam"  # a bad byte is replaced, never raised on
    assert field_text({b"tenant": b"acme"}, "tenant") == "acme"
    assert field_text({"tenant": "acme"}, "tenant") == "acme"
    assert field_text({b"other": b"x"}, "tenant") is None
    assert text_keys({b"name": b"workers", "lag": 3}) == {"name": b"workers", "lag": 3}


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0, 20, 21, 50, 95, 100)] == [1.0, 1.0, 2.0, 3.0, 5.0, 5.0]
    assert percentile([0.25], 99) == 0.25
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside 0..100"):
        percentile(values, 101)


def test_libx264_keyframe_interval_is_exact_and_odd_sizes_are_refused() -> None:
    codec = libx264_encoder(64, 48, 30, keyframe_interval=5, threads=1)
    rng = np.random.default_rng(0)
    units = encode_access_units(codec, (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(12)))
    assert len(units) == 12
    idr = [i for i, nals in enumerate(units) if any(nal_type(n) == NAL_TYPE_IDR for n in nals)]
    assert idr == [0, 5, 10]
    with pytest.raises(ValueError, match="even frame size"):
        libx264_encoder(65, 48, 30)
