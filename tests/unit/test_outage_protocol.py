"""The protocol pieces of the offline story: the keyframe request (gateway -> edge) and the
stream description's ``backfill`` and ``spooled`` fields; the gateway's rate-limited requester."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket

import numpy as np
import pytest

from flowcloud.labels import LABEL_IDS
from flowcloud.protocol.edge_mask import MAX_MASK_MESSAGE, EdgeMask
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import read_frame
from flowcloud.protocol.handshake import Hello, KeyframeRequest, StreamInfo, parse_control
from flowcloud.results import encode_label_map
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
    with pytest.raises(ProtocolError, match="'backfill', 'masks' and 'delay_reports' must be bool"):
        StreamInfo.from_dict({**base, "backfill": 1})
    with pytest.raises(ProtocolError, match="spooled -1 is out of range"):
        StreamInfo.from_dict({**base, "spooled": -1})
    carried = StreamInfo(96, 64, 30.0, spooled=120, carried=50)
    assert Hello.parse(Hello("cam-1", "tok", carried).to_bytes()).stream == carried
    assert "carried" not in StreamInfo(96, 64, 30.0, spooled=120).to_dict()
    with pytest.raises(ProtocolError, match=r"carried 121 is out of range \[0, spooled 120\]"):
        StreamInfo.from_dict({**base, "spooled": 120, "carried": 121})


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


def edge_mask() -> EdgeMask:
    png = encode_label_map(np.zeros((4, 8), np.uint8), LABEL_IDS)
    return EdgeMask(1_764_000_000.5, "small_unet", "demo-1", LABEL_IDS.name, 8, 4, 0.2, {7: 1.0}, png)


def test_edge_mask_round_trips() -> None:
    mask = edge_mask()
    assert EdgeMask.parse(mask.to_bytes()) == mask


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"type": "hello"}, "expected a 'mask' message"),
        ({"labels_png": "not base64!"}, "'shares' or 'labels_png' are malformed"),
        ({"labels_png": base64.b64encode(b"GIF89a").decode()}, "not a PNG"),
        ({"width": 0}, "mask size 0x4 is out of bounds"),
        ({"capture_time": float("inf")}, "'capture_time' must be a non-negative number"),
        ({"model": ""}, "'model' must be a string of 1 to 128 characters"),
        ({"shares": [1]}, "'shares' must be an object"),
    ],
)
def test_a_malformed_edge_mask_gets_a_precise_error(change: dict[str, object], error: str) -> None:
    obj = {**json.loads(edge_mask().to_bytes()), **change}
    body = json.dumps(obj).encode()
    with pytest.raises(ProtocolError, match=re.escape(error)):
        EdgeMask.parse(body)


def test_an_edge_mask_is_bounded() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        EdgeMask.parse(b"{" + b" " * MAX_MASK_MESSAGE + b"}")
