"""Where the edge's video comes from.

Picture sources (encoded here): ``camera:/dev/videoN`` (OpenCV, V4L2), ``gst:PIPELINE`` (any
GStreamer source pipeline, e.g. ``nvarguscamerasrc`` on a Jetson; also ``camera:gst:...``), a video
file (``--loop`` to repeat it), ``synthetic`` (the street-scene generator when it is installed,
else a moving test pattern). Relay sources (H.264 passed through without re-encoding):
``rtsp://...`` (PyAV demux), ``rfc4571://HOST:PORT`` (listen for RTP/H.264 in RFC 4571, as
``rtph264pay ! rtpstreampay ! tcpclientsink`` sends it) and a ``.rfc4571`` file that the gateway
recorded (``--record``), replayed at its recorded pace.

Every source is a blocking iterator, run in the daemon's capture thread; ``stop()`` may be called
from another thread and ends the iteration soon after.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import av
import cv2
import numpy as np

from edge import upstream
from edge.frames import EncodedFrame, Picture, StreamShape
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import DESCRIPTION_SUFFIX, RECORDING_SUFFIX
from flowcloud.protocol.h264 import (
    DEFAULT_CLOCK_RATE,
    NAL_TYPE_IDR,
    NAL_TYPE_PPS,
    NAL_TYPE_SPS,
    AccessUnit,
    nal_type,
    split_annexb,
)
from flowcloud.protocol.rtp import timestamp_diff
from flowcloud.protocol.sps import SequenceParameterSet

log = logging.getLogger(__name__)

SYNTHETIC_SEED = 7
RELAY_ACCEPT_POLL = 0.2  # seconds between checks of stop() while waiting for a relay peer


class SourceError(Exception):
    """A source that cannot be opened or read (one line for the operator)."""


@runtime_checkable
class PictureSource(Protocol):
    shape: StreamShape

    def pictures(self) -> Iterator[Picture]: ...

    def stop(self) -> None: ...


@runtime_checkable
class RelaySource(Protocol):
    def open(self) -> StreamShape: ...

    def access_units(self) -> Iterator[EncodedFrame]: ...

    def stop(self) -> None: ...


class _Stoppable:
    def __init__(self) -> None:
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()


class Pacer:
    """Sleeps so that frame ``i`` is released at ``start + i / fps`` (files and generated video)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self._next: float | None = None

    def wait(self) -> None:
        now = time.monotonic()
        if self._next is None:
            self._next = now
        elif self._next > now:
            time.sleep(self._next - now)
        else:
            self._next = max(self._next, now - self.period)  # behind: do not burst to catch up
        self._next += self.period


