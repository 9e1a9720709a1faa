"""A decoded frame as it travels through Redis (gateway -> its stream's frame log -> workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
import simplejpeg

from flowcloud import keys
from flowcloud.replies import text_keys
from flowcloud.settings import FrameEncoding

ENCODINGS: tuple[str, ...] = get_args(FrameEncoding)
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
    backfill: bool = False  # from an edge's spool, after an outage (keys.backfill_frames)
    # Later stage stamps (flowcloud.stages), on the same clock as capture_ts; None: not stamped.
    sent_ts: float | None = None
    decoded_ts: float | None = None
    published_ts: float | None = None
    # The lease generation of the gateway session that received it (services.gateway.lease): the
    # publisher writes it only while the stream's metadata still names that generation (fencing).
    # 0: not fenced (tools and benches that publish without a session).
    generation: int = 0

    def to_fields(self) -> dict[str, str | int | float | bytes]:
        fields: dict[str, str | int | float | bytes] = {
            keys.F_STREAM: self.stream,
            keys.F_SEQ: self.seq,
            keys.F_CAPTURE_TS: repr(self.capture_ts),
            keys.F_RECV_TS: repr(self.recv_ts),
            keys.F_WIDTH: self.width,
            keys.F_HEIGHT: self.height,
            keys.F_ENCODING: self.encoding,
            keys.F_DATA: self.data,
        }
        if self.backfill:
            fields[keys.F_BACKFILL] = "1"
        for name, value in self.stage_stamps().items():
            if value is not None:
                fields[name] = repr(value)
        return fields

    def stage_stamps(self) -> dict[str, float | None]:
        """The stamps after receipt that travel on the entry, by field name."""
        return {
            keys.F_SENT_TS: self.sent_ts,
            keys.F_DECODED_TS: self.decoded_ts,
            keys.F_PUBLISHED_TS: self.published_ts,
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes] | dict[str, bytes]) -> Frame:
        """Parse a stream entry (bytes keys, as redis-py returns them without decoding)."""
        f = text_keys(fields)
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
                backfill=f.get(keys.F_BACKFILL) == b"1",
                sent_ts=_optional_time(f.get(keys.F_SENT_TS)),
                decoded_ts=_optional_time(f.get(keys.F_DECODED_TS)),
                published_ts=_optional_time(f.get(keys.F_PUBLISHED_TS)),
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


def _optional_time(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def encode_image(rgb: np.ndarray, encoding: str = "jpeg", quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """An HxWx3 uint8 RGB array as frame bytes (JPEG: baseline JFIF, 4:2:0, libjpeg-turbo)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise FrameFormatError(f"expected an HxWx3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    if encoding == "raw":
        return np.ascontiguousarray(rgb).tobytes()
    if encoding == "jpeg":
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality, "RGB", "420")
    raise FrameFormatError(f"unknown frame encoding {encoding!r}")


def encode_yuv420_jpeg(
    y: np.ndarray, u: np.ndarray, v: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY
) -> bytes:
    """Full-range BT.601 4:2:0 planes (FFmpeg's ``yuvj420p``) as ``jpeg`` frame bytes.

    JFIF stores exactly this, so libjpeg-turbo compresses the planes as they are: no conversion to
    RGB and back, no chroma downsampling. For a decoder that already holds 4:2:0 pictures (the
    gateway's), this is the cheap way to a frame; `decode_image` reads it like any other JPEG.
    Planes may be strided views (a row pitch wider than the picture)."""
    chroma = ((y.shape[0] + 1) // 2, (y.shape[1] + 1) // 2) if y.ndim == 2 else None
    if not y.size or u.shape != chroma or v.shape != chroma:
        raise FrameFormatError(f"expected 4:2:0 planes, got Y {y.shape}, U {u.shape}, V {v.shape}")
    if not (y.dtype == u.dtype == v.dtype == np.uint8):
        raise FrameFormatError("YUV planes must be uint8")
    return simplejpeg.encode_jpeg_yuv_planes(y, u, v, quality)


def decode_image(data: bytes, encoding: str, width: int, height: int) -> np.ndarray:
    """Frame bytes as an HxWx3 uint8 RGB array; the size must be the one the entry states."""
    if encoding == "raw":
        if len(data) != width * height * 3:
            raise FrameFormatError(f"raw frame has {len(data)} bytes, expected {width * height * 3}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if encoding == "jpeg":
        try:
            # The header first: a JPEG that claims another size is refused before anything is allocated.
            jpeg_height, jpeg_width, _, _ = simplejpeg.decode_jpeg_header(data)
            same_size = (jpeg_width, jpeg_height) == (width, height)
            rgb = simplejpeg.decode_jpeg(data, "RGB") if same_size else None
        except ValueError as exc:  # libjpeg-turbo refused it (truncation included: decoding is strict)
            raise FrameFormatError(f"frame data is not a decodable JPEG: {exc}") from None
        if rgb is None:
            raise FrameFormatError(f"JPEG is {jpeg_width}x{jpeg_height}, entry says {width}x{height}")
        return np.asarray(rgb)
    raise FrameFormatError(f"unknown frame encoding {encoding!r}")
