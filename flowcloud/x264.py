"""libx264 through PyAV: the one encoder set-up the edge, the synthetic codec round trip, the
benchmarks and the tests share, and the one MP4 writer (`flowcloud infer`'s overlay video,
`flowcloud synth --video`, test videos). Needs PyAV: the edge, server and train installs have it.

Every live encoder is tuned ``zerolatency`` (no B-frames, no look-ahead: one picture in, one
access unit out) on yuv420p pictures; a keyframe interval, when given, is exact (``keyint`` and
``min-keyint``), and zerolatency repeats SPS/PPS with every IDR. The MP4 writer is tuned for
files (B-frames allowed) unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from flowcloud.protocol.h264 import split_annexb


def libx264_encoder(
    width: int,
    height: int,
    fps: float,
    *,
    preset: str = "ultrafast",
    keyframe_interval: int | None = None,
    bitrate: int | None = None,
    crf: int | None = None,
    threads: int = 0,
    time_base: Fraction | None = None,
    x264_params: Mapping[str, str | int] | None = None,
    options: Mapping[str, str] | None = None,
) -> av.VideoCodecContext:
    """An unopened libx264 encoder for ``width``x``height`` yuv420p pictures at ``fps``.

    ``threads=1`` gives one slice per picture; ``time_base`` defaults to one tick a frame;
    ``x264_params`` and ``options`` add to (or override) what this sets.
    """
    _check_even(width, height)
    rate = Fraction(fps).limit_denominator(1001)
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = time_base or 1 / rate
    codec.framerate = rate
    codec.thread_count = threads
    params: dict[str, str | int] = {}
    if keyframe_interval is not None:
        codec.gop_size = keyframe_interval
        params.update({"keyint": keyframe_interval, "min-keyint": keyframe_interval})
    if bitrate is not None:
        codec.bit_rate = bitrate
    params.update(x264_params or {})
    chosen = {"preset": preset, "tune": "zerolatency"}
    if crf is not None:
        chosen["crf"] = str(crf)
    if params:
        chosen["x264-params"] = ":".join(f"{key}={value}" for key, value in params.items())
    codec.options = {**chosen, **(options or {})}
    return codec


def encode_access_units(encoder: av.VideoCodecContext, pictures: Iterable[np.ndarray]) -> list[list[bytes]]:
    """Encode RGB pictures (pts 0, 1, ...) and flush: the NAL units of each access unit."""
    out: list[list[bytes]] = []
    for pts, rgb in enumerate(pictures):
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
        picture.pts = pts
        out += [split_annexb(bytes(packet)) for packet in encoder.encode(picture)]
    out += [split_annexb(bytes(packet)) for packet in encoder.encode(None)]
    return out


class Mp4Writer:
    """An H.264 MP4 file written frame by frame (RGB pictures, yuv420p, constant frame rate)."""

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: float | Fraction = 30,
        *,
        crf: int = 23,
        preset: str = "veryfast",
        keyframe_interval: int | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        _check_even(width, height)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        chosen = {"crf": str(crf), "preset": preset}
        if keyframe_interval is not None:
            chosen["g"] = str(keyframe_interval)
        self.stream.options = {**chosen, **(options or {})}

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_even(width: int, height: int) -> None:
    if width % 2 or height % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}")
