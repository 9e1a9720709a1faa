"""Several gateway replicas on one Redis (the chart runs two): one live session per device across
them, and frame seqs that never collide, whichever replicas publish a stream's frames."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis
from support.frames import frames_on_redis
from support.gateway import (
    FPS,
    connect,
    gateway_settings,
    libx264_access_units,
    published_offset,
    register,
    rtp_packets,
    session_ended,
)
from support.waiting import eventually

from flowcloud import keys
from flowcloud.frames import Frame
from services.gateway.publisher import UNASSIGNED_SEQ, FramePublisher
from services.gateway.server import Gateway

T0 = 1_764_200_000.0


def test_reconnect_through_another_replica_replaces_the_old_session(redis_url: str) -> None:
    """The edge's link to replica A went half-open; it reconnects through replica B. A closes its
    session within a second (reason ``replaced``), the stream stays ``live``, and the seqs go on."""
    packets = [rtp_packets(libx264_access_units(15), t) for t in (T0, T0 + 100)]

    async def main() -> None:
        token = await register(redis_url, "roamer")
        async with (
            Gateway(gateway_settings(redis_url)).listen(port=0) as a,
            Gateway(gateway_settings(redis_url)).listen(port=0) as b,
        ):
            first = await connect(a.port, "roamer", token)
            await first.send(packets[0])
            assert await eventually(lambda: len(frames_on_redis(redis_url, "roamer")) >= 15, 10)
            old = a.sessions["roamer"]

            second = await connect(b.port, "roamer", token)  # the first connection stays open
            assert await first.closed_by_gateway(timeout=10.0)  # at once; the allowance is for load
            assert await session_ended(a, "roamer")
            assert old.end_reason == "replaced" and "roamer" not in a.sessions
            assert b.sessions["roamer"].end_reason is None  # B's own announcement did not close it

            await second.send(packets[1])
            assert await eventually(lambda: len(frames_on_redis(redis_url, "roamer")) >= 30, 10)
            client = redis.Redis.from_url(redis_url, decode_responses=True)
            status = client.hget(keys.stream_meta("roamer"), keys.M_STATUS)
            client.close()
            assert status == keys.STATUS_LIVE  # A's ending did not mark B's live stream idle
            await second.close()
            assert await session_ended(b, "roamer")
            offset = published_offset(second, b)

        frames = frames_on_redis(redis_url, "roamer")
        assert [f.seq for f in frames] == list(range(1, 31))
        assert frames[15].capture_ts == pytest.approx(T0 + 100 + offset, abs=2e-6)

    asyncio.run(main())


def test_publishers_on_one_stream_never_hand_out_a_seq_twice(redis_url: str) -> None:
    """Two replicas' publishers writing the same stream at once (the overlap of a takeover)."""
    per_publisher, stream = 120, "shared"

    def frame(i: int) -> Frame:
        return Frame(stream, UNASSIGNED_SEQ, T0 + i / FPS, T0 + i / FPS, 8, 8, "raw", bytes(192))

    async def publish(offset: int) -> None:
        client = aioredis.Redis.from_url(redis_url)
        publisher = FramePublisher(client, frames_maxlen=10_000)
        publisher.start()
        for i in range(per_publisher):
            publisher.submit(frame(offset + i))
            if i % 7 == 0:
                await asyncio.sleep(0)  # let the other publisher's batches interleave with ours
        await publisher.close(timeout=10)
        assert publisher.published == per_publisher
        await client.aclose()

    async def main() -> None:
        await asyncio.gather(publish(0), publish(1000))

    asyncio.run(main())
    seqs = sorted(f.seq for f in frames_on_redis(redis_url, stream))
    assert seqs == list(range(1, 2 * per_publisher + 1))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget(keys.stream_meta(stream), keys.M_LAST_SEQ) == str(2 * per_publisher)
    client.close()
