"""Redis replies as Python values: the one bytes-to-text rule for every part.

The services' clients keep bytes (no ``decode_responses``), as the contracts' ``from_fields``
parsers expect; these read names, ids and hash fields from such replies. Undecodable bytes are
replaced rather than raised on: a reply is data, and a bad byte must not stop a reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def text(value: object) -> str:
    """A Redis reply value (bytes, or already text or a number) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def field_text(fields: Mapping[Any, Any], name: str) -> str | None:
    """Hash field ``name`` as text (the key as bytes or as text), or None when it is absent."""
    value = fields.get(name.encode(), fields.get(name))
    return None if value is None else text(value)


def text_keys(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """The mapping with its keys as text and its values as they are."""
    return {text(key): value for key, value in fields.items()}
