"""The edge keeps working offline: a real edge daemon (synthetic source, libx264), a real gateway
and a real redis-server; the outage is made by stopping the gateway (3 s here instead of the
issue's 20 s, to keep the test short: the path is the same, only the spool is smaller)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis
from support.api import make_key, running_api
from support.cli import REPO, flowcloud
from support.edge import SYNTHETIC_SHAPE, daemon_config, streaming_edge_with_fallback
from support.frames import frames_on_redis
from support.gateway import gateway_settings, metric, register
from support.waiting import eventually, wait_for

from edge.daemon import EdgeDaemon
from edge.sources import SyntheticSource
from edge.spool import Spool
from flowcloud.frames import Frame
from flowcloud.linkemu import LinkEmulator
from flowcloud.results import MaskStore
from flowcloud.settings import ApiSettings
from services.gateway.server import Gateway

OUTAGE = 3.0
REAL_TIME_BOUND = 2.0  # the worker's default max_frame_age: live frames must stay within it


def all_frames(url: str, stream: str) -> tuple[list[Frame], list[Frame]]:
    return frames_on_redis(url, stream), frames_on_redis(url, stream, backfill=True)


def test_an_outage_is_spooled_and_backfilled_in_capture_order(tmp_path: Path, redis_url: str) -> None:
    spool_dir = tmp_path / "spool"

    async def main() -> None:
        token = await register(redis_url, "cam-1")
        settings = gateway_settings(redis_url)
        async with Gateway(settings).listen(port=0) as gw:
            port = gw.port
            # Backfill at real-time pace: it drains over about OUTAGE seconds, time to watch live beside it.
            config = daemon_config(
                port, token=token, spool_dir=str(spool_dir), duration=60.0, backfill_speed=1.0
            )
            daemon = EdgeDaemon(config, SyntheticSource(SYNTHETIC_SHAPE))
            edge = asyncio.create_task(daemon.run())
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= 15, 20)
            stopped_at = time.time()  # the gateway closes its sessions now, then stops
            sender = daemon._sender
            assert sender is not None and sender.live
        # The gateway is gone: the edge spools from the moment its session ends. (What it wrote
        # into the closing connection before it saw the end is lost: TCP has no receipt.)
        assert await eventually(lambda: not sender.live, 10, step=0.005)
        captured_at_stop = daemon.captured
        await asyncio.sleep(OUTAGE)
        spool = daemon.spool
        assert spool is not None and spool.frames >= OUTAGE * SYNTHETIC_SHAPE.fps / 3
        assert metric("flowcloud_edge_spool_bytes") > 0
        async with Gateway(settings).listen(port=port):
            restarted_at = time.time()
            captured_at_restart = daemon.captured

            def drained() -> bool:
                return spool.frames == 0 and len(frames_on_redis(redis_url, "cam-1", backfill=True)) > 0

            assert await eventually(drained, 30)
            assert await eventually(
                lambda: any(f.recv_ts > restarted_at + 1 for f in frames_on_redis(redis_url, "cam-1")), 10
            )
            daemon_stop = daemon.source.stop
            daemon_stop()
            await asyncio.wait_for(edge, 15)
        live, backfill = all_frames(redis_url, "cam-1")
        # Every frame captured during the outage reached Redis, once each, with its capture time.
        during = captured_at_restart - captured_at_stop
        assert len(backfill) >= during - 3  # at most the frames before the spool's first IDR
        captures = [round(f.capture_ts, 4) for f in live + backfill]
        assert len(captures) == len(set(captures))  # none duplicated
        # (frames captured before the first session are spooled too, and sent as backfill)
        first_live = min(f.capture_ts for f in live)
        outage = [f for f in backfill if f.capture_ts > first_live]
        assert all(stopped_at - 0.5 < f.capture_ts < restarted_at + 1 for f in outage)
        assert all(f.backfill for f in backfill) and not any(f.backfill for f in live)
        # The timeline (by seq) is in capture order, backfill included.
        timeline = sorted(live + backfill, key=lambda f: f.seq)
        assert [f.capture_ts for f in timeline] == sorted(f.capture_ts for f in timeline)
        # Live kept its latency while the backfill drained. The new live session's first half second
        # is not the backfill's doing: the fresh gateway, in this process, starts its decoder
        # processes then, and the edge's first live frames waited for the handshake.
        received = [f.recv_ts for f in backfill if f.recv_ts > restarted_at]
        first, last = min(received), max(received)
        live_again = min(f.recv_ts for f in live if f.recv_ts > restarted_at)
        during_backfill = [f for f in live if max(first - 0.2, live_again + 0.5) <= f.recv_ts <= last + 0.2]
        assert during_backfill
        latencies = [round(f.recv_ts - f.capture_ts, 3) for f in during_backfill]
        assert max(latencies) < REAL_TIME_BOUND, (
            f"live latencies during the backfill ({last - first:.2f} s from {first - live_again:+.2f} s "
            f"after live resumed): {latencies}"
        )

    asyncio.run(main())


def test_an_edge_killed_during_an_outage_keeps_its_spool_and_drains_it(
    tmp_path: Path, redis_url: str
) -> None:
    """`flowcloud edge --spool` is SIGKILLed while the gateway is away; started again, its spool is
    intact (a torn last record at most, cut off) and drains to the gateway's backfill lane."""
    spool_dir = tmp_path / "spool"
    token = asyncio.run(register(redis_url, "cam-1"))
    with socket.socket() as probe:  # a free port where no gateway listens yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ("edge", "--gateway", f"127.0.0.1:{port}", "--device-id", "cam-1", "--source", "synthetic",
            "--width", "96", "--height", "64", "--keyframe-interval", "10", "--bitrate", "300000",
            "--metrics-port", "0", "--spool", str(spool_dir))  # fmt: skip
    env = {**os.environ, "FLOWCLOUD_EDGE_TOKEN": token, "FLOWCLOUD_EDGE_SPOOL_SEGMENT_SECONDS": "0.5"}
    first = subprocess.Popen(flowcloud(*args), cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            "two seconds of spooled video", lambda: len(list(spool_dir.glob("*.rfc4571"))) >= 4, 60, first
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    spool = Spool(spool_dir, SYNTHETIC_SHAPE)  # what the restarted edge will find
    held = spool.frames
    assert held >= 30 and spool.gops >= 3
    assert not list(spool_dir.glob("*.tmp"))

    async def main() -> None:
        async with Gateway(gateway_settings(redis_url)).listen(port=port):
            second = subprocess.Popen(flowcloud(*args), cwd=REPO, env=env, stderr=subprocess.DEVNULL)
            try:
                got = lambda: len(frames_on_redis(redis_url, "cam-1", backfill=True))  # noqa: E731
                assert await eventually(lambda: got() >= held, 60)
            finally:
                second.send_signal(signal.SIGTERM)
                await asyncio.to_thread(second.wait, 15)
        backfill = frames_on_redis(redis_url, "cam-1", backfill=True)
        captures = [f.capture_ts for f in backfill]
        assert captures[:held] == sorted(captures[:held]) and len(set(captures)) == len(captures)

    asyncio.run(main())


def test_the_fallback_model_segments_during_an_outage_and_syncs_after(tmp_path: Path, redis_url: str) -> None:
    """The bundled demo model (ONNX, onnxruntime) runs on the edge once it has been offline for
    0.3 s; after the reconnect its masks are in the cloud store and the API lists them with their
    model and ``producer: edge``."""
    spool_dir = tmp_path / "spool"

    async def main() -> int:
        token = await register(redis_url, "cam-1")
        settings = gateway_settings(redis_url)
        async with Gateway(settings).listen(port=0) as gw:
            port = gw.port
            daemon, edge = await streaming_edge_with_fallback(
                redis_url, port, token, spool_dir, SYNTHETIC_SHAPE, 60.0, 20
            )
            runner = daemon.fallback
            assert runner is not None and runner.made == 0  # online: the cloud segments
        assert await eventually(lambda: runner.made >= 3, 20)  # offline: the edge does
        assert list((spool_dir / "masks").glob("*.json"))
        made = runner.made
        async with Gateway(settings).listen(port=port):
            store = MaskStore(Redis.from_url(redis_url))
            assert await eventually(lambda: not list((spool_dir / "masks").glob("*.json")), 30)
            stored = await store.edge_masks("cam-1", limit=1000)
            await store.redis.aclose()
            daemon.source.stop()
            await asyncio.wait_for(edge, 15)
        assert len(stored) >= made
        return made

    made = asyncio.run(main())
    key = make_key(redis_url, "reader", "acme")
    with running_api(ApiSettings(redis_url=redis_url)) as base:
        reply = httpx.get(f"{base}/streams/cam-1/edge-masks", headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200, reply.text
    items = reply.json()["items"]
    assert len(items) >= made
    assert {(i["producer"], i["model"], i["model_version"]) for i in items} == {
        ("edge", "small_unet", "demo-1")
    }
    assert all(
        i["width"] == 512 and i["height"] == 256 and abs(sum(i["shares"].values()) - 1) < 1e-6 for i in items
    )


def test_a_link_slower_than_the_encoder_spools_whole_gops_and_loses_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """The link emulator caps the edge's link at half the stream's bitrate (as measured through it)
    behind a deep router queue (the default 256 KiB, 13 s at that rate: bufferbloat), which the
    edge's socket never shows; the gateway's delay reports do. Once live video is late by more than
    the edge's bound, whole GOPs go to the spool while connected, instead of waiting in the link;
    live stays within a latency bound while the link is capped; once the cap is lifted the spool
    drains as backfill. Every frame captured reaches Redis, live or backfilled, once."""

    async def main() -> tuple[EdgeDaemon, float, float]:
        token = await register(redis_url, "cam-1")
        async with (
            # (every frame stays in the stream's frame log: the test counts them all)
            Gateway(gateway_settings(redis_url, stream_frames_maxlen=10_000)).listen(port=0) as gw,
            LinkEmulator("127.0.0.1", gw.port, socket_buffer=8192) as link,
        ):
            config = daemon_config(link.port, token=token, spool_dir=str(tmp_path / "spool"), duration=60.0)
            daemon = EdgeDaemon(config, SyntheticSource(SYNTHETIC_SHAPE))
            edge = asyncio.create_task(daemon.run())
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= 10, 20)
            delivered, started = link.up.delivered, time.monotonic()
            await asyncio.sleep(2)
            bitrate = (link.up.delivered - delivered) * 8 / (time.monotonic() - started)
            # (a stall of the loaded machine while measuring reads low: a lower cap would make live
            # fall behind faster than at half rate; the encoder's target is the floor)
            link.set_rate(max(bitrate, config.bitrate) / 2)
            capped_at = time.time()
            spooled = metric("flowcloud_edge_spool_congestion_frames_total")
            live_before = len(frames_on_redis(redis_url, "cam-1"))
            # Live falls behind by 0.5 s per second: past the 0.5 s bound in about a second. Without
            # the delay reports the edge would notice only once the link's queue is full (13 s).
            congested = lambda: metric("flowcloud_edge_spool_congestion_frames_total") > spooled  # noqa: E731
            assert await eventually(congested, 8)
            await asyncio.sleep(3)  # capped a while: live and spooled GOPs take turns
            assert metric("flowcloud_edge_spool_congestion_frames_total") >= spooled + 20
            assert len(frames_on_redis(redis_url, "cam-1")) > live_before  # live went on meanwhile
            link.set_rate(0)  # the link keeps up again
            uncapped_at = time.time()
            spool = daemon.spool
            assert spool is not None
            assert await eventually(lambda: spool.frames == 0 and not daemon._congested, 40)
            daemon.source.stop()
            await asyncio.wait_for(edge, 15)
            arrived = lambda: sum(map(len, all_frames(redis_url, "cam-1"))) >= daemon.captured  # noqa: E731
            await eventually(arrived, 30)  # (what is still on its way through the link)
        return daemon, capped_at, uncapped_at

    before = metric("flowcloud_edge_spool_congestion_frames_total")
    daemon, capped_at, uncapped_at = asyncio.run(main())
    live, backfill = all_frames(redis_url, "cam-1")
    captures = [round(f.capture_ts, 4) for f in live + backfill]
    assert len(captures) == len(set(captures))  # none duplicated
    spool = daemon.spool
    assert spool is not None
    # Nothing captured is lost: on Redis, or (the last GOPs, if the edge stopped while its backlog
    # was above the bound again) kept in the spool for the next start.
    assert len(captures) + spool.frames == daemon.captured
    first_live = min(f.capture_ts for f in live)
    while_connected = [f for f in backfill if f.capture_ts > first_live]  # not the start-up's
    assert len(while_connected) >= metric("flowcloud_edge_spool_congestion_frames_total") - before
    # Live latency while the link was capped stays within the real-time bound. The edge spools once
    # the reported delay passes its 0.5 s bound; by then the frames it is sending are later still (a
    # report is as old as the delay it reports: at half rate a frame sent as the report says 0.5 s
    # arrives about 0.75 s late), it spools from the next IDR on (a 10-frame GOP: up to 0.17 s
    # more), reports come every 0.1 s, and the edge counts a delay only once two reports in a row
    # show it (one alone is a receiver that paused): about 1.2 s at worst (measured p95 1.2 to
    # 1.35 s, max 1.45 s, on the shared 2-core machine); the rest of the bound is for a loaded
    # machine. Without the reports the delay grows until the link's 256 KiB queue and its socket
    # are full (13 s at this rate); with a queue of 8 KiB, to about 1.9 s.
    capped = sorted(f.recv_ts - f.capture_ts for f in live if capped_at <= f.capture_ts <= uncapped_at)
    assert len(capped) >= 10
    p95 = capped[int(0.95 * (len(capped) - 1))]
    assert p95 < REAL_TIME_BOUND, f"live latency p95 {p95:.2f} s while capped ({len(capped)} frames)"


def test_a_reconnect_in_the_middle_of_a_backfill_keeps_capture_order_and_sends_nothing_twice(
    tmp_path: Path, redis_url: str
) -> None:
    """The gateway stops while the edge drains its spool (slowly, at a third of the frame rate) and comes
    back: the unsent rest of the first outage keeps the seqs reserved before the first live session
    (carried over), the second outage's frames come after that session's live frames, and the GOP
    the lost connection cut, which the edge sends again whole, is published once."""

    async def main() -> None:
        token = await register(redis_url, "cam-1")
        with socket.socket() as probe:  # a free port where no gateway listens yet
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = daemon_config(
            port, token=token, spool_dir=str(tmp_path / "spool"), duration=120.0, backfill_speed=0.33
        )
        daemon = EdgeDaemon(config, SyntheticSource(SYNTHETIC_SHAPE))
        edge = asyncio.create_task(daemon.run())
        assert await eventually(lambda: daemon.spool is not None and daemon.spool.frames >= 45, 30)
        spool = daemon.spool
        assert spool is not None
        settings = gateway_settings(redis_url)
        backfilled = lambda: len(frames_on_redis(redis_url, "cam-1", backfill=True))  # noqa: E731
        async with Gateway(settings).listen(port=port):
            backfill = daemon.backfill
            assert backfill is not None
            assert await eventually(lambda: backfill.sent >= 15 and backfilled() > 0, 30)  # in its middle
            assert spool.frames > 15
        await asyncio.sleep(1.0)  # a second outage
        async with Gateway(settings).listen(port=port):
            assert await eventually(lambda: spool.frames == 0 and not spool.in_gop, 60)
            daemon.source.stop()
            await asyncio.wait_for(edge, 15)

    asyncio.run(main())
    live, backfill = all_frames(redis_url, "cam-1")
    captures = [round(f.capture_ts, 4) for f in live + backfill]
    assert len(captures) == len(set(captures))  # the cut GOP's frames were not published twice
    timeline = sorted(live + backfill, key=lambda f: f.seq)
    assert [f.capture_ts for f in timeline] == sorted(f.capture_ts for f in timeline)
