"""A worker's heartbeat hash (``keys.worker(name)``, with a TTL) from the worker to the API.

The worker writes it every ``heartbeat_interval`` (`services.worker.lifecycle.Heartbeat`); the API
reads it to say which workers are alive and ready. Fields this version does not know (a newer
worker's statistics) travel in ``extra``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowcloud import keys
from flowcloud.hashes import from_hash, to_hash

_NAMES = {
    "state": keys.W_STATE,
    "heartbeat": keys.W_HEARTBEAT,
    "model": "model",
    "model_version": "model_version",
    "device": "device",
    "precision": "precision",
    "batch_size": "batch_size",
    "mode": "mode",
    "started": "started",
    "frames_processed": "frames_processed",
    "p99_batch_seconds": "p99_batch_seconds",
}


@dataclass
class WorkerHeartbeat:
    state: str = keys.WORKER_LOADING  # loading, warming, ready or draining
    heartbeat: float | None = None  # unix seconds (Redis's clock) of the beat
    model: str | None = None
    model_version: str | None = None
    device: str | None = None  # cpu, cuda, cuda:1 ...
    precision: str | None = None
    batch_size: int | None = None
    mode: str | None = None  # realtime or complete
    started: float | None = None  # unix seconds (Redis's clock) the worker started serving
    frames_processed: int | None = None
    p99_batch_seconds: float | None = None
    extra: dict[str, str] = field(default_factory=dict)  # fields this version does not know

    @property
    def ready(self) -> bool:
        return self.state == keys.WORKER_READY

    def to_fields(self) -> dict[str, str]:
        return {**self.extra, **to_hash(self, _NAMES)}

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> WorkerHeartbeat:
        """From HGETALL's reply, or from the worker's own description (any str/int/float values)."""
        heartbeat, extra = from_hash(cls, raw, _NAMES)
        heartbeat.extra = extra
        return heartbeat

    def describe(self) -> dict[str, str | float]:
        """The fields that are set, JSON-ready (unknown ones as text)."""
        known = {name: getattr(self, name) for name in _NAMES}
        return {**self.extra, **{k: v for k, v in known.items() if v is not None}}
