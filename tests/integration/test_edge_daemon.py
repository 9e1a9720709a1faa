"""The edge daemon against a tiny real gateway on loopback: frames, capture times, reconnects,
gateway restarts, rejections; the CLI as a real process."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from support.cli import REPO, flowcloud
from support.edge import TestGateway, daemon_config, decode_access_units

from edge.daemon import DaemonConfig, DaemonResult, EdgeDaemon
from edge.frames import StreamShape
from edge.sender import Backoff, FatalRejection
from edge.sources import SyntheticSource, open_source
from flowcloud import keys
from flowcloud.cli.main import main
from flowcloud.protocol.h264 import NAL_TYPE_IDR, nal_type

pytestmark = pytest.mark.timeout(90)

SHAPE = StreamShape(160, 120, 30.0)


async def run_daemon(cfg: DaemonConfig, shape: StreamShape = SHAPE) -> DaemonResult:
    return await EdgeDaemon(cfg, SyntheticSource(shape)).run()


def test_synthetic_frames_arrive_in_order_with_capture_times() -> None:
    async def scenario() -> None:
        async with TestGateway(clock_skew=50.0) as gw:
            started = time.time()
            sent_before = REGISTRY.get_sample_value("flowcloud_edge_frames_sent_total") or 0.0
            result = await run_daemon(daemon_config(gw.port, frames=20))
            assert REGISTRY.get_sample_value("flowcloud_edge_frames_sent_total") == sent_before + 20
            assert REGISTRY.get_sample_value("flowcloud_edge_clock_offset_seconds") == pytest.approx(
                50.0, abs=0.05
            )
            finished = time.time()
            await gw.wait_for(lambda: gw.sessions and gw.sessions[0].closed.is_set())
        assert (result.captured, result.sent, result.sessions) == (20, 20, 1)
        [session] = gw.sessions
        assert session.hello.device_id == "cam-1" and session.hello.token == "tok"
        assert (session.hello.stream.width, session.hello.stream.height, session.hello.stream.fps) == (
            160,
            120,
            30,
        )
        assert session.clock is not None and session.clock.offset == pytest.approx(50.0, abs=0.05)
        aus = session.access_units
        assert len(aus) == 20 and session.errors == [] and session.depacketizer.lost_packets == 0
        assert aus[0].keyframe and sum(au.keyframe for au in aus) == 2
        times = [au.capture_time or 0.0 for au in aus]
        assert all(started <= t <= finished for t in times)
        assert times == sorted(times)
        assert 0.45 < times[-1] - times[0] < 1.5  # paced at 30 fps: 19 frame intervals
        # Each access unit also carries when it was handed to the socket: after its capture.
        sends = [au.send_time or 0.0 for au in aus]
        assert all(c <= s <= finished for c, s in zip(times, sends, strict=True))
        stamps = [au.timestamp for au in aus]
        assert all(0 < (b - a) % 2**32 < 9000 for a, b in itertools.pairwise(stamps))
        frames = decode_access_units(aus)
        assert len(frames) == 20 and {(f.width, f.height) for f in frames} == {(160, 120)}

    asyncio.run(scenario())


def test_reconnects_after_the_server_closes_and_restarts_at_an_idr() -> None:
    async def scenario() -> None:
        async with TestGateway(close_after=6) as gw:
            result = await run_daemon(daemon_config(gw.port, frames=45))
        assert result.sessions >= 3
        assert len(gw.sessions) == result.sessions
        for i, session in enumerate(gw.sessions):
            if not session.access_units:
                # Only the last session may be empty: the source ended before its first IDR.
                assert i == len(gw.sessions) - 1
                continue
            first = session.access_units[0]
            assert first.keyframe and any(nal_type(n) == NAL_TYPE_IDR for n in first.nals)
            assert session.depacketizer.dropped == {} and session.errors == []
            assert len(decode_access_units(session.access_units)) == len(session.access_units)
        assert result.sent == sum(len(s.access_units) for s in gw.sessions)

    asyncio.run(scenario())


def test_survives_a_gateway_restart_on_the_same_port() -> None:
    async def scenario() -> None:
        first = TestGateway()
        await first.__aenter__()
        port = first.port
        daemon = asyncio.create_task(run_daemon(daemon_config(port, duration=3.0)))
        await first.wait_for(lambda: len(first.access_units) >= 5)
        await first.close()  # the gateway goes away ...
        await asyncio.sleep(0.5)
        async with TestGateway(port=port) as second:  # ... and comes back
            await second.wait_for(lambda: len(second.access_units) >= 5)
            result = await daemon
        assert result.sessions == 2
        assert second.sessions[0].access_units[0].keyframe
        assert len(decode_access_units(second.access_units)) == len(second.access_units)

    asyncio.run(scenario())


def test_busy_is_retried_and_a_bad_token_is_fatal() -> None:
    async def scenario() -> None:
        async with TestGateway(rejects=["busy", "limit"]) as gw:
            result = await run_daemon(daemon_config(gw.port, frames=5))
        # Frames queued while refused are younger than the queue's max age: all are sent.
        assert gw.connections == 3 and result.sent == 5
        assert len(gw.access_units) == result.sent and gw.access_units[0].keyframe
        async with TestGateway(rejects=["bad_token"]) as gw:
            with pytest.raises(
                FatalRejection, match="^gateway rejected the connection: bad_token: test gateway"
            ):
                await run_daemon(daemon_config(gw.port, frames=1000))
        assert gw.connections == 1

    asyncio.run(scenario())


def test_revoked_mid_stream_ends_the_daemon() -> None:
    async def scenario() -> None:
        async with TestGateway(close_after=4, reject_mid_stream="revoked") as gw:
            with pytest.raises(FatalRejection, match="revoked: revoked by test"):
                await run_daemon(daemon_config(gw.port, frames=1000))
        assert len(gw.sessions) == 1

    asyncio.run(scenario())


def test_no_gateway_then_the_source_ends_quietly() -> None:
    async def scenario() -> None:
        async with TestGateway() as gw:
            port = gw.port
        # Nobody listens: the daemon retries until the source ends, then gives up cleanly.
        result = await asyncio.wait_for(run_daemon(daemon_config(port, frames=10)), 20)
        assert (result.captured, result.sent, result.sessions) == (10, 0, 0)

    asyncio.run(scenario())


def test_backoff_grows_with_jitter_up_to_the_maximum() -> None:
    import random

    backoff = Backoff(initial=0.5, maximum=8.0)
    rng = random.Random(1)
    delays = [[backoff.delay(n, rng) for _ in range(50)] for n in range(8)]
    for n, ds in enumerate(delays):
        base = min(8.0, 0.5 * 2**n)
        assert all(base / 2 <= d <= base for d in ds)
        assert len(set(ds)) > 40  # jittered
    assert max(delays[-1]) <= 8.0


def test_gstreamer_x264enc_encoder() -> None:
    async def scenario() -> None:
        async with TestGateway() as gw:
            result = await run_daemon(daemon_config(gw.port, frames=15, encoder="x264enc"))
            await gw.wait_for(lambda: gw.sessions and gw.sessions[0].closed.is_set())
        assert result.sent == 15
        aus = gw.access_units
        assert len(aus) == 15 and aus[0].keyframe
        assert len(decode_access_units(aus)) == 15

    asyncio.run(scenario())


def test_cli_process_streams_and_reports(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with TestGateway() as gw:
            env = {**os.environ, "FLOWCLOUD_EDGE_TOKEN": "tok-from-env"}
            command = flowcloud(
                "edge", "--gateway", f"127.0.0.1:{gw.port}", "--device-id", "cli-cam",
                "--source", "synthetic", "--width", "96", "--height", "64", "--fps", "30", "--frames", "12",
                "--encoder", "libx264", "--metrics-port", "0", "--json",
            )  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            await gw.wait_for(lambda: gw.sessions and gw.sessions[0].closed.is_set())
        assert proc.returncode == 0, err.decode()
        assert json.loads(out) == {"captured": 12, "sent": 12, "sessions": 1}
        [session] = gw.sessions
        assert session.hello.token == "tok-from-env"
        frames = decode_access_units(session.access_units)
        assert len(frames) == 12 and (frames[0].width, frames[0].height) == (96, 64)

    asyncio.run(scenario())


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWCLOUD_EDGE_GATEWAY", raising=False)
    monkeypatch.setenv("FLOWCLOUD_EDGE_TOKEN", "t")

    def edge(*args: str) -> tuple[int, str]:
        status = main(["edge", *args])
        return status, capsys.readouterr().err.strip().splitlines()[-1]

    assert edge("--device-id", "x") == (
        1,
        "flowcloud edge: no gateway: give --gateway HOST:PORT or set FLOWCLOUD_EDGE_GATEWAY",
    )
    assert edge("--gateway", "nohost", "--device-id", "x") == (
        1,
        "flowcloud edge: --gateway 'nohost' is not HOST:PORT",
    )
    assert edge("--gateway", "127.0.0.1:9", "--device-id", "x", "--source", "/no/such/file.mp4") == (
        1,
        "flowcloud edge: source '/no/such/file.mp4' is not synthetic, camera:, gst:, rtsp://, rfc4571:// "
        "or a file",
    )
    assert edge("--gateway", "127.0.0.1:9", "--device-id", "cam/1") == (
        1,
        f"flowcloud edge: device id 'cam/1' is invalid: use {keys.IDENTIFIER_RULE}",
    )
    status, line = edge("--gateway", "127.0.0.1:9", "--device-id", "x", "--mtu", "10")
    assert status == 1
    assert line == "flowcloud edge: invalid settings: mtu: Input should be greater than or equal to 64"


def test_open_source_names() -> None:
    assert isinstance(open_source("synthetic", SHAPE, loop=False), SyntheticSource)
