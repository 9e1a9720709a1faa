"""The link emulator (flowcloud.linkemu) measured on loopback: it delays by what it says (never
less), caps the rate, adds bounded jitter, holds bytes through a stall and cuts connections in a
reset outage; `flowcloud link` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import signal
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY
from support.cli import REPO, flowcloud
from support.edge import daemon_config, run_synthetic_edge
from support.frames import frames_on_redis
from support.gateway import gateway_settings, register
from support.waiting import eventually

from flowcloud.linkemu import PROFILES, LinkEmulator, LinkProfile, Outage
from services.gateway.server import Gateway

pytestmark = pytest.mark.timeout(60)
STAMP = struct.Struct("!Id")  # message number, send time (time.monotonic), then padding


@dataclass
class Sink:
    """A TCP server that records what arrives and when (time.monotonic)."""

    port: int = 0
    data: bytearray = field(default_factory=bytearray)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (when, bytes so far)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def sink() -> AsyncIterator[Sink]:
    out = Sink()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            out.data += chunk
            out.arrivals.append((time.monotonic(), len(out.data)))
        out.closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    out.port = server.sockets[0].getsockname()[1]
    async with server:
        yield out


@asynccontextmanager
async def echo() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def round_trips(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for i in range(count):
        started = time.monotonic()
        writer.write(b"ping%04d" % i)
        assert await reader.readexactly(8) == b"ping%04d" % i
        times.append(time.monotonic() - started)
    writer.close()
    return times


def test_the_seed_links_are_named_profiles() -> None:
    assert (PROFILES["local"].delay, PROFILES["local"].rate) == (0.0015, 313e6)
    assert (PROFILES["cloud-vm"].delay, PROFILES["cloud-vm"].rate) == (0.040, 85e6)
    assert (PROFILES["far-gpu"].delay, PROFILES["far-gpu"].rate) == (0.350, 8.5e6)


def test_delay_is_added_each_way_and_never_less() -> None:
    async def main() -> tuple[list[float], list[float]]:
        async with echo() as port:
            direct = await round_trips(port, 10)
            async with LinkEmulator("127.0.0.1", port, LinkProfile("test", 0.05, 0.0)) as link:
                return direct, await round_trips(link.port, 10)

    direct, linked = asyncio.run(main())
    assert min(linked) >= 0.100  # 50 ms out and 50 ms back, at the least
    assert statistics.median(linked) < 0.100 + statistics.median(direct) + 0.1  # and not much more


def test_jitter_adds_up_to_its_bound_and_keeps_order() -> None:
    delay, jitter = 0.02, 0.03

    async def main() -> tuple[list[float], bytes, bytes]:
        async with (
            sink() as s,
            LinkEmulator("127.0.0.1", s.port, LinkProfile("j", delay, 0.0, jitter)) as link,
        ):
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            sent = bytearray()
            for i in range(30):
                message = STAMP.pack(i, time.monotonic()) + bytes(20)
                writer.write(message)
                await writer.drain()
                sent += message
                await asyncio.sleep(0.04)  # wider than the jitter: no message waits for its elder
            assert await eventually(lambda: len(s.data) == len(sent), 10)
            writer.close()
            delays = []
            for when, size in s.arrivals:
                _, at = STAMP.unpack_from(s.data, size - 32)
                delays.append(when - at)
            return delays, bytes(s.data), bytes(sent)

    delays, got, sent = asyncio.run(main())
    assert got == sent  # in order, intact
    assert min(delays) >= delay
    assert max(delays) - min(delays) > 0.01  # it varies
    assert statistics.median(delays) < delay + jitter + 0.05


def test_the_rate_cap_paces_a_bulk_transfer() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: 1.05 s at 8 Mbit/s
    rate = 8e6

    async def main() -> tuple[float, Sink]:
        async with sink() as s, LinkEmulator("127.0.0.1", s.port, LinkProfile("r", 0.01, rate)) as link:
            started = time.monotonic()
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            await asyncio.wait_for(s.closed.wait(), 20)
            writer.close()
            return s.arrivals[-1][0] - started, s

    took, s = asyncio.run(main())
    expected = len(payload) * 8 / rate + 0.01
    assert hashlib.sha256(s.data).digest() == hashlib.sha256(payload).digest()
    assert took >= expected * 0.98
    assert took < expected + 1.0
    # Paced, not in one burst: by the middle of the transfer about half the bytes had arrived.
    first = s.arrivals[0][0]
    by_half = max(size for when, size in s.arrivals if when - first <= (took - 0.01) / 2)
    assert 0.3 < by_half / len(payload) < 0.7


def test_a_slow_link_serialises_small_segments_and_reads_no_further_ahead_than_its_queue() -> None:
    """At 100 kbit/s a burst's first bytes arrive after about one MSS on the wire (0.12 s), not
    after a whole 16 KiB segment (1.3 s); and what a sender that writes as fast as it can has
    handed over and not seen delivered is the link's queue, its receive buffer and the sender's own
    send buffer (measured 48 KiB: 4 s), never asyncio's 128 KiB read-ahead on top (measured 167
    KiB: 14 s) that the sender cannot see."""
    rate, queue = 100e3, 8192

    async def main() -> tuple[float, int]:
        async with (
            sink() as s,
            LinkEmulator("127.0.0.1", s.port, LinkProfile("slow", 0.0, rate), queue_bytes=queue,
                         socket_buffer=8192) as link,
        ):  # fmt: skip
            sock = socket.create_connection(("127.0.0.1", link.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            sock.setblocking(False)
            started = time.monotonic()
            handed = 0
            deadline = started + 1.5
            while time.monotonic() < deadline:  # as fast as the link's window lets it
                with contextlib.suppress(BlockingIOError):
                    handed += sock.send(bytes(16384))
                await asyncio.sleep(0.005)
            assert s.arrivals
            first = s.arrivals[0][0] - started
            unseen = handed - len(s.data)
            sock.close()
            return first, unseen

    first, unseen = asyncio.run(main())
    assert first < 0.5, f"the first bytes took {first:.2f} s"
    assert unseen < 96 * 1024, f"{unseen} bytes handed over and not delivered"


def test_a_scheduled_stall_holds_the_bytes_and_delivers_them_after() -> None:
    outage = Outage(start=0.3, duration=0.5)

    async def main() -> tuple[list[float], bytes, bytes]:
        async with (
            sink() as s,
            LinkEmulator("127.0.0.1", s.port, LinkProfile("o", 0.005, 0.0), (outage,)) as link,
        ):
            started = time.monotonic()
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            sent = bytearray()
            for i in range(60):  # 1.2 s of small messages
                message = STAMP.pack(i, time.monotonic()) + bytes(20)
                writer.write(message)
                await writer.drain()
                sent += message
                await asyncio.sleep(0.02)
            assert await eventually(lambda: len(s.data) == len(sent), 10)
            writer.close()
            return [when - started for when, _ in s.arrivals], bytes(s.data), bytes(sent)

    arrivals, got, sent = asyncio.run(main())
    assert got == sent  # nothing lost, in order
    during = [t for t in arrivals if outage.start + 0.02 < t < outage.end - 0.02]
    assert during == []
    assert max(b - a for a, b in itertools.pairwise(arrivals)) >= outage.duration - 0.1


def test_a_reset_outage_cuts_connections_and_refuses_new_ones_until_it_ends() -> None:
    async def main() -> None:
        async with echo() as port, LinkEmulator("127.0.0.1", port, LinkProfile("x", 0.001, 0.0)) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            link.cut(0.6, reset=True)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 2)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)  # during the outage
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 2)
            writer.close()
            assert link.refused == 1
            await asyncio.sleep(max(0.0, 0.65 - link.elapsed() + link.outages[-1].start))
            assert await round_trips(link.port, 2)  # the link is back

    asyncio.run(main())


def test_the_cli_runs_a_profile_until_interrupted() -> None:
    async def main() -> tuple[list[float], str]:
        async with echo() as port:
            proc = subprocess.Popen(
                flowcloud("link", "--to", f"127.0.0.1:{port}", "--profile", "cloud-vm"),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            try:
                first = await asyncio.to_thread(proc.stdout.readline)
                assert first.startswith("link cloud-vm listening on 127.0.0.1:"), first
                times = await round_trips(int(first.split()[4].rsplit(":", 1)[1]), 3)
            finally:
                proc.send_signal(signal.SIGINT)
                rest = await asyncio.to_thread(proc.communicate, timeout=20)
            assert proc.returncode == 0
            return times, rest[0]

    times, output = asyncio.run(main())
    assert min(times) >= 0.080
    assert "carried 24 bytes up, 24 down, over 1 connections" in output


def test_the_cli_refuses_bad_options() -> None:
    bad = subprocess.run(
        flowcloud("link", "--to", "nowhere", "--outage", "1:x"), cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "expected HOST:PORT, got 'nowhere'" in bad.stderr
    bad = subprocess.run(
        flowcloud("link", "--to", "127.0.0.1:1", "--delay-ms", "-5"), cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "negative delay" in bad.stderr


def test_the_far_link_between_a_real_edge_and_gateway_is_the_network_stage(redis_url: str) -> None:
    """The far GPU server's link (350 ms one way, 8.5 Mbit/s) between the edge daemon and a real
    gateway: each frame's network stage (edge send to gateway receipt, on one clock through the
    handshake offset, which a symmetric link does not bias) is that link once the session streams.
    (The frames captured during the 0.7 s handshake go out in one burst and wait until the new
    session reads its socket: the network stage counts that wait too.)"""
    far = PROFILES["far-gpu"]
    frames_sent = 60
    before = REGISTRY.get_sample_value("flowcloud_gateway_stage_seconds_count", {"stage": "network"}) or 0.0

    async def main() -> None:
        token = await register(redis_url, "cam-far")
        async with (
            Gateway(gateway_settings(redis_url)).listen(port=0) as gw,
            LinkEmulator("127.0.0.1", gw.port, far) as link,
        ):
            config = daemon_config(link.port, device_id="cam-far", token=token, frames=frames_sent)
            assert (await run_synthetic_edge(config)).sent == frames_sent
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-far")) == frames_sent, 20)

    asyncio.run(main())
    frames = frames_on_redis(redis_url, "cam-far")
    network = [f.recv_ts - f.sent_ts for f in frames if f.sent_ts is not None]
    assert len(network) == frames_sent
    assert min(network) >= far.delay - 0.01  # never less than the link (nor charged elsewhere)
    assert statistics.median(network[-15:]) < far.delay + 0.15  # the steady state: the link
    edge = [f.sent_ts - f.capture_ts for f in frames[-15:] if f.sent_ts is not None]
    assert statistics.median(edge) < 0.15  # the link's delay is not charged to the edge
    after = REGISTRY.get_sample_value("flowcloud_gateway_stage_seconds_count", {"stage": "network"})
    assert after == before + frames_sent