class TestPattern:
    """A moving test pattern: colour bars, a bouncing square and a frame counter."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        bars = np.array(
            [
                [192, 192, 192],
                [192, 192, 0],
                [0, 192, 192],
                [0, 192, 0],
                [192, 0, 192],
                [192, 0, 0],
                [0, 0, 192],
            ],
            dtype=np.uint8,
        )
        cols = np.arange(width) * len(bars) // width
        self._background = np.repeat(bars[cols][None, :, :], height, axis=0)

    def frame(self, index: int) -> np.ndarray:
        img = self._background.copy()
        side = max(4, min(self.width, self.height) // 6)
        span_x, span_y = max(1, self.width - side), max(1, self.height - side)
        x = abs((index * 4) % (2 * span_x) - span_x)
        y = abs((index * 3) % (2 * span_y) - span_y)
        img[y : y + side, x : x + side] = 255
        cv2.putText(img, str(index), (4, self.height - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        return img


class SyntheticSource(_Stoppable):
    """Generated street scenes (training.synth) or, without it, a moving test pattern; paced to fps."""

    def __init__(self, shape: StreamShape) -> None:
        super().__init__()
        self.shape = shape
        try:
            from training.synth import SceneSequence
        except ImportError:
            log.info("training.synth is not installed; sending a moving test pattern")
            pattern = TestPattern(shape.width, shape.height)
            self._render: Callable[[int], np.ndarray] = pattern.frame
            self.kind = "pattern"
        else:
            scenes = SceneSequence(SYNTHETIC_SEED, shape.width, shape.height)
            self._render = lambda i: scenes.frame(i)[0]
            self.kind = "street"

    def pictures(self) -> Iterator[Picture]:
        pacer = Pacer(self.shape.fps)
        index = 0
        while not self.stopped:
            pacer.wait()
            image = self._render(index)
            yield Picture(image, time.time())
            index += 1


def _fit(image: np.ndarray, shape: StreamShape) -> np.ndarray:
    if image.shape[:2] == (shape.height, shape.width):
        return image
    return cv2.resize(image, (shape.width, shape.height), interpolation=cv2.INTER_AREA)


class FileSource(_Stoppable):
    """A video file decoded with PyAV, paced to its frame rate (or ``fps``), optionally looped."""

    def __init__(self, path: Path, shape: StreamShape | None, loop: bool) -> None:
        super().__init__()
        self.path = path
        self.loop = loop
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise SourceError(f"{path} has no video stream")
                stream = container.streams.video[0]
                width, height = stream.codec_context.width, stream.codec_context.height
                rate = float(stream.average_rate or stream.guessed_rate or 30)
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {path}: {exc}") from None
        self.shape = shape or StreamShape(width, height, rate)

    def pictures(self) -> Iterator[Picture]:
        pacer = Pacer(self.shape.fps)
        while not self.stopped:
            with av.open(str(self.path)) as container:
                for frame in container.decode(video=0):
                    if self.stopped:
                        return
                    image = _fit(frame.to_ndarray(format="rgb24"), self.shape)
                    pacer.wait()
                    yield Picture(image, time.time())
            if not self.loop:
                return


class CameraSource(_Stoppable):
    """A V4L2 camera through OpenCV."""

    def __init__(self, device: str, shape: StreamShape) -> None:
        super().__init__()
        self.device = device
        self.shape = shape
        index: int | str = int(device) if device.isdigit() else device
        cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise SourceError(f"cannot open camera {device}")
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, shape.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, shape.height)
        cap.set(cv2.CAP_PROP_FPS, shape.fps)
        self._cap = cap

    def pictures(self) -> Iterator[Picture]:
        try:
            while not self.stopped:
                ok, bgr = self._cap.read()
                capture_time = time.time()
                if not ok:
                    raise SourceError(f"camera {self.device} stopped delivering frames")
                yield Picture(_fit(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.shape), capture_time)
        finally:
            self._cap.release()


class GstPictureSource(_Stoppable):
    """Any GStreamer source pipeline (``nvarguscamerasrc``, ``v4l2src``, ``videotestsrc``...),
    converted to RGB at the stream size and read from a ``gst-launch-1.0`` child's stdout."""

    def __init__(self, pipeline: str, shape: StreamShape) -> None:
        super().__init__()
        gst = shutil.which("gst-launch-1.0")
        if gst is None:
            raise SourceError("gst-launch-1.0 is not installed")
        self.shape = shape
        self.pipeline = (
            f"{pipeline} ! videoconvert ! videoscale ! "
            f"video/x-raw,format=RGB,width={shape.width},height={shape.height} ! fdsink fd=1 sync=false"
        )
        self._argv = [gst, "-q", *self.pipeline.split()]

    def pictures(self) -> Iterator[Picture]:
        size = self.shape.width * self.shape.height * 3
        proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            while not self.stopped:
                data = proc.stdout.read(size)
                capture_time = time.time()
                if len(data) < size:
                    break
                yield Picture(
                    np.frombuffer(data, np.uint8).reshape(self.shape.height, self.shape.width, 3),
                    capture_time,
                )
        finally:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -9) and not self.stopped:
            raise SourceError(f"GStreamer source failed: {err.decode(errors='replace').strip()[:300]}")


def _parameter_sets(extradata: bytes | None) -> list[bytes]:
    """SPS/PPS from a stream's extradata, in Annex B or avcC form."""
    if not extradata:
        return []
    if extradata[:1] != b"\x01":
        return [n for n in split_annexb(extradata) if nal_type(n) in (NAL_TYPE_SPS, NAL_TYPE_PPS)]
    out: list[bytes] = []
    pos = 5
    try:
        for count_mask in (0x1F, 0xFF):
            count = extradata[pos] & count_mask
            pos += 1
            for _ in range(count):
                size = int.from_bytes(extradata[pos : pos + 2], "big")
                out.append(extradata[pos + 2 : pos + 2 + size])
                pos += 2 + size
    except IndexError:
        log.warning("truncated avcC extradata; relying on in-band SPS/PPS")
    return [n for n in out if n]


