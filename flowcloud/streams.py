"""A stream's metadata hash (``keys.stream_meta``) as it travels from the gateway to its readers.

The gateway writes it (`StreamMeta.to_fields`: a session's start and end, as partial updates)
and keeps counters in it with HINCRBY (``last_seq``, ``trimmed_unread``, ``backfill_last_seq``,
which `services.gateway.backfill` sets with ``backfill_end_seq``); the API, the CLI
and tests read it with `StreamMeta.from_fields`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowcloud import keys
from flowcloud.hashes import from_hash, to_hash

_NAMES = {
    "device": keys.M_DEVICE,
    "tenant": keys.M_TENANT,
    "width": keys.M_WIDTH,
    "height": keys.M_HEIGHT,
    "fps": keys.M_FPS,
    "started": keys.M_STARTED,
    "last_seen": keys.M_LAST_SEEN,
    "status": keys.M_STATUS,
    "last_seq": keys.M_LAST_SEQ,
    "trimmed_unread": keys.M_TRIMMED_UNREAD,
    "backfill_last_seq": keys.M_BACKFILL_LAST_SEQ,
    "backfill_end_seq": keys.M_BACKFILL_END_SEQ,
}


@dataclass(frozen=True)
class StreamMeta:
    device: str | None = None
    tenant: str | None = None
    width: int | None = None  # the resolution the edge sends (before resizing to the model input)
    height: int | None = None
    fps: float | None = None
    started: float | None = None  # unix seconds (Redis's clock) the current or last session began
    last_seen: float | None = None  # unix seconds (Redis's clock) of the last frame published
    status: str | None = None  # keys.STATUS_LIVE while a session is open, else keys.STATUS_IDLE
    last_seq: int | None = None  # the last frame seq handed out
    trimmed_unread: int | None = None  # frames trimmed (frames or backfill stream) before a worker read them
    # Seqs a live session reserved for the device's spooled frames (services.gateway.backfill):
    backfill_last_seq: int | None = None  # the last of them handed out to a backfill frame
    backfill_end_seq: int | None = None  # the last reserved

    def to_fields(self) -> dict[str, str]:
        """The fields that are set, as the hash stores them."""
        return to_hash(self, _NAMES)

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> StreamMeta:
        """From HGETALL's reply (bytes or str); a missing or malformed field is None."""
        return from_hash(cls, raw, _NAMES)[0]
