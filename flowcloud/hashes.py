"""Flat dataclasses <-> Redis hashes: the one way `StreamMeta` and `WorkerHeartbeat` are stored.

Fields hold ``str``, ``int`` or ``float`` (optionally None: absent from the hash). Floats are
written with ``repr`` so that they come back exactly. Reading is lenient: a missing or malformed
field is left at its default, so one bad value never hides the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")


def text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def to_hash(obj: object, names: Mapping[str, str]) -> dict[str, str]:
    """The fields of ``obj`` that are set, under their hash names (``names``: attribute -> field)."""
    out: dict[str, str] = {}
    for name, key in names.items():
        value = getattr(obj, name)
        if value is not None:
            out[key] = repr(value) if isinstance(value, float) else str(value)
    return out


def from_hash(cls: type[T], raw: Mapping[Any, Any], names: Mapping[str, str]) -> tuple[T, dict[str, str]]:
    """An instance of the dataclass ``cls`` from HGETALL's reply, and the fields it does not know."""
    found = {text(k): text(v) for k, v in raw.items()}
    known = set(names.values())
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in names:
            continue
        value = found.get(names[f.name])
        if value is None or value == "":
            continue
        kind = str(f.type)
        try:
            if kind.startswith("int"):
                values[f.name] = int(float(value))
            elif kind.startswith("float"):
                values[f.name] = float(value)
            else:
                values[f.name] = value
        except ValueError:
            if f.default is MISSING and f.default_factory is MISSING:
                raise
    return cls(**values), {k: v for k, v in found.items() if k not in known}
