"""The one error type for bad input on the wire."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Bytes that do not follow the protocol; the message says exactly what is wrong.

    Receivers catch it, count it and drop the packet (or the session), never the process.
    """
