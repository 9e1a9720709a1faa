"""Delay reports: tell a live edge how late its access units arrive, so it can see a queue on the path.

An edge measures its own backlog (its send queue and its socket's unsent bytes); a queue further
on, in a router or a link emulator in front of a slow link, it cannot see, and live latency grows
there unnoticed (bufferbloat). In the spirit of RTCP receiver reports and transport-wide congestion
control feedback, the gateway sends an edge that asked (``delay_reports`` in its HELLO's stream
description) a `DelayReport` on the session's own connection at most every ``interval`` seconds
while access units arrive: the one-way delay (receipt minus the edge's send time, mapped by the
handshake's clock offset) of the newest one. The edge adds the delay's rise above the session's
lowest to its backlog, and spools whole GOPs when it passes its bound (edge.sender.PathDelay).
"""

from __future__ import annotations

import asyncio
import logging
import time

from flowcloud.protocol.framing import send_frame
from flowcloud.protocol.handshake import DelayReport
from services.gateway import metrics
from services.gateway.pipeline import UnitTimes

log = logging.getLogger(__name__)

INTERVAL = 0.1  # seconds between two reports of one session (at most)


class DelayReporter:
    """Sends one session's delay reports on its connection (never blocks)."""

    def __init__(self, writer: asyncio.StreamWriter, session_id: str, interval: float = INTERVAL) -> None:
        self.writer = writer
        self.session_id = session_id
        self.interval = interval
        self.sent = 0
        self._last = float("-inf")

    def observe(self, times: UnitTimes) -> bool:
        """An access unit arrived: report its delay unless a report went out within ``interval``
        (or it has no send time: an older edge); True when sent."""
        now = time.monotonic()
        if times.sent_ts is None or now - self._last < self.interval:
            return False
        delay = times.recv_ts - times.sent_ts
        if not send_frame(self.writer, DelayReport(delay).to_bytes()):
            log.debug("session %s: delay report not sent: the connection is closing", self.session_id)
            return False
        self._last = now
        self.sent += 1
        metrics.DELAY_REPORTS.inc()
        metrics.REPORTED_DELAY.observe(delay)
        return True
