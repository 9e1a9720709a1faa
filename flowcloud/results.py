"""Mask results: their fields, their lossless label-map encoding, and their store in Redis.

Writes are idempotent: a result lives at a key named by (stream, seq), so the same frame
processed twice (at-least-once delivery) leaves one result. Retention is bounded by count
(per stream) and by age (a TTL on each result).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
from PIL import Image
from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.labels import LabelSet
from flowcloud.stages import durations, stamps_of

META_FIELD = "meta"  # JSON metadata of a result hash
LABELS_FIELD = "labels_png"  # the label map of a result hash


def encode_label_map(class_map: np.ndarray, label_set: LabelSet) -> bytes:
    """A class map as a palette PNG (lossless; viewers show the official colours)."""
    image = Image.fromarray(np.asarray(class_map, dtype=np.uint8), mode="P")
    image.putpalette(label_set.palette.ravel().tolist())
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=1)
    return out.getvalue()


def decode_label_map(png: bytes) -> np.ndarray:
    """The class map of a label PNG (palette or greyscale) as HxW uint8."""
    with Image.open(io.BytesIO(png)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"label map PNG has mode {image.mode}, expected P or L")
        return np.asarray(image, dtype=np.uint8).copy()


@dataclass
class MaskResult:
    stream: str
    seq: int
    capture_ts: float
    recv_ts: float
    infer_start: float
    infer_end: float
    persisted_ts: float
    model: str
    model_version: str
    label_set: str
    width: int
    height: int
    shares: dict[int, float] = field(default_factory=dict)  # class id -> fraction of pixels
    labels_png: bytes = b""
    # The other stage stamps (flowcloud.stages); None on results of older services.
    sent_ts: float | None = None
    decoded_ts: float | None = None
    published_ts: float | None = None
    read_ts: float | None = None

    @property
    def latency(self) -> float:
        """Capture to persisted, in seconds (both on Redis's clock: `flowcloud.clock`)."""
        return self.persisted_ts - self.capture_ts

    def stages(self) -> dict[str, float | None]:
        """Seconds spent in each stage from capture to persisted (`flowcloud.stages.STAGES`)."""
        return durations(stamps_of(self))

    def metadata(self) -> dict[str, Any]:
        """Everything but the PNG, JSON-ready, with the derived latency and stages."""
        meta = asdict(self)
        del meta["labels_png"]
        meta["shares"] = {str(k): v for k, v in self.shares.items()}
        meta["latency"] = self.latency
        meta["stages"] = self.stages()
        return meta

    def to_fields(self) -> dict[str, str | bytes]:
        meta = self.metadata()
        del meta["latency"], meta["stages"]
        return {META_FIELD: json.dumps(meta), LABELS_FIELD: self.labels_png}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> MaskResult:
        """A result from its hash; without the label-map field, ``labels_png`` is empty."""
        meta = json.loads(fields[META_FIELD.encode()])
        meta["shares"] = {int(k): float(v) for k, v in meta["shares"].items()}
        return cls(**meta, labels_png=fields.get(LABELS_FIELD.encode(), b""))


class MaskStore:
    """Results in Redis: a hash per frame plus a per-stream index sorted by sequence number."""

    def __init__(self, redis: Redis, max_per_stream: int = 10_000, ttl_seconds: int = 24 * 3600) -> None:
        self.redis = redis
        self.max_per_stream = max_per_stream
        self.ttl_seconds = ttl_seconds

    async def put_many(self, results: list[MaskResult]) -> None:
        """Persist results in one round trip, then trim each touched stream to its bound."""
        if not results:
            return
        pipe = self.redis.pipeline(transaction=False)
        for result in results:
            key = keys.mask(result.stream, result.seq)
            pipe.hset(key, mapping=result.to_fields())  # type: ignore[arg-type]
            pipe.expire(key, self.ttl_seconds)
            pipe.zadd(keys.mask_index(result.stream), {str(result.seq): result.seq})
        streams = sorted({r.stream for r in results})
        for stream in streams:  # the index sizes in the same round trip: trimming is rarely needed
            pipe.zcard(keys.mask_index(stream))
        sizes = (await pipe.execute())[-len(streams) :]
        for stream, size in zip(streams, sizes, strict=True):
            if int(size) > self.max_per_stream:
                await self._trim(stream, int(size) - self.max_per_stream)

    async def _trim(self, stream: str, excess: int) -> None:
        """Delete the stream's ``excess`` oldest results."""
        index = keys.mask_index(stream)
        old = cast(list[bytes], await self.redis.zrange(index, 0, excess - 1))
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(*(keys.mask(stream, int(seq)) for seq in old))
        pipe.zrem(index, *old)
        await pipe.execute()

    async def get(self, stream: str, seq: int, labels: bool = True) -> MaskResult | None:
        (result,) = await self.get_many([(stream, seq)], labels)
        return result

    async def get_many(self, refs: Sequence[tuple[str, int]], labels: bool = True) -> list[MaskResult | None]:
        """Results of (stream, seq) pairs in one round trip, in order; None where there is none.

        With ``labels=False`` only the metadata is read (``labels_png`` is empty): listings and
        statistics need no label maps, which are most of a result's bytes.
        """
        if not refs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for stream, seq in refs:
            if labels:
                pipe.hgetall(keys.mask(stream, seq))
            else:
                pipe.hget(keys.mask(stream, seq), META_FIELD)
        out: list[MaskResult | None] = []
        for reply in await pipe.execute():
            if not reply:
                out.append(None)
            elif labels:
                out.append(MaskResult.from_fields(reply))
            else:
                out.append(MaskResult.from_fields({META_FIELD.encode(): reply}))
        return out

    async def latest_seq(self, stream: str) -> int | None:
        newest = cast(list[bytes], await self.redis.zrange(keys.mask_index(stream), -1, -1))
        return int(newest[0]) if newest else None

    async def seqs(self, stream: str, before: int | None = None, limit: int = 50) -> list[int]:
        """Sequence numbers newest first, strictly below ``before`` when given (cursor paging)."""
        high = f"({before}" if before is not None else "+inf"
        found = cast(
            list[bytes],
            await self.redis.zrevrangebyscore(keys.mask_index(stream), high, "-inf", start=0, num=limit),
        )
        return [int(s) for s in found]
