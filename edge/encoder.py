"""H.264 encoders for the edge: PyAV libx264 (zerolatency), or a GStreamer encoder element such
as the Jetson hardware encoder ``nvv4l2h264enc``.

Both turn `Picture`s into `EncodedFrame`s (NAL units of one access unit, SPS/PPS repeated with
every IDR) and can be asked for an IDR, which the sender does after every (re)connect.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections import deque
from fractions import Fraction
from queue import Empty, Queue
from typing import Protocol

import av
import numpy as np

from edge import upstream
from edge.frames import EncodedFrame, Picture, StreamShape
from flowcloud.protocol.h264 import NAL_TYPE_IDR, nal_type, split_annexb
from flowcloud.x264 import libx264_encoder

log = logging.getLogger(__name__)

ENCODERS = ("auto", "libx264", "x264enc", "nvv4l2h264enc")
JETSON_ELEMENT = "nvv4l2h264enc"


class Encoder(Protocol):
    def encode(self, picture: Picture) -> list[EncodedFrame]: ...

    def flush(self) -> list[EncodedFrame]: ...

    def request_keyframe(self) -> None: ...

    def close(self) -> None: ...


def _is_keyframe(nals: list[bytes]) -> bool:
    return any(nal_type(n) == NAL_TYPE_IDR for n in nals)


class Libx264Encoder:
    """PyAV libx264: ultrafast, zerolatency (no B-frames, one picture in, one access unit out)."""

    def __init__(self, shape: StreamShape, bitrate: int, keyframe_interval: int, threads: int = 0) -> None:
        self.shape = shape
        codec = libx264_encoder(
            shape.width,
            shape.height,
            shape.fps,
            keyframe_interval=keyframe_interval,
            bitrate=bitrate,
            threads=threads,
            time_base=Fraction(1, 90_000),  # pts from capture times on the RTP clock
            # repeat-headers: SPS/PPS with every IDR, so a receiver can join at any keyframe.
            x264_params={
                "repeat-headers": 1,
                "vbv-maxrate": bitrate // 1000,
                "vbv-bufsize": max(1, bitrate // 1000 // 2),
            },
            options={"forced-idr": "1"},
        )
        codec.open()
        self._codec = codec
        self._times: deque[float] = deque()
        self._start: float | None = None
        self._force_idr = False

    def request_keyframe(self) -> None:
        self._force_idr = True

    def encode(self, picture: Picture) -> list[EncodedFrame]:
        image = picture.image
        if image.shape[:2] != (self.shape.height, self.shape.width):
            raise ValueError(
                f"picture is {image.shape[1]}x{image.shape[0]}, encoder expects "
                f"{self.shape.width}x{self.shape.height}"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(
            format="yuv420p"
        )
        if self._start is None:
            self._start = picture.capture_time
        frame.pts = round((picture.capture_time - self._start) * 90_000)
        if self._force_idr:
            frame.pict_type = av.video.frame.PictureType.I
            self._force_idr = False
        self._times.append(picture.capture_time)
        return self._collect(self._codec.encode(frame))

    def flush(self) -> list[EncodedFrame]:
        return self._collect(self._codec.encode(None))

    def _collect(self, packets: list[av.Packet]) -> list[EncodedFrame]:
        out = []
        for packet in packets:
            nals = split_annexb(bytes(packet))
            capture_time = self._times.popleft() if self._times else 0.0
            out.append(EncodedFrame(nals, _is_keyframe(nals), capture_time))
        return out

    def close(self) -> None:
        self._times.clear()


def gst_encoder_pipeline(element: str, shape: StreamShape, bitrate: int, keyframe_interval: int) -> str:
    """A gst-launch pipeline: raw RGB on stdin -> H.264 -> RTP in RFC 4571 on stdout."""
    fps = Fraction(shape.fps).limit_denominator(1001)
    rate = f"{fps.numerator}/{fps.denominator}"
    caps = f"video/x-raw,format=RGB,width={shape.width},height={shape.height},framerate={rate}"
    if element == JETSON_ELEMENT:
        encode = (
            "nvvidconv ! video/x-raw(memory:NVMM),format=I420 ! "
            f"nvv4l2h264enc bitrate={bitrate} iframeinterval={keyframe_interval} "
            f"idrinterval={keyframe_interval} "
            "insert-sps-pps=true maxperf-enable=true control-rate=1"
        )
    elif element == "x264enc":
        encode = (
            "videoconvert ! video/x-raw,format=I420 ! "
            f"x264enc tune=zerolatency speed-preset=ultrafast bitrate={max(1, bitrate // 1000)} "
            f"key-int-max={keyframe_interval}"
        )
    else:
        raise ValueError(f"unknown GStreamer encoder {element!r}")
    return (
        f"fdsrc fd=0 blocksize={shape.width * shape.height * 3} ! rawvideoparse format=rgb "
        f"width={shape.width} height={shape.height} framerate={rate} ! {caps} ! "
        f"{encode} ! h264parse config-interval=-1 ! video/x-h264,stream-format=byte-stream,alignment=au ! "
        "rtph264pay config-interval=0 mtu=65000 ! rtpstreampay ! fdsink fd=1 sync=false"
    )


class GstEncoder:
    """A GStreamer encoder element in a ``gst-launch-1.0`` child process.

    Raw pictures go to its stdin; it answers RTP in RFC 4571 framing on stdout, which this side
    depacketizes back into access units (the marker bit gives exact access-unit boundaries). One
    picture in gives one access unit out, in order, so capture times are matched first in, first
    out. ``gst-launch`` takes no force-key-unit event, so a keyframe is made by starting a fresh
    pipeline (its first picture is an IDR) after flushing the old one: nothing is lost, and the
    gateway's requests are rate limited, so the restarts are rare.
    """

    def __init__(self, element: str, shape: StreamShape, bitrate: int, keyframe_interval: int) -> None:
        gst = shutil.which("gst-launch-1.0")
        if gst is None:
            raise RuntimeError("gst-launch-1.0 is not installed")
        self.shape = shape
        self.gst = gst
        self.pipeline = gst_encoder_pipeline(element, shape, bitrate, keyframe_interval)
        log.info("GStreamer encoder: %s", self.pipeline)
        self._times: deque[float] = deque()
        self._restart = False
        self._start()

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [self.gst, "-q", *self.pipeline.split()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._out: Queue[list[bytes] | None] = Queue()
        self._reader = threading.Thread(target=self._read, name="gst-encoder", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        chunks = iter(lambda: stdout.read1(65536), b"")  # type: ignore[attr-defined]
        try:
            # rtph264pay marks the last packet of every access unit, so none is left to flush.
            for au in upstream.access_units(chunks, "GStreamer encoder"):
                self._out.put(au.nals)
        finally:
            self._out.put(None)

    def request_keyframe(self) -> None:
        self._restart = True

    def encode(self, picture: Picture) -> list[EncodedFrame]:
        out: list[EncodedFrame] = []
        if self._restart:
            self._restart = False
            out = self.flush()  # the old pipeline's last access units, then a fresh one: an IDR
            self.close()
            self._start()
        if self._proc.poll() is not None or self._proc.stdin is None:
            raise RuntimeError(f"GStreamer encoder exited with status {self._proc.returncode}")
        self._times.append(picture.capture_time)
        self._proc.stdin.write(np.ascontiguousarray(picture.image, dtype=np.uint8).tobytes())
        self._proc.stdin.flush()
        return out + self._drain(block=False)

    def flush(self) -> list[EncodedFrame]:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        return self._drain(block=True)

    def _drain(self, block: bool) -> list[EncodedFrame]:
        out = []
        while True:
            try:
                nals = self._out.get(timeout=10) if block else self._out.get_nowait()
            except Empty:
                break
            if nals is None:
                break
            capture_time = self._times.popleft() if self._times else 0.0
            out.append(EncodedFrame(nals, _is_keyframe(nals), capture_time))
        return out

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def gst_element_available(element: str) -> bool:
    inspect = shutil.which("gst-inspect-1.0")
    if inspect is None:
        return False
    return subprocess.run([inspect, element], capture_output=True, timeout=30).returncode == 0


def make_encoder(name: str, shape: StreamShape, bitrate: int, keyframe_interval: int) -> Encoder:
    """``auto`` picks the Jetson hardware encoder when GStreamer has it, else PyAV libx264."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r} (choose from {', '.join(ENCODERS)})")
    if name == "auto":
        name = JETSON_ELEMENT if gst_element_available(JETSON_ELEMENT) else "libx264"
    if name == "libx264":
        return Libx264Encoder(shape, bitrate, keyframe_interval)
    return GstEncoder(name, shape, bitrate, keyframe_interval)