class DemuxRelaySource(_Stoppable):
    """H.264 from an RTSP camera (or any container PyAV demuxes) relayed without re-encoding.

    Packets are converted to Annex B (``h264_mp4toannexb``), and SPS/PPS from the stream header
    are put before every IDR that lacks them, so the gateway can start at any keyframe.
    """

    def __init__(self, url: str, pace: bool = False) -> None:
        super().__init__()
        self.url = url
        self.pace = pace
        # FFmpeg 7: "timeout" is the RTSP socket I/O timeout in microseconds.
        self._options = {"rtsp_transport": "tcp", "timeout": "5000000"} if url.startswith("rtsp") else {}
        self._container: av.container.InputContainer | None = None

    def open(self) -> StreamShape:
        try:
            container = av.open(self.url, options=self._options)
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.url}: {exc}") from None
        if not container.streams.video or container.streams.video[0].codec_context.name != "h264":
            container.close()
            raise SourceError(f"{self.url} has no H.264 video stream to relay")
        self._container = container
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        return StreamShape(stream.codec_context.width, stream.codec_context.height, rate)

    def access_units(self) -> Iterator[EncodedFrame]:
        if self._container is None:
            self.open()
        container = self._container
        assert container is not None
        stream = container.streams.video[0]
        headers = _parameter_sets(stream.codec_context.extradata)
        bsf = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", stream)
        pacer = Pacer(float(stream.average_rate or 30)) if self.pace else None
        try:
            for packet in container.demux(stream):
                if self.stopped:
                    return
                for filtered in bsf.filter(packet):
                    nals = split_annexb(bytes(filtered))
                    if not nals:
                        continue
                    kinds = {nal_type(n) for n in nals}
                    keyframe = NAL_TYPE_IDR in kinds
                    if keyframe and NAL_TYPE_SPS not in kinds:
                        nals = headers + nals
                    if pacer is not None:
                        pacer.wait()
                    yield EncodedFrame(nals, keyframe, time.time())
        except av.error.FFmpegError as exc:
            raise SourceError(f"{self.url}: {exc}") from None
        finally:
            container.close()


def dedupe_parameter_sets(nals: list[bytes]) -> list[bytes]:
    """Drop repeats of an SPS/PPS within one access unit (``rtph264pay config-interval`` puts
    them before every IDR slice, which makes FFmpeg's parser cut the picture apart)."""
    seen: set[bytes] = set()
    out = []
    for nal in nals:
        if nal_type(nal) in (NAL_TYPE_SPS, NAL_TYPE_PPS):
            if nal in seen:
                continue
            seen.add(nal)
        out.append(nal)
    return out


def _announced_size(nals: list[bytes]) -> tuple[int, int] | None:
    """The picture size the access unit's SPS announces (None without a parsable SPS)."""
    for nal in nals:
        if nal_type(nal) == NAL_TYPE_SPS:
            try:
                sps = SequenceParameterSet.parse(nal)
            except ProtocolError as exc:
                log.warning("relay: ignoring an SPS that does not parse: %s", exc)
                continue
            return sps.width, sps.height
    return None


def _relayed(au: AccessUnit) -> EncodedFrame:
    """An access unit to send on: repeated SPS/PPS dropped, capture time stamped now."""
    return EncodedFrame(dedupe_parameter_sets(au.nals), au.keyframe, time.time())


