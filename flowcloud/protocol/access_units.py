"""RTP/H.264 in RFC 4571 framing, as bytes in any chunking, to access units: the one receive loop.

`AccessUnitReader` chains `Rfc4571Decoder`, `RtpPacket.parse` and `Depacketizer`. The gateway
reads every session through it, and the edge every local RTP peer (the ``rfc4571://`` relay, the
replay of a recording, the GStreamer encoder's output). Pure code, no sockets, like the rest of
the package.

A packet that does not parse is refused and reported (``on_malformed``); reading goes on, since the
framing still holds. With ``max_malformed``, that many refused packets in a row raise
`ProtocolError` (a peer sending only garbage is not worth reading). Broken framing raises
`ProtocolError` at once: no later byte can be trusted. Access units the depacketizer drops are
reported by reason through ``on_drop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import Rfc4571Decoder
from flowcloud.protocol.h264 import (
    DEFAULT_MAX_ACCESS_UNIT_SIZE,
    DEFAULT_MAX_NAL_SIZE,
    AccessUnit,
    Depacketizer,
)
from flowcloud.protocol.rtp import RtpPacket


class AccessUnitReader:
    """Framed RTP bytes -> access units, keeping what it has not finished between calls."""

    def __init__(
        self,
        max_nal_size: int = DEFAULT_MAX_NAL_SIZE,
        max_access_unit_size: int = DEFAULT_MAX_ACCESS_UNIT_SIZE,
        on_drop: Callable[[str], object] | None = None,
        on_malformed: Callable[[ProtocolError], object] | None = None,
        max_malformed: int | None = None,
    ) -> None:
        self.framing = Rfc4571Decoder()
        self.depacketizer = Depacketizer(max_nal_size, max_access_unit_size, on_drop=on_drop)
        self.received = 0  # framed packets read, malformed ones included
        self.malformed = 0  # packets refused, in all
        self.max_malformed = max_malformed
        self._on_malformed = on_malformed
        self._malformed_in_a_row = 0
        self._error: ProtocolError | None = None

    @property
    def packets(self) -> int:
        """Packets parsed and given to the depacketizer."""
        return self.depacketizer.packets

    def feed(self, data: bytes) -> list[AccessUnit]:
        """The access units ``data`` completes, oldest first. `ProtocolError` when reading must stop:
        at once when no access unit came before the cause in ``data``, else on the next call."""
        if self._error is not None:
            raise self._error
        out: list[AccessUnit] = []
        for body in self.framing.feed(data):
            self.received += 1
            try:
                out += self.depacketizer.push(RtpPacket.parse(body))
            except ProtocolError as exc:
                self.malformed += 1
                self._malformed_in_a_row += 1
                if self._on_malformed is not None:
                    self._on_malformed(exc)
                if self.max_malformed is not None and self._malformed_in_a_row >= self.max_malformed:
                    self._error = ProtocolError(
                        f"{self._malformed_in_a_row} malformed packets in a row (last: {exc})"
                    )
                    if out:
                        return out
                    raise self._error from None
                continue
            self._malformed_in_a_row = 0
        return out

    def flush(self) -> list[AccessUnit]:
        """End of the stream: the access unit in progress (if whole) and any still held."""
        return self.depacketizer.flush()

    def read(self, chunks: Iterable[bytes]) -> Iterator[AccessUnit]:
        """Every access unit of ``chunks`` (a whole stream), the last one included."""
        for chunk in chunks:
            yield from self.feed(chunk)
        yield from self.flush()
