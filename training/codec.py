"""H.264 round trips through libx264 (PyAV): the degradation a frame suffers on its way to a worker."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np

from flowcloud.x264 import libx264_encoder

FPS = 30


def h264_roundtrip(frames: Iterable[np.ndarray], crf: int, preset: str = "veryfast") -> Iterator[np.ndarray]:
    """Encode RGB frames with libx264 at ``crf`` and yield them decoded again, in order."""
    encoder: av.VideoCodecContext | None = None
    decoder: av.VideoCodecContext = av.CodecContext.create("h264", "r")
    for index, rgb in enumerate(frames):
        if encoder is None:
            encoder = libx264_encoder(rgb.shape[1], rgb.shape[0], FPS, preset=preset, crf=crf)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = index
        for packet in encoder.encode(frame):
            yield from _decode(decoder, packet)
    if encoder is not None:
        for packet in encoder.encode(None):
            yield from _decode(decoder, packet)
    for out in decoder.decode(None):
        yield out.to_ndarray(format="rgb24")


def _decode(decoder: av.VideoCodecContext, packet: av.Packet) -> Iterator[np.ndarray]:
    for frame in decoder.decode(packet):
        yield frame.to_ndarray(format="rgb24")


class Mp4Writer:
    """An H.264 MP4 file written frame by frame (yuv420p, constant frame rate)."""

    def __init__(self, path: str | Path, width: int, height: int, crf: int = 23, fps: int = FPS) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}")
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
