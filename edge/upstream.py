"""Access units from a local upstream peer that speaks RTP/H.264 in RFC 4571 framing.

Every such byte stream the edge reads goes through here: the ``rfc4571://`` relay, the replay of
a gateway recording, and the output of a GStreamer encoder. The loop itself is the protocol's
(`flowcloud.protocol.access_units.AccessUnitReader`, which the gateway uses too); this module
wires it to the edge's log and metrics. A packet that does not parse is skipped (logged); broken
framing ends the stream, since no later byte can be trusted. Access units the depacketizer drops
are counted by reason, in the caller's counter if it gives one, and in
``flowcloud_edge_frames_dropped_total`` as ``upstream_<reason>``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator

from edge import metrics
from flowcloud.protocol.access_units import AccessUnitReader
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.h264 import AccessUnit

log = logging.getLogger(__name__)


def access_units(
    chunks: Iterable[bytes], what: str, dropped: Counter[str] | None = None
) -> Iterator[AccessUnit]:
    """The access units in ``chunks``, in order; ``what`` names the peer in log lines."""

    def count(reason: str) -> None:
        if dropped is not None:
            dropped[reason] += 1
        metrics.FRAMES_DROPPED.labels(f"upstream_{reason}").inc()

    def bad_packet(exc: ProtocolError) -> None:
        log.warning("%s: dropped a bad packet: %s", what, exc)

    reader = AccessUnitReader(on_drop=count, on_malformed=bad_packet)
    try:
        yield from reader.read(chunks)
    except ProtocolError as exc:  # only the framing raises: bad packets are skipped
        log.warning("%s: framing lost, ignoring the rest: %s", what, exc)
