"""The protocol pieces of the offline story: the keyframe request (gateway -> edge) and the
stream description's ``backfill`` and ``spooled`` fields; the gateway's rate-limited requester."""

from __future__ import annotations

import asyncio
import socket

import pytest

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import read_frame
from flowcloud.protocol.handshake import Hello, KeyframeRequest, StreamInfo, parse_control
from services.gateway.keyframes import KeyframeRequester


def test_keyframe_request_round_trips() -> None:
    message = parse_control(KeyframeRequest("drop").to_bytes())
    assert message == KeyframeRequest("drop")
    with pytest.raises(ProtocolError, match="keyframe lacks field 'reason'"):
        KeyframeRequest.parse(b'{"type":"keyframe"}')


def test_stream_description_carries_the_backfill_lane() -> None:
    stream = StreamInfo(96, 64, 30.0, backfill=True, spooled=120)
    hello = Hello.parse(Hello("cam-1", "tok", stream).to_bytes())
    assert hello.stream == stream
    assert "backfill" not in StreamInfo(96, 64, 30.0).to_dict()  # old gateways see what they knew
    base = StreamInfo(96, 64, 30.0).to_dict()
    with pytest.raises(ProtocolError, match="'backfill' and 'masks' must be bool"):
        StreamInfo.from_dict({**base, "backfill": 1})
    with pytest.raises(ProtocolError, match="spooled -1 is out of range"):
        StreamInfo.from_dict({**base, "spooled": -1})


def test_requests_are_rate_limited() -> None:
    async def main() -> None:
        left, right = socket.socketpair()
        reader, left_writer = await asyncio.open_connection(sock=left)
        right_reader, writer = await asyncio.open_connection(sock=right)  # both kept: GC would close them
        requester = KeyframeRequester(writer, "s1", min_interval=0.2)
        assert requester.request("drop")
        assert not requester.request("drop")  # within the interval
        await asyncio.sleep(0.25)
        assert requester.request("decoder_restart")
        await writer.drain()
        got = [parse_control(await read_frame(reader)) for _ in range(2)]
        assert got == [KeyframeRequest("drop"), KeyframeRequest("decoder_restart")]
        writer.close()
        left_writer.close()
        assert not right_reader.at_eof()

    asyncio.run(main())
