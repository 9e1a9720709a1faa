"""H.264 round trips through libx264 (PyAV): the degradation a frame suffers on its way to a worker."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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
