"""One device, two gateway replicas on one Redis: the live session is owned through a lease with a
generation (services.gateway.lease). The newest connection wins and the old session is closed
within a second, by the device event or, when that is lost, by the lease renewal; a late
announcement of an older generation closes nothing; and a stale session's frames are fenced."""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import cache

import pytest
import redis
import redis.asyncio as aioredis
from support.frames import entries as frame_entries
from support.frames import frames_on_redis
from support.gateway import (
    Edge,
    connect,
    dropped,
    gateway_settings,
    libx264_access_units,
    metric,
    register,
    rtp_packets,
    session_ended,
)
from support.waiting import eventually

from flowcloud import keys
from flowcloud.clock import RedisClock
from flowcloud.frame_log import log_key
from flowcloud.frames import Frame
from services.gateway.lease import StreamLease
from services.gateway.server import Gateway

T0 = 1_764_300_000.0
A_SIZE, B_SIZE = (64, 96), (48, 80)  # each replica resizes to its own size: a frame says who published it
TAKEOVER_BOUND = 1.0  # seconds: the old session is closed within this, wherever it runs


def replicas(redis_url: str, **a_settings: float) -> tuple[Gateway, Gateway]:
    a = Gateway(gateway_settings(redis_url, model_size="{}x{}".format(*A_SIZE), **a_settings))
    b = Gateway(gateway_settings(redis_url, model_size="{}x{}".format(*B_SIZE)))
    return a, b


@cache
def long_stream() -> list[list[bytes]]:
    """8 s of small real H.264 (GOP 15): enough to keep a connection sending through a takeover."""
    return libx264_access_units(240, width=160, height=120)


def streaming(edge: Edge, t0: float) -> asyncio.Task[None]:
    """The edge sends `long_stream` at 30 fps in the background (until the gateway closes it)."""

    async def send() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await edge.send(rtp_packets(long_stream(), t0), fps=30.0)

    return asyncio.create_task(send())


def sizes_in_seq_order(redis_url: str, stream: str) -> list[tuple[int, int]]:
    return [(f.height, f.width) for f in sorted(frames_on_redis(redis_url, stream), key=lambda f: f.seq)]


def entries(redis_url: str, stream: str) -> list[tuple[int, Frame]]:
    """(the entry id's milliseconds on Redis's clock, the frame) of each frame of ``stream``."""
    client = redis.Redis.from_url(redis_url)
    try:
        logged = frame_entries(client, log_key(stream, False))
    finally:
        client.close()
    return [(int(i.split(b"-")[0]), Frame.from_fields(fields)) for i, fields in logged]


async def take_over(b: Gateway, device: str, token: str) -> tuple[Edge, float]:
    """A second connection of the device, through replica B; returns it and when it was dialled."""
    started = time.monotonic()
    edge = await connect(b.port, device, token)
    assert await eventually(lambda: device in b.sessions, 10)  # (it reads our CLOCK message first)
    return edge, started


def test_takeover_closes_the_old_session_within_a_second_and_one_session_publishes(redis_url: str) -> None:
    """The first connection (to A) keeps sending; the second (to B) takes the stream over. A closes
    its session within a second, and in seq order A's frames all come before B's."""

    async def main() -> None:
        token = await register(redis_url, "roamer")
        takeovers = metric("flowcloud_gateway_lease_takeovers_total")
        lost = metric("flowcloud_gateway_lease_lost_total", noticed="event")
        # Renewals rare on the old replica: the takeover must be noticed by the event (at the default
        # 0.5 s a renewal on a busy machine sometimes came first, and the event found it done).
        a, b = replicas(redis_url, lease_ttl=30.0, lease_renew_interval=10.0)
        async with a.listen(port=0), b.listen(port=0):
            first = await connect(a.port, "roamer", token)
            sending = streaming(first, T0)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "roamer")) >= 15, 20)
            old = a.sessions["roamer"]

            second, dialled = await take_over(b, "roamer", token)
            assert await first.closed_by_gateway(timeout=10.0)
            closed_after = time.monotonic() - dialled
            assert closed_after < TAKEOVER_BOUND, f"the old session was closed after {closed_after:.2f} s"
            assert await session_ended(a, "roamer")
            assert old.end_reason == "replaced"
            assert b.sessions["roamer"].lease is not None and old.lease is not None
            assert b.sessions["roamer"].lease.generation > old.lease.generation
            sending.cancel()

            await second.send(rtp_packets(libx264_access_units(15), T0 + 100))
            assert await eventually(lambda: B_SIZE in sizes_in_seq_order(redis_url, "roamer"), 20)
            await second.close()
            assert await session_ended(b, "roamer")

        sizes = sizes_in_seq_order(redis_url, "roamer")
        switch = sizes.index(B_SIZE)
        assert switch >= 15 and set(sizes[:switch]) == {A_SIZE} and set(sizes[switch:]) == {B_SIZE}
        assert metric("flowcloud_gateway_lease_takeovers_total") == takeovers + 1
        assert metric("flowcloud_gateway_lease_lost_total", noticed="event") == lost + 1

    asyncio.run(main())


