"""The gateway's side of the handshake as pure code: control messages in, decisions and replies out.

`Admission` holds the rules a connection must pass before any RTP byte is parsed: a HELLO that
parses and speaks our version, a device the registry accepts (checked by the caller, since that
is I/O), a declared frame size within the cap, room under the session limit, then a CLOCK message.
Each refusal is a `Refused` with its REJECT code; `reject_frame` is what to send for it. No
sockets and no clock but the one given, so tests drive it with bytes (`tests/unit/test_admission.py`).
The session (`services.gateway.session`) reads and writes the frames, within the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import frame
from flowcloud.protocol.handshake import (
    REJECT_LIMIT,
    REJECT_MALFORMED,
    REJECT_VERSION,
    Accept,
    ClockSync,
    Hello,
    Reject,
    UnsupportedVersion,
)
from flowcloud.registry import Device
from flowcloud.settings import GatewaySettings


class Refused(Exception):
    """The handshake failed; ``code`` is a REJECT code (None: close without a REJECT)."""

    def __init__(self, code: str | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class AdmissionLimits:
    max_width: int
    max_height: int
    max_sessions: int

    @classmethod
    def of(cls, settings: GatewaySettings) -> AdmissionLimits:
        return cls(settings.max_width, settings.max_height, settings.max_sessions)


def reject_frame(refused: Refused) -> bytes:
    """The framed REJECT for ``refused`` (which must carry a code)."""
    assert refused.code is not None
    return frame(Reject(refused.code, refused.reason).to_bytes())


class Admission:
    """One connection's handshake: `hello`, then (device verified by the caller) `admit`, then `clock`."""

    def __init__(
        self, limits: AdmissionLimits, session_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.limits = limits
        self.session_id = session_id
        self.clock = clock
        self.hello: Hello | None = None
        self.device: Device | None = None
        self.clock_sync: ClockSync | None = None
        self._hello_received = 0.0

    def receive_hello(self, body: bytes) -> Hello:
        """The HELLO's frame body; Refused (version, malformed) when it cannot open a session."""
        self._hello_received = self.clock()
        try:
            self.hello = Hello.parse(body)
        except UnsupportedVersion as exc:
            raise Refused(REJECT_VERSION, str(exc)) from None
        except ProtocolError as exc:
            raise Refused(REJECT_MALFORMED, f"hello: {exc}") from None
        return self.hello

    def admit(self, device: Device, live: Collection[str]) -> bytes:
        """The framed ACCEPT for a verified device, given the device ids with a live session here;
        Refused (limit) when the stream is above the size cap or the gateway is full."""
        hello = self.hello
        assert hello is not None, "receive_hello first"
        limits = self.limits
        if hello.stream.width > limits.max_width or hello.stream.height > limits.max_height:
            raise Refused(
                REJECT_LIMIT,
                f"stream size {hello.stream.width}x{hello.stream.height} is above the cap "
                f"{limits.max_width}x{limits.max_height}",
            )
        if device.device_id not in live and len(live) >= limits.max_sessions:
            raise Refused(REJECT_LIMIT, f"the gateway holds its maximum of {limits.max_sessions} sessions")
        self.device = device
        accept = Accept(self.session_id, hello.edge_time, self._hello_received, self.clock())
        return frame(accept.to_bytes())

    def receive_clock(self, body: bytes) -> ClockSync:
        """The CLOCK message's frame body; Refused (malformed) when it does not parse."""
        assert self.device is not None, "admit first"
        try:
            self.clock_sync = ClockSync.parse(body)
        except ProtocolError as exc:
            raise Refused(REJECT_MALFORMED, f"clock: {exc}") from None
        return self.clock_sync
