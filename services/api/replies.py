"""Redis replies as Python values: the API's client keeps bytes (no decode_responses), as the
core's ``from_fields`` parsers expect."""

from __future__ import annotations

from typing import cast


def as_fields(reply: object) -> dict[bytes, bytes]:
    """A hash or stream-entry reply as the bytes mapping the core's ``from_fields`` parse."""
    return cast(dict[bytes, bytes], reply or {})
