"""A gateway that stops sends its edges away (GOAWAY): the real edge daemon ends its stream before an
IDR, waits until the stopping gateway has published everything, and reconnects at once through the
same address, where a TCP load balancer hands it to the other replica. No frame is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.balancer import TcpBalancer
from support.edge import daemon_config, run_synthetic_edge
from support.frames import frames_on_redis
from support.gateway import (
    FPS,
    Edge,
    all_drops,
    dropped,
    gateway_settings,
    good_units,
    metric,
    register,
    rtp_packets,
)
from support.tls import Pki, tls_gateway
from support.waiting import eventually

from edge import metrics as edge_metrics
from flowcloud.protocol.framing import read_frame
from flowcloud.protocol.handshake import (
    MAX_CONTROL_SIZE,
    GoAway,
    Hello,
    StreamInfo,
    client_handshake,
    parse_control,
)
from flowcloud.protocol.tls import client_context
from services.gateway.server import Gateway

FRAMES = 150  # 5 s at 30 fps; the first gateway stops after about 1.5 s
DRAIN = 2.0  # seconds A waits for its edge to leave: an edge that ignored the GOAWAY would be cut
SENT = 15  # access units the TLS tests send before the GOAWAY (one test sends the rest after)
T0 = 1_764_000_000.0


def edge_drops() -> float:
    return sum(
        sample.value
        for family in edge_metrics.FRAMES_DROPPED.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def test_goaway_moves_the_edge_to_another_replica_without_losing_a_frame(redis_url: str) -> None:
    async def main() -> None:
        token = await register(redis_url, "cam-1")
        goaways = metric("flowcloud_gateway_goaways_total")
        edge_goaways = metric("flowcloud_edge_goaways_total")
        gateway_drops, dropped_at_edge = all_drops(), edge_drops()
        async with (
            Gateway(gateway_settings(redis_url, drain_timeout=DRAIN)).listen(port=0) as a,
            Gateway(gateway_settings(redis_url)).listen(port=0) as b,
            TcpBalancer([a.port, b.port]) as balancer,
        ):
            ports = [a.port, b.port]
            edge = asyncio.create_task(
                run_synthetic_edge(daemon_config(balancer.port, token=token, frames=FRAMES))
            )
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= 45, 30)
            old = a.sessions["cam-1"]
            await a.close()  # what SIGTERM does
            assert old.end_reason == "goaway"
            result = await asyncio.wait_for(edge, 60)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= FRAMES, 20)
            assert await eventually(lambda: "cam-1" not in b.sessions, 10)

        assert balancer.routed == ports  # the reconnect went through the balancer to B
        assert (result.captured, result.sent, result.sessions) == (FRAMES, FRAMES, 2)
        frames = frames_on_redis(redis_url, "cam-1")
        assert [f.seq for f in frames] == list(range(1, FRAMES + 1))  # every frame, once, in order
        captured = [f.capture_ts for f in frames]
        assert captured == sorted(captured) and len(set(captured)) == FRAMES
        assert 45 <= old.decoded < FRAMES  # A carried its part, B the rest
        assert metric("flowcloud_gateway_goaways_total") == goaways + 1
        assert metric("flowcloud_edge_goaways_total") == edge_goaways + 1
        assert all_drops() == gateway_drops and edge_drops() == dropped_at_edge  # none fenced either

    asyncio.run(main())


async def tls_edge(port: int, token: str, pki: Pki) -> Edge:
    context = client_context(str(pki.ca.path), None, None)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    hello = Hello("cam-1", token, StreamInfo(320, 240, FPS))
    return Edge(reader, writer, *await client_handshake(reader, writer, hello, timeout=5.0))


async def await_goaway(edge: Edge) -> None:
    async with asyncio.timeout(5.0):
        while not isinstance(parse_control(await read_frame(edge.reader, MAX_CONTROL_SIZE)), GoAway):
            pass


def test_a_tls_edge_that_cuts_at_once_ends_its_session_after_the_silence(
    redis_url: str, tmp_path: Path
) -> None:
    """The edge sent its last byte before the GOAWAY came (its next frame is the IDR it cuts
    before): the session, already waiting for a read, ends after `GOAWAY_SILENCE` as ``goaway``,
    not at the drain deadline as ``shutdown``."""
    packets = rtp_packets(good_units()[:SENT], T0)
    pki = Pki.create(tmp_path)

    async def main() -> None:
        token = await register(redis_url, "cam-1")
        async with tls_gateway(redis_url, pki, drain_timeout=DRAIN * 3).listen(port=0) as gw:
            edge = await tls_edge(gw.port, token, pki)
            await edge.send(packets, fps=FPS)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= SENT, 20)
            session = gw.sessions["cam-1"]
            closing = asyncio.create_task(gw.close())
            await await_goaway(edge)
            assert await eventually(lambda: session.end_reason is not None, DRAIN, step=0.05)
            assert session.end_reason == "goaway"
            assert await edge.closed_by_gateway(timeout=15.0)
            await closing
        assert len(frames_on_redis(redis_url, "cam-1")) == SENT

    asyncio.run(main())


def test_access_units_sent_after_a_tls_session_stopped_reading_are_counted(
    redis_url: str, tmp_path: Path
) -> None:
    """An edge that stalls longer than `GOAWAY_SILENCE` after the GOAWAY and then sends more: the
    session has stopped reading, so those access units are counted ``goaway_unread`` when the
    connection closes, never lost without a trace."""
    packets = rtp_packets(good_units(), T0)
    ends = [i + 1 for i, p in enumerate(packets) if p[1] & 0x80]  # where each access unit ends
    first, late = packets[: ends[SENT - 1]], packets[ends[SENT - 1] :]
    pki = Pki.create(tmp_path)

    async def main() -> None:
        token = await register(redis_url, "cam-1")
        unread = dropped("goaway_unread")
        async with tls_gateway(redis_url, pki, drain_timeout=DRAIN).listen(port=0) as gw:
            edge = await tls_edge(gw.port, token, pki)
            await edge.send(first, fps=FPS)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= SENT, 20)
            session = gw.sessions["cam-1"]
            closing = asyncio.create_task(gw.close())
            await await_goaway(edge)
            assert await eventually(lambda: session.end_reason is not None, DRAIN, step=0.05)
            await edge.send(late, fps=0)
            assert await edge.closed_by_gateway(timeout=15.0)
            await closing
        assert len(frames_on_redis(redis_url, "cam-1")) == SENT
        assert dropped("goaway_unread") == unread + len(ends) - SENT

    asyncio.run(main())
