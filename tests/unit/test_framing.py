"""RFC 4571 framing: the incremental decoder and the async frame reader, on real captures."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import Rfc4571Decoder, frame, read_frame, send_frame
from flowcloud.protocol.rtp import RtpPacket

DATA = Path(__file__).parent.parent / "data"


def test_frame_prefixes_the_length() -> None:
    assert frame(b"abc") == b"\x00\x03abc"
    assert frame(b"") == b"\x00\x00"
    assert len(frame(b"x" * 65535)) == 65537
    with pytest.raises(ProtocolError, match="^packet of 65536 bytes does not fit an RFC 4571 frame"):
        frame(b"x" * 65536)


def test_any_chunking_gives_the_same_frames() -> None:
    data = (DATA / "gst_160x120_mtu600.bin").read_bytes()
    whole = Rfc4571Decoder().feed(data)
    assert len(whole) == 35
    assert b"".join(frame(f) for f in whole) == data
    rng = random.Random(7)
    decoder = Rfc4571Decoder()
    pieces: list[bytes] = []
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 50, 700])
        pieces += decoder.feed(data[pos : pos + step])
        pos += step
        assert decoder.buffered <= 2 + 600  # never more than one frame held back
    assert pieces == whole
    assert decoder.buffered == 0


def test_truncated_capture_keeps_the_partial_frame_buffered() -> None:
    data = (DATA / "gst_160x120_mtu600_truncated.bin").read_bytes()
    decoder = Rfc4571Decoder()
    frames = decoder.feed(data)
    full = Rfc4571Decoder().feed((DATA / "gst_160x120_mtu600.bin").read_bytes())
    assert frames == full[: len(frames)]
    assert decoder.buffered > 0
    assert sum(len(f) + 2 for f in frames) + decoder.buffered == len(data)
    assert all(RtpPacket.parse(f).payload_type == 96 for f in frames)


def test_oversized_frame_is_an_error_and_the_stream_stays_failed() -> None:
    decoder = Rfc4571Decoder(max_frame_size=1500)
    assert decoder.feed(b"\x00\x02ab\x06") == [b"ab"]
    message = "^RFC 4571 frame of 1537 bytes exceeds the limit of 1500 bytes$"
    with pytest.raises(ProtocolError, match=message):
        decoder.feed(b"\x01")
    with pytest.raises(ProtocolError, match=message):
        decoder.feed(b"\x00\x01a")


def test_zero_length_frames_pass_through() -> None:
    decoder = Rfc4571Decoder()
    assert decoder.feed(b"\x00") == []
    assert decoder.feed(b"\x00") == [b""]
    assert decoder.feed(b"\x00\x00\x00\x01z") == [b"", b"z"]


async def _reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_read_frame_reads_one_frame_at_a_time() -> None:
    async def scenario() -> None:
        reader = await _reader_with(frame(b"one") + frame(b"two"))
        assert await read_frame(reader, 10) == b"one"
        assert await read_frame(reader, 10) == b"two"
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await read_frame(reader, 10)
        assert info.value.partial == b""

    asyncio.run(scenario())


def test_read_frame_refuses_an_oversized_length_before_reading_the_body() -> None:
    async def scenario() -> None:
        reader = await _reader_with(b"\x10\x00", eof=False)
        message = "^RFC 4571 frame of 4096 bytes exceeds the limit of 100 bytes$"
        with pytest.raises(ProtocolError, match=message):
            await asyncio.wait_for(read_frame(reader, 100), 1)

    asyncio.run(scenario())


def test_frames_before_a_bad_length_in_the_same_chunk_are_returned_first() -> None:
    decoder = Rfc4571Decoder(max_frame_size=100)
    assert decoder.feed(b"\x00\x01a\x00\x01b\xff\xffjunk") == [b"a", b"b"]
    with pytest.raises(ProtocolError, match="^RFC 4571 frame of 65535 bytes exceeds the limit of 100 bytes$"):
        decoder.feed(b"")


def test_send_frame_queues_a_message_and_refuses_a_closing_connection() -> None:
    async def main() -> None:
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await received.put(await read_frame(reader))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            assert send_frame(writer, b"goaway")
            assert await asyncio.wait_for(received.get(), 5) == b"goaway"
            writer.close()
            assert not send_frame(writer, b"late")  # closing: refused, not raised
            await writer.wait_closed()

    asyncio.run(main())