def test_a_late_announcement_of_an_older_generation_does_not_close_the_newer_session(redis_url: str) -> None:
    """A's "connected" announcement arrives at B after B's newer session has started (a slow
    network, a retried publish): B keeps its session. Before leases it closed it."""

    async def main() -> None:
        token = await register(redis_url, "roamer")
        control = aioredis.Redis.from_url(redis_url)
        pubsub = control.pubsub()
        await pubsub.subscribe(keys.DEVICE_EVENTS)
        a, b = replicas(redis_url)
        async with a.listen(port=0), b.listen(port=0):
            first = await connect(a.port, "roamer", token)
            async with asyncio.timeout(10):  # A's announcement, as every gateway received it
                while (message := await pubsub.get_message(True, timeout=1)) is None:
                    pass
            announced = message["data"]

            second = await connect(b.port, "roamer", token)
            assert await first.closed_by_gateway(timeout=10.0)
            newer = b.sessions["roamer"]

            await control.publish(keys.DEVICE_EVENTS, announced)  # the same message, late
            assert not await eventually(lambda: newer.end_reason is not None, 1.5)  # (it was at once)
            await second.send(rtp_packets(libx264_access_units(15), T0))
            assert await eventually(lambda: len(frames_on_redis(redis_url, "roamer")) >= 15, 20)
            assert b.sessions.get("roamer") is newer and newer.end_reason is None
            await second.close()
        await pubsub.aclose()
        await control.aclose()

    asyncio.run(main())


def test_a_session_that_missed_the_event_notices_the_takeover_at_its_renewal(redis_url: str) -> None:
    """A's subscription is gone (the event never reaches it): its lease renewal finds the newer
    generation and closes the session, still within a second."""

    async def main() -> None:
        token = await register(redis_url, "roamer")
        lost = metric("flowcloud_gateway_lease_lost_total", noticed="renewal")
        a, b = replicas(redis_url)
        async with a.listen(port=0), b.listen(port=0):
            assert a._events_task is not None
            a._events_task.cancel()  # fault: A hears no device events any more
            first = await connect(a.port, "roamer", token)
            sending = streaming(first, T0)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "roamer")) >= 5, 20)

            second, dialled = await take_over(b, "roamer", token)
            assert await first.closed_by_gateway(timeout=10.0)
            closed_after = time.monotonic() - dialled
            assert closed_after < TAKEOVER_BOUND, f"the old session was closed after {closed_after:.2f} s"
            assert await session_ended(a, "roamer")
            sending.cancel()
            await second.close()
        assert metric("flowcloud_gateway_lease_lost_total", noticed="renewal") == lost + 1

    asyncio.run(main())


def test_a_stale_session_s_frames_are_fenced(redis_url: str) -> None:
    """A's session learns of the takeover late (no events, a renewal every 5 s) and keeps decoding
    the old connection's frames: the publisher writes none of them once B holds the lease, and
    counts each as ``fenced``."""

    async def main() -> None:
        token = await register(redis_url, "roamer")
        fenced = dropped("fenced")
        a, b = replicas(redis_url, lease_renew_interval=5.0, lease_ttl=10.0)
        async with a.listen(port=0), b.listen(port=0):
            assert a._events_task is not None
            a._events_task.cancel()  # fault: A hears no device events any more
            first = await connect(a.port, "roamer", token)
            sending = streaming(first, T0)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "roamer")) >= 10, 20)
            stale = a.sessions["roamer"]

            second, _ = await take_over(b, "roamer", token)
            newer = b.sessions["roamer"].lease
            assert newer is not None
            decoded_at_takeover = stale.decoded
            assert await eventually(lambda: stale.decoded >= decoded_at_takeover + 20, 20)  # still going
            await second.send(rtp_packets(libx264_access_units(15), T0 + 100))
            assert await eventually(lambda: B_SIZE in sizes_in_seq_order(redis_url, "roamer"), 20)
            sending.cancel()
            await second.close()
            assert await session_ended(a, "roamer", timeout=15)  # at its renewal
            assert stale.end_reason == "replaced"

        # B's generation is Redis's clock (ms) when it took the lease: nothing of A's was written later.
        written = entries(redis_url, "roamer")
        from_a = [ms for ms, f in written if (f.height, f.width) == A_SIZE]
        assert from_a and max(from_a) <= newer.generation
        assert all(ms >= newer.generation for ms, f in written if (f.height, f.width) == B_SIZE)
        assert dropped("fenced") - fenced >= 20

    asyncio.run(main())


def test_lease_generations_rise_and_renewal_finds_the_newer_one(redis_url: str) -> None:
    """The scripts themselves, on the real Redis: each acquisition raises the generation; the older
    holder's renewal reports the newer one; release clears only one's own lease; and after the
    hash is lost the holder writes it back, while a newcomer still draws a higher generation."""

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        clock = RedisClock()
        await clock.sync(client)
        old = StreamLease(client, clock, "cam", "s1", ttl=3.0, replica="a")
        first = await old.acquire()
        assert first.generation > 0 and first.previous_owner == ""
        new = StreamLease(client, clock, "cam", "s2", ttl=3.0, replica="b")
        second = await new.acquire()
        assert second.generation > first.generation
        assert second.previous_owner == "a s1" and second.took_over(clock.now())
        assert await new.renew() and not await old.renew() and old.newer == second.generation
        assert not await old.release() and await client.hget(keys.stream_meta("cam"), keys.M_OWNER) == b"b s2"
        fields = await client.hgetall(keys.stream_meta("cam"))
        assert float(fields[keys.M_LEASE_UNTIL.encode()]) == pytest.approx(clock.now() + 3.0, abs=0.5)

        await client.delete(keys.stream_meta("cam"))  # lost: a Redis restarted without persistence
        assert await new.renew()  # written back
        assert (
            await client.hget(keys.stream_meta("cam"), keys.M_GENERATION) == str(second.generation).encode()
        )
        await client.delete(keys.stream_meta("cam"))
        await asyncio.sleep(0.002)
        newcomer = StreamLease(client, clock, "cam", "s3", replica="c")
        third = await newcomer.acquire()
        assert third.generation > second.generation and not await new.renew()

        assert await newcomer.release()
        fields = await client.hgetall(keys.stream_meta("cam"))
        assert fields == {keys.M_GENERATION.encode(): str(third.generation).encode()}  # only ever rises
        await client.aclose()

    asyncio.run(main())
