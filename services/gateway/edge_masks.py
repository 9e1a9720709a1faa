"""Masks an edge made with its fallback model while the cloud was unreachable, synced on reconnect.

The edge opens a connection whose HELLO stream description says ``masks`` and sends one
`EdgeMask` per RFC 4571 frame. Each becomes a `MaskResult` with ``producer: edge`` in the result
store (`MaskStore.put_edge`), keyed by capture time and kept beside any cloud result for the
same frame: neither overwrites the other. Capture times are mapped to Redis's clock as frames'
are (the connection's clock offset, then the publisher's). A malformed message ends the
connection (counted); writes are idempotent, so an edge that resends after a lost connection
leaves one copy.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from flowcloud.protocol.edge_mask import MAX_MASK_MESSAGE, EdgeMask
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import read_frame
from flowcloud.results import PRODUCER_EDGE, MaskResult, MaskStore
from services.gateway import metrics

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 30.0  # seconds a masks connection may stay silent before it is closed


async def receive_edge_masks(
    reader: asyncio.StreamReader, stream: str, offset: float, store: MaskStore, clock_offset: float
) -> int:
    """Store the masks arriving until the edge closes; how many were stored. ``offset`` maps the
    edge clock to this machine's, ``clock_offset`` this machine's to Redis's."""
    stored = 0
    while True:
        try:
            async with asyncio.timeout(IDLE_TIMEOUT):
                body = await read_frame(reader, MAX_MASK_MESSAGE)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return stored
        except ProtocolError as exc:  # a frame above the size cap
            metrics.EDGE_MASKS.labels("malformed").inc()
            log.warning("edge masks of %s: %s; closing", stream, exc)
            return stored
        try:
            mask = EdgeMask.parse(body)
        except ProtocolError as exc:
            metrics.EDGE_MASKS.labels("malformed").inc()
            log.warning("edge masks of %s: %s; closing", stream, exc)
            return stored
        capture = mask.capture_time + offset + clock_offset
        result = MaskResult(
            stream=stream,
            seq=0,  # not a published frame's seq: edge masks are keyed by capture time
            capture_ts=capture,
            recv_ts=capture,
            infer_start=capture,
            infer_end=capture + mask.infer_seconds,
            persisted_ts=0.0,
            model=mask.model,
            model_version=mask.model_version,
            label_set=mask.label_set,
            width=mask.width,
            height=mask.height,
            shares=mask.shares,
            labels_png=mask.labels_png,
            backfill=True,
            producer=PRODUCER_EDGE,
        )
        try:
            await store.put_edge(result)
        except (RedisError, OSError) as exc:
            metrics.EDGE_MASKS.labels("redis_unavailable").inc()
            log.warning("edge masks of %s: Redis unavailable (%s); closing", stream, exc)
            return stored
        stored += 1
        metrics.EDGE_MASKS.labels("stored").inc()
