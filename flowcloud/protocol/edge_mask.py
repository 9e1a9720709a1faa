"""A mask the edge made itself (its fallback model, while the cloud was unreachable), sent to the
gateway on reconnect: edge -> gateway on a connection whose HELLO stream description says
``masks``. Each RFC 4571 frame is one JSON object of at most `MAX_MASK_MESSAGE` bytes; the label
map travels as a base64 palette PNG. The capture time is on the edge clock (the gateway maps it
with the connection's clock offset, as it does for frames).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import MAX_FRAME_SIZE

MAX_MASK_MESSAGE = MAX_FRAME_SIZE
MAX_NAME_LENGTH = 128
MAX_CLASSES = 256
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class EdgeMask:
    capture_time: float  # edge clock, unix seconds
    model: str
    model_version: str
    label_set: str
    width: int
    height: int
    infer_seconds: float
    shares: dict[int, float] = field(default_factory=dict)
    labels_png: bytes = b""

    def to_bytes(self) -> bytes:
        body = json.dumps(
            {
                "type": "mask",
                "capture_time": self.capture_time,
                "model": self.model,
                "model_version": self.model_version,
                "label_set": self.label_set,
                "width": self.width,
                "height": self.height,
                "infer_seconds": self.infer_seconds,
                "shares": {str(k): v for k, v in self.shares.items()},
                "labels_png": base64.b64encode(self.labels_png).decode(),
            },
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        if len(body) > MAX_MASK_MESSAGE:
            raise ValueError(f"mask message of {len(body)} bytes exceeds {MAX_MASK_MESSAGE}")
        return body

    @classmethod
    def parse(cls, body: bytes) -> EdgeMask:
        if len(body) > MAX_MASK_MESSAGE:
            raise ProtocolError(f"mask message of {len(body)} bytes exceeds {MAX_MASK_MESSAGE}")
        try:
            obj = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ProtocolError("mask message is not UTF-8 JSON") from None
        if not isinstance(obj, dict) or obj.get("type") != "mask":
            raise ProtocolError("expected a 'mask' message")
        capture = _number(obj, "capture_time")
        infer = _number(obj, "infer_seconds")
        names = [_text(obj, key) for key in ("model", "model_version", "label_set")]
        width, height = _int(obj, "width"), _int(obj, "height")
        if not (0 < width <= 8192 and 0 < height <= 8192):
            raise ProtocolError(f"mask size {width}x{height} is out of bounds")
        shares = obj.get("shares")
        if not isinstance(shares, dict) or len(shares) > MAX_CLASSES:
            raise ProtocolError("mask field 'shares' must be an object of at most 256 classes")
        try:
            parsed = {int(k): float(v) for k, v in shares.items()}
            png = base64.b64decode(_text(obj, "labels_png", MAX_MASK_MESSAGE), validate=True)
        except (ValueError, TypeError, binascii.Error):
            raise ProtocolError("mask fields 'shares' or 'labels_png' are malformed") from None
        if not png.startswith(PNG_SIGNATURE):
            raise ProtocolError("mask label map is not a PNG")
        return cls(capture, names[0], names[1], names[2], width, height, infer, parsed, png)


def _number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ProtocolError(f"mask field {name!r} must be a non-negative number")
    return float(value)


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"mask field {name!r} must be an integer")
    return value


def _text(obj: dict[str, Any], name: str, limit: int = MAX_NAME_LENGTH) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ProtocolError(f"mask field {name!r} must be a string of 1 to {limit} characters")
    return value
