"""The edge -> gateway wire protocol, as pure code: RTP (RFC 3550/8285), H.264 payload (RFC 6184),
RFC 4571 framing, the handshake and the capture-time header extension.

Every parser raises only `ProtocolError` on bad input.
"""

from __future__ import annotations

from flowcloud.protocol.errors import ProtocolError

__all__ = ["ProtocolError"]
