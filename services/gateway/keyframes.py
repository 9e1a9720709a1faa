"""Keyframes on demand: when a session loses decodable state, ask the edge for an IDR.

In the spirit of RTCP's Picture Loss Indication (RFC 4585 6.3.1): when an access unit is dropped
(loss, a broken unit, a rate limit, a decoder error), when the decoder restarts, or when a session
starts mid-stream (its first access unit is no IDR), decoding can only resume at the next IDR. A
`KeyframeRequest` control message back on the session's own connection gets one from the edge's
encoder at once instead of at the next natural keyframe (up to a GOP later). Requests are rate
limited per session (``min_interval``, like RFC 4585's limits on feedback), and the first one
after a quiet period goes out at once, so the next frame arrives within a frame interval plus the
round-trip time. An edge that cannot make an IDR (a relayed stream) counts the request and waits.
"""

from __future__ import annotations

import asyncio
import logging
import time

from flowcloud.protocol.framing import send_frame
from flowcloud.protocol.handshake import KeyframeRequest
from services.gateway import metrics

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.5  # seconds between two requests of one session

# Why a keyframe was requested (label values of flowcloud_gateway_keyframe_requests_total).
REASON_DROP = "drop"  # an access unit was dropped
REASON_DECODER_RESTART = "decoder_restart"
REASON_SESSION_START = "session_start"  # the session began mid-stream


class KeyframeRequester:
    """Sends rate-limited keyframe requests on one session's connection (never blocks)."""

    def __init__(self, writer: asyncio.StreamWriter, session_id: str, min_interval: float = MIN_INTERVAL):
        self.writer = writer
        self.session_id = session_id
        self.min_interval = min_interval
        self.sent = 0
        self._last = float("-inf")
        self._asked_at: float | None = None  # when the last request went out, until an IDR arrives

    def request(self, reason: str) -> bool:
        """Ask for an IDR unless one was asked for within ``min_interval``; True when sent."""
        now = time.monotonic()
        if now - self._last < self.min_interval or self.writer.is_closing():
            metrics.KEYFRAME_REQUESTS.labels(reason, "rate_limited").inc()
            return False
        self._last = now
        if not send_frame(self.writer, KeyframeRequest(reason).to_bytes()):
            log.debug("session %s: keyframe request not sent: the connection is closing", self.session_id)
            return False
        self.sent += 1
        self._asked_at = self._asked_at or now
        metrics.KEYFRAME_REQUESTS.labels(reason, "sent").inc()
        log.debug("session %s: asked the edge for a keyframe (%s)", self.session_id, reason)
        return True

    def keyframe_arrived(self) -> None:
        """An IDR arrived: the time since the first unanswered request is the edge's answer time."""
        if self._asked_at is not None:
            metrics.KEYFRAME_ANSWER_SECONDS.observe(time.monotonic() - self._asked_at)
            self._asked_at = None
