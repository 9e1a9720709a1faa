"""Redis replies as Python values: the API's client keeps bytes (no decode_responses), as the
core's ``from_fields`` parsers expect."""

from __future__ import annotations

from typing import cast


def text(value: object) -> str:
    """A Redis reply (bytes without decode_responses) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def as_fields(reply: object) -> dict[bytes, bytes]:
    """A hash or stream-entry reply as the bytes mapping the core's ``from_fields`` parse."""
    return cast(dict[bytes, bytes], reply or {})
