"""The gateway's handshake rules, driven with bytes (no socket, the clock given)."""

from __future__ import annotations

import pytest

from flowcloud.protocol.framing import Rfc4571Decoder
from flowcloud.protocol.handshake import Accept, ClockSync, Hello, Reject, StreamInfo
from flowcloud.registry import Device
from services.gateway.admission import Admission, AdmissionLimits, Refused, reject_frame

LIMITS = AdmissionLimits(max_width=1920, max_height=1080, max_sessions=2)
DEVICE = Device("cam-1", "acme", created=0.0)


def hello(width: int = 640, height: int = 480, edge_time: float = 100.0) -> bytes:
    return Hello("cam-1", "secret", StreamInfo(width, height, 30.0), edge_time=edge_time).to_bytes()


def unframe(data: bytes) -> bytes:
    (body,) = Rfc4571Decoder().feed(data)
    return body


def admission(times: list[float]) -> Admission:
    clock = iter(times)
    return Admission(LIMITS, "s-1", clock=lambda: next(clock))


def test_a_good_handshake_accepts_with_the_clock_exchange() -> None:
    a = admission([200.0, 200.5])
    assert a.receive_hello(hello()).device_id == "cam-1"
    accept = Accept.parse(unframe(a.admit(DEVICE, live={"other"})))
    assert (accept.session_id, accept.edge_time, accept.gateway_recv, accept.gateway_send) == (
        "s-1",
        100.0,
        200.0,
        200.5,
    )
    sync = a.receive_clock(ClockSync(offset=99.75, rtt=0.5).to_bytes())
    assert (sync.offset, sync.rtt) == (99.75, 0.5)


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"\xff not json", "malformed", "hello: "),
        (b'{"type": "hello", "version": 99}', "version", "version 99"),
    ],
)
def test_a_bad_hello_is_refused_with_its_code(body: bytes, code: str, message: str) -> None:
    with pytest.raises(Refused) as refused:
        admission([1.0]).receive_hello(body)
    assert refused.value.code == code and message in refused.value.reason
    assert Reject.parse(unframe(reject_frame(refused.value))).code == code


def test_limits_refuse_an_oversized_stream_and_a_full_gateway_but_not_a_reconnect() -> None:
    a = admission([1.0, 2.0])
    a.receive_hello(hello(width=3840, height=2160))
    with pytest.raises(Refused, match="stream size 3840x2160 is above the cap 1920x1080") as refused:
        a.admit(DEVICE, live=set())
    assert refused.value.code == "limit"
    a = admission([1.0, 2.0, 3.0])
    a.receive_hello(hello())
    with pytest.raises(Refused, match="maximum of 2 sessions"):
        a.admit(DEVICE, live={"a", "b"})
    a.admit(DEVICE, live={"cam-1", "b"})  # its own older session will be replaced: not one more


def test_a_malformed_clock_message_is_refused() -> None:
    a = admission([1.0, 2.0])
    a.receive_hello(hello())
    a.admit(DEVICE, live=set())
    with pytest.raises(Refused, match="clock: ") as refused:
        a.receive_clock(b'{"type": "clock"}')
    assert refused.value.code == "malformed"
