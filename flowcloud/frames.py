"""A decoded frame as it travels on the Redis frames stream (gateway -> workers)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from flowcloud import keys

ENCODINGS = ("jpeg", "raw")
DEFAULT_JPEG_QUALITY = 90


class FrameFormatError(ValueError):
    """A stream entry that is not a well-formed frame."""


@dataclass(frozen=True)
class Frame:
    stream: str
    seq: int
    capture_ts: float
    recv_ts: float
    width: int
    height: int
    encoding: str
    data: bytes

    def to_fields(self) -> dict[str, str | int | float | bytes]:
        return {
            keys.F_STREAM: self.stream,
            keys.F_SEQ: self.seq,
            keys.F_CAPTURE_TS: repr(self.capture_ts),
            keys.F_RECV_TS: repr(self.recv_ts),
            keys.F_WIDTH: self.width,
            keys.F_HEIGHT: self.height,
            keys.F_ENCODING: self.encoding,
            keys.F_DATA: self.data,
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes] | dict[str, bytes]) -> Frame:
        """Parse a stream entry (bytes keys, as redis-py returns them without decoding)."""
        f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        try:
            frame = cls(
                stream=f[keys.F_STREAM].decode(),
                seq=int(f[keys.F_SEQ]),
                capture_ts=float(f[keys.F_CAPTURE_TS]),
                recv_ts=float(f[keys.F_RECV_TS]),
                width=int(f[keys.F_WIDTH]),
                height=int(f[keys.F_HEIGHT]),
                encoding=f[keys.F_ENCODING].decode(),
                data=bytes(f[keys.F_DATA]),
            )
        except KeyError as exc:
            raise FrameFormatError(f"frame entry lacks field {exc.args[0]!r}") from None
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise FrameFormatError(f"frame entry has a malformed field: {exc}") from None
        if frame.encoding not in ENCODINGS:
            raise FrameFormatError(f"unknown frame encoding {frame.encoding!r}")
        if not (0 < frame.width <= 8192 and 0 < frame.height <= 8192):
            raise FrameFormatError(f"frame size {frame.width}x{frame.height} is out of bounds")
        return frame

    def image(self) -> np.ndarray:
        """The frame as an HxWx3 uint8 RGB array."""
        return decode_image(self.data, self.encoding, self.width, self.height)


def encode_image(rgb: np.ndarray, encoding: str = "jpeg", quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """An HxWx3 uint8 RGB array as frame bytes."""
    if encoding == "raw":
        return np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    if encoding == "jpeg":
        return encode_bgr_jpeg(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), quality)
    raise FrameFormatError(f"unknown frame encoding {encoding!r}")


def encode_bgr_jpeg(bgr: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """An HxWx3 uint8 array in OpenCV's BGR order as ``jpeg`` frame bytes (what ``encode_image``
    makes of the same picture in RGB, byte for byte). For producers that can emit BGR directly
    (the gateway's decoder has swscale write bgr24), which saves a channel swap per frame."""
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise FrameFormatError(f"expected an HxWx3 uint8 BGR array, got {bgr.dtype} {bgr.shape}")
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise FrameFormatError("JPEG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes, encoding: str, width: int, height: int) -> np.ndarray:
    if encoding == "raw":
        if len(data) != width * height * 3:
            raise FrameFormatError(f"raw frame has {len(data)} bytes, expected {width * height * 3}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if encoding == "jpeg":
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FrameFormatError("frame data is not a decodable JPEG")
        if bgr.shape[:2] != (height, width):
            raise FrameFormatError(f"JPEG is {bgr.shape[1]}x{bgr.shape[0]}, entry says {width}x{height}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    raise FrameFormatError(f"unknown frame encoding {encoding!r}")