class _H264Relay(_Stoppable):
    """A relay source whose stream size comes from the SPS of its first keyframe."""

    what = "relay"

    def __init__(self, fps: float) -> None:
        super().__init__()
        self.fps = fps
        self._first: EncodedFrame | None = None
        self._upstream: Iterator[EncodedFrame] | None = None
        self.dropped: Counter[str] = Counter()  # access units dropped upstream, by reason

    def _read(self) -> Iterator[EncodedFrame]:
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the source holds (called once its access units are done)."""

    def open(self) -> StreamShape:
        """Wait for the first keyframe and learn the stream size from it."""
        self._upstream = self._read()
        for au in self._upstream:
            if au.keyframe and (size := _announced_size(au.nals)) is not None:
                self._first = au
                return StreamShape(size[0], size[1], self.fps)
        raise SourceError(f"{self.what} ended before a keyframe with a parsable SPS")

    def access_units(self) -> Iterator[EncodedFrame]:
        if self._upstream is None:
            self.open()
        assert self._upstream is not None
        try:
            if self._first is not None:
                yield self._first
                self._first = None
            yield from self._upstream
        finally:
            self._close()


class Rfc4571RelaySource(_H264Relay):
    """Listen on HOST:PORT for RTP/H.264 in RFC 4571 framing and relay the access units.

    One upstream connection at a time; when it ends, the next one is accepted (a restarted local
    pipeline). Capture times are re-stamped on arrival of each access unit; repeated SPS/PPS in
    one access unit are dropped; the stream size is read from the first keyframe's SPS.
    """

    what = "rfc4571 relay"

    def __init__(self, host: str, port: int, fps: float) -> None:
        super().__init__(fps)
        try:
            self._server = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise SourceError(f"cannot listen on {host}:{port}: {exc}") from None
        self._server.settimeout(RELAY_ACCEPT_POLL)
        self.address = self._server.getsockname()[:2]

    def _connections(self) -> Iterator[socket.socket]:
        while not self.stopped:
            try:
                conn, peer = self._server.accept()
            except TimeoutError:
                continue
            log.info("rfc4571 relay: upstream connected from %s:%d", *peer[:2])
            conn.settimeout(RELAY_ACCEPT_POLL)
            yield conn

    def _received(self, conn: socket.socket) -> Iterator[bytes]:
        while not self.stopped:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            yield chunk

    def _read(self) -> Iterator[EncodedFrame]:
        for conn in self._connections():
            with conn:
                for au in upstream.access_units(self._received(conn), self.what, self.dropped):
                    yield _relayed(au)
            log.info("rfc4571 relay: upstream disconnected")

    def _close(self) -> None:
        self._server.close()


class RtpClock:
    """Releases access units at the pace their RTP timestamps say (90 kHz for H.264, RFC 6184).

    Steps are taken modulo 2**32 (timestamps wrap); a step backwards counts as none, and a silence
    longer than ``max_gap`` seconds is replayed as ``max_gap``. Running late, it does not burst to
    catch up by more than a second."""

    def __init__(self, max_gap: float = 5.0) -> None:
        self.max_gap = max_gap
        self._last: int | None = None
        self._due = 0.0

    def wait(self, timestamp: int, stopped: threading.Event) -> bool:
        """Sleep until the access unit stamped ``timestamp`` is due; False when ``stopped`` is set."""
        now = time.monotonic()
        if self._last is None:
            self._due = now
        else:
            step = timestamp_diff(timestamp, self._last) / DEFAULT_CLOCK_RATE
            self._due = max(self._due + min(max(step, 0.0), self.max_gap), now - 1.0)
        self._last = timestamp
        return not stopped.wait(max(0.0, self._due - now))


class RecordingSource(_H264Relay):
    """Replay a session the gateway recorded with ``--record DIR``: the RTP/H.264 packets of its
    ``.rfc4571`` file, sent on without re-encoding at the pace of their RTP timestamps, once or
    with ``--loop``. The frame rate comes from the ``.json`` description beside the file when it
    is there. A packet that does not parse is skipped; broken framing ends the file (the gateway
    never records one, so that means a damaged file)."""

    def __init__(self, path: Path, loop: bool, fps: float) -> None:
        super().__init__(_recorded_fps(path) or fps)
        self.path, self.loop = path, loop
        self.what = f"replay of {path.name}"

    def _read(self) -> Iterator[EncodedFrame]:
        while not self.stopped:
            clock = RtpClock()
            replayed = 0
            try:
                with self.path.open("rb") as file:
                    chunks = iter(functools.partial(file.read, 65536), b"")
                    for au in upstream.access_units(chunks, self.what, self.dropped):
                        if not clock.wait(au.timestamp, self._stopped):
                            return
                        replayed += 1
                        yield _relayed(au)
            except OSError as exc:
                raise SourceError(f"cannot read {self.path}: {exc}") from None
            if not self.loop or not replayed:
                return  # a file with nothing to replay ends even with --loop (no busy reopening)


def _recorded_fps(path: Path) -> float | None:
    """The frame rate the recorded session's description states (None when it cannot be read)."""
    try:
        fps = json.loads(path.with_suffix(DESCRIPTION_SUFFIX).read_text())["stream"]["fps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(fps) if isinstance(fps, int | float) and 0 < fps <= 240 else None


def open_source(
    spec: str, shape: StreamShape, loop: bool, relay_fps: float | None = None
) -> PictureSource | RelaySource:
    """The source named by ``spec`` (see the module docstring)."""
    if spec == "synthetic":
        return SyntheticSource(shape)
    if spec.startswith("camera:gst:") or spec.startswith("gst:"):
        return GstPictureSource(spec.split("gst:", 1)[1], shape)
    if spec.startswith("camera:"):
        return CameraSource(spec.removeprefix("camera:"), shape)
    if spec.startswith(("rtsp://", "rtsps://")):
        return DemuxRelaySource(spec)
    if spec.startswith("rfc4571://"):
        parts = urlsplit(spec)
        if parts.hostname is None or parts.port is None:
            raise SourceError(f"{spec}: expected rfc4571://HOST:PORT")
        return Rfc4571RelaySource(parts.hostname, parts.port, relay_fps or shape.fps)
    path = Path(spec)
    if not path.is_file():
        raise SourceError(f"source {spec!r} is not synthetic, camera:, gst:, rtsp://, rfc4571:// or a file")
    if path.suffix == RECORDING_SUFFIX:
        return RecordingSource(path, loop, relay_fps or shape.fps)
    return FileSource(path, None, loop)
