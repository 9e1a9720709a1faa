"""Access units from RTP/H.264 in RFC 4571 framing, read from a local peer.

One path for every byte stream of that kind the edge reads: the ``rfc4571://`` relay, the replay
of a gateway recording, and the output of a GStreamer encoder. A packet that does not parse is
skipped (logged); broken framing ends the stream, since no later byte can be trusted. Access
units the depacketizer drops are counted by reason, in the caller's counter if it gives one, and in
``flowcloud_edge_frames_dropped_total`` as ``upstream_<reason>``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator

from edge import metrics
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import Rfc4571Decoder
from flowcloud.protocol.h264 import AccessUnit, Depacketizer
from flowcloud.protocol.rtp import RtpPacket

log = logging.getLogger(__name__)


def access_units(
    chunks: Iterable[bytes], what: str, dropped: Counter[str] | None = None
) -> Iterator[AccessUnit]:
    """The access units in ``chunks``, in order; ``what`` names the peer in log lines."""

    def count(reason: str) -> None:
        if dropped is not None:
            dropped[reason] += 1
        metrics.FRAMES_DROPPED.labels(f"upstream_{reason}").inc()

    framing = Rfc4571Decoder()
    depacketizer = Depacketizer(on_drop=count)
    for chunk in chunks:
        try:
            bodies = framing.feed(chunk)
        except ProtocolError as exc:
            log.warning("%s: framing lost, ignoring the rest: %s", what, exc)
            return
        for body in bodies:
            try:
                units = depacketizer.push(RtpPacket.parse(body))
            except ProtocolError as exc:
                log.warning("%s: dropped a bad packet: %s", what, exc)
                continue
            yield from units
