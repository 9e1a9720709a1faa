"""A gateway that stops sends its edges away (GOAWAY): the real edge daemon ends its stream before an
IDR, waits until the stopping gateway has published everything, and reconnects at once through the
same address, where a TCP load balancer hands it to the other replica. No frame is lost."""

from __future__ import annotations

import asyncio

from support.balancer import TcpBalancer
from support.edge import daemon_config, run_synthetic_edge
from support.frames import frames_on_redis
from support.gateway import all_drops, gateway_settings, metric, register
from support.waiting import eventually

from edge import metrics as edge_metrics
from services.gateway.server import Gateway

FRAMES = 150  # 5 s at 30 fps; the first gateway stops after about 1.5 s
DRAIN = 2.0  # seconds A waits for its edge to leave: an edge that ignored the GOAWAY would be cut


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
