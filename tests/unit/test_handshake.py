"""The handshake: message validation with exact errors, the clock-offset arithmetic, and the
client side against a real asyncio TCP server on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest
from support.waiting import eventually

from flowcloud.keys import IDENTIFIER_RULE
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import read_frame, write_frame
from flowcloud.protocol.handshake import (
    MAX_CONTROL_SIZE,
    REJECT_CODES,
    Accept,
    ClockSync,
    HandshakeRejected,
    Hello,
    Reject,
    StreamInfo,
    UnsupportedVersion,
    client_handshake,
    clock_offset,
    parse_control,
)

STREAM = StreamInfo(width=640, height=480, fps=30.0)
HELLO = Hello(device_id="cam-01.street_A", token="s3cret", stream=STREAM, edge_time=1000.5)


def hello_obj(**changes: object) -> dict[str, object]:
    obj = json.loads(HELLO.to_bytes())
    obj.update(changes)
    return obj


def test_messages_round_trip() -> None:
    assert json.loads(HELLO.to_bytes()) == {
        "type": "hello",
        "version": 1,
        "device_id": "cam-01.street_A",
        "token": "s3cret",
        "stream": {"codec": "H264", "width": 640, "height": 480, "fps": 30.0, "clock_rate": 90000},
        "edge_time": 1000.5,
    }
    assert Hello.parse(HELLO.to_bytes()) == HELLO
    assert "s3cret" not in repr(HELLO)
    accept = Accept("sess-1", 1000.5, 1001.25, 1001.5)
    assert parse_control(accept.to_bytes()) == accept
    assert json.loads(accept.to_bytes())["type"] == "accept"
    reject = Reject("bad_token", "token does not match")
    assert parse_control(reject.to_bytes()) == reject
    clock = ClockSync(offset=-2.5, rtt=0.004)
    assert parse_control(clock.to_bytes()) == clock
    assert json.loads(clock.to_bytes()) == {"type": "clock", "offset": -2.5, "rtt": 0.004}
    assert REJECT_CODES == (
        "unknown_device",
        "bad_token",
        "revoked",
        "busy",
        "version",
        "limit",
        "malformed",
        "certificate",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfe", "control message is not UTF-8"),
        (b"{nope", "control message is not JSON"),
        (b"[1, 2]", "control message is not a JSON object"),
        (b"{}", "expected a 'hello' message, got type None"),
        (b" " * (MAX_CONTROL_SIZE + 1), "control message of 4097 bytes exceeds the limit of 4096"),
        (json.dumps(hello_obj(version="1")).encode(), "hello field 'version' must be int, got str"),
        (json.dumps(hello_obj(device_id="")).encode(), f"device id '' is invalid: use {IDENTIFIER_RULE}"),
        (
            json.dumps(hello_obj(device_id="x" * 65)).encode(),
            f"device id '{'x' * 65}' is invalid: use {IDENTIFIER_RULE}",
        ),
        (
            json.dumps(hello_obj(device_id="cam/../etc")).encode(),
            f"device id 'cam/../etc' is invalid: use {IDENTIFIER_RULE}",
        ),
        (
            json.dumps(hello_obj(device_id="-cam")).encode(),
            f"device id '-cam' is invalid: use {IDENTIFIER_RULE}",
        ),
        (json.dumps(hello_obj(token="t" * 257)).encode(), "token must have 1 to 256 characters, got 257"),
        (json.dumps(hello_obj(token=None)).encode(), "hello field 'token' must be str, got NoneType"),
        (json.dumps(hello_obj(stream=5)).encode(), "hello field 'stream' must be an object"),
        (
            json.dumps(hello_obj(stream={**STREAM.to_dict(), "codec": "VP8"})).encode(),
            "codec 'VP8' is not supported (only H264)",
        ),
        (
            json.dumps(hello_obj(stream={**STREAM.to_dict(), "width": 0})).encode(),
            "stream size 0x480 is out of range [1, 16384]",
        ),
        (
            json.dumps(hello_obj(stream={**STREAM.to_dict(), "height": True})).encode(),
            "hello stream field 'height' must be int, got bool",
        ),
        (
            json.dumps(hello_obj(stream={**STREAM.to_dict(), "fps": 0})).encode(),
            "stream fps 0.0 is out of range (0, 1000]",
        ),
        (
            json.dumps(hello_obj(stream={**STREAM.to_dict(), "clock_rate": 8000})).encode(),
            "clock rate 8000 is not supported (only 90000)",
        ),
        (
            json.dumps({k: v for k, v in hello_obj().items() if k != "edge_time"}).encode(),
            "hello lacks field 'edge_time'",
        ),
        (b'{"type":"hello","version":1,"device_id":"a","token":"b","stream":{}, "edge_time":1e999}', None),
    ],
)
def test_hello_validation_errors(body: bytes, message: str | None) -> None:
    with pytest.raises(ProtocolError) as info:
        Hello.parse(body)
    if message is not None:
        assert str(info.value) == message
    assert not isinstance(info.value, UnsupportedVersion)


def test_another_version_is_an_unsupported_version_error() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        Hello.parse(json.dumps(hello_obj(version=2)).encode())
    assert str(info.value) == "protocol version 2 is not supported (this side speaks 1)"
    assert info.value.version == 2
    assert isinstance(info.value, ProtocolError)


def test_other_messages_validate() -> None:
    with pytest.raises(ProtocolError, match="^unknown reject code 'nope'$"):
        Reject.parse(b'{"type":"reject","code":"nope","reason":"x"}')
    with pytest.raises(ProtocolError, match="^clock rtt -1.0 is negative$"):
        ClockSync.parse(b'{"type":"clock","offset":0,"rtt":-1}')
    with pytest.raises(ProtocolError, match="^accept field 'gateway_send' is not a finite number$"):
        Accept.parse(
            b'{"type":"accept","version":1,"session_id":"s","edge_time":1,"gateway_recv":2,"gateway_send":1e999}'
        )
    with pytest.raises(ProtocolError, match="^unknown control message type 'bye'$"):
        parse_control(b'{"type":"bye"}')


def test_clock_offset_is_ntp_style() -> None:
    # The gateway clock runs 100 s ahead; 10 ms each way; 5 ms inside the gateway.
    t0 = 1000.0
    t1 = t0 + 0.010 + 100
    t2 = t1 + 0.005
    t3 = t2 - 100 + 0.010
    offset, rtt = clock_offset(t0, t1, t2, t3)
    assert offset == pytest.approx(100.0)
    assert rtt == pytest.approx(0.020)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _with_server(handler: Handler, client: Callable[[str, int], Awaitable[None]]) -> None:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await client("127.0.0.1", port)


async def _connect_and_handshake(host: str, port: int, timeout: float = 2.0) -> tuple[Accept, ClockSync]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await client_handshake(reader, writer, HELLO, timeout)
    finally:
        writer.close()


def test_client_handshake_against_a_real_server_measures_the_offset() -> None:
    seen: list[object] = []

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = Hello.parse(await read_frame(reader, MAX_CONTROL_SIZE))
        t1 = time.time() + 100.0  # this gateway's clock runs 100 s ahead
        seen.append(hello)
        await asyncio.sleep(0.01)
        accept = Accept("sess-9", hello.edge_time, t1, time.time() + 100.0)
        await write_frame(writer, accept.to_bytes())
        seen.append(parse_control(await read_frame(reader, MAX_CONTROL_SIZE)))
        writer.close()

    async def client(host: str, port: int) -> None:
        before = time.time()
        accept, clock = await _connect_and_handshake(host, port)
        assert accept.session_id == "sess-9"
        # NTP's bound, whatever the load: the true offset lies within half the round trip.
        assert clock.rtt >= 0 and abs(clock.offset - 100.0) <= clock.rtt / 2 + 1e-3
        assert await eventually(lambda: len(seen) == 2, 10)  # the gateway has read the CLOCK message
        hello = seen[0]
        assert isinstance(hello, Hello) and hello.device_id == HELLO.device_id
        assert before <= hello.edge_time <= time.time()  # stamped when sent
        assert seen[1] == clock

    asyncio.run(_with_server(gateway, client))


def test_client_handshake_raises_the_rejection() -> None:
    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader, MAX_CONTROL_SIZE)
        await write_frame(writer, Reject("revoked", "device cam-01.street_A was revoked").to_bytes())
        writer.close()

    async def client(host: str, port: int) -> None:
        with pytest.raises(HandshakeRejected) as info:
            await _connect_and_handshake(host, port)
        assert info.value.code == "revoked"
        assert (
            str(info.value) == "gateway rejected the connection: revoked: device cam-01.street_A was revoked"
        )

    asyncio.run(_with_server(gateway, client))


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("close", "gateway closed the connection during the handshake"),
        ("silent", "handshake not completed within 0.3 s"),
        ("garbage", "control message is not JSON"),
        ("wrong_echo", "accept echoes edge_time 1.0, sent "),
        ("hello_back", "expected 'accept' or 'reject', got Hello"),
    ],
)
def test_client_handshake_failures_are_protocol_errors(behaviour: str, message: str) -> None:
    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader, MAX_CONTROL_SIZE)
        if behaviour == "silent":
            await asyncio.sleep(1.0)
        elif behaviour == "garbage":
            await write_frame(writer, b"not json, an RTP packet maybe")
        elif behaviour == "wrong_echo":
            await write_frame(writer, Accept("s", 1.0, 2.0, 3.0).to_bytes())
        elif behaviour == "hello_back":
            await write_frame(writer, HELLO.to_bytes())
        writer.close()

    async def client(host: str, port: int) -> None:
        with pytest.raises(ProtocolError) as info:
            await _connect_and_handshake(host, port, timeout=0.3)
        assert str(info.value).startswith(message)

    asyncio.run(_with_server(gateway, client))
