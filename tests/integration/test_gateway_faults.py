"""Bad input against a real gateway: each case gets its clear REJECT or a counted drop, while a
good stream running at the same time on the same gateway loses no frame."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from support.frames import frames_on_redis
from support.gateway import (
    FPS,
    all_drops,
    connect,
    dropped,
    gateway_settings,
    libx264_access_units,
    metric,
    published_offset,
    raw_hello,
    read_reject,
    register,
    rtp_packets,
    run_beside_good_stream,
    session_ended,
)
from support.waiting import eventually

from flowcloud.protocol.framing import frame
from flowcloud.protocol.h264 import NAL_TYPE_FU_A
from flowcloud.protocol.handshake import Hello, StreamInfo
from flowcloud.protocol.rtp import RtpPacket
from flowcloud.registry import DeviceRegistry
from services.gateway.server import Gateway

T0 = 1_764_000_000.0


def test_refusals_unknown_wrong_token_version_oversized_slow(redis_url: str) -> None:
    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "cam")
        cases = [
            ("ghost", token, "unknown_device", "not registered"),
            ("cam", "nope", "bad_token", "wrong token"),
        ]
        for device_id, tok, code, text in cases:
            reader, writer = await raw_hello(gw.port, device_id, tok)
            reject = await read_reject(reader)
            assert (reject.code, text in reject.reason) == (code, True)
            writer.close()
        # Another protocol version.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = (
            Hello("cam", token, StreamInfo(320, 240, FPS)).to_bytes().replace(b'"version":1', b'"version":7')
        )
        writer.write(frame(body))
        assert (await read_reject(reader)).code == "version"
        writer.close()
        # An oversized HELLO is refused from its length alone.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(struct.pack(">H", 5000) + b"{" * 100)
        reject = await read_reject(reader)
        assert reject.code == "malformed" and "exceeds the limit of 4096" in reject.reason
        writer.close()
        # Not JSON.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(frame(b"\xff\x00garbage"))
        assert (await read_reject(reader)).code == "malformed"
        writer.close()
        # A slow handshake: half a HELLO, then nothing, until the deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(struct.pack(">H", 200) + b'{"type":"hello"')
        started = time.monotonic()
        reject = await read_reject(reader, timeout=5)
        assert reject.code == "malformed" and "not completed within 1 s" in reject.reason
        assert time.monotonic() - started >= 0.9  # it waited for the deadline (read_reject bounds the wait)
        assert await reader.read() == b""  # then closed
        writer.close()
        # A declared frame size above the cap.
        reader, writer = await raw_hello(gw.port, "cam", token, width=4000, height=3000)
        reject = await read_reject(reader)
        assert reject.code == "limit" and "above the cap 1920x1080" in reject.reason
        writer.close()
        assert "cam" not in gw.sessions

    run_beside_good_stream(redis_url, bad, handshake_timeout=1.0, max_width=1920, max_height=1080)


def test_revoked_mid_stream_closes_within_a_second(redis_url: str) -> None:
    packets = rtp_packets(libx264_access_units(90), T0)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "doomed")
        edge = await connect(gw.port, "doomed", token)
        sender = asyncio.create_task(edge.send(packets, fps=FPS))
        assert await eventually(lambda: len(frames_on_redis(redis_url, "doomed")) >= 5, 10)
        client = aioredis.Redis.from_url(redis_url)
        await DeviceRegistry(client).revoke("doomed")
        # The revocation event closes it at once; the allowance is only for a loaded machine.
        assert await edge.closed_by_gateway(timeout=10.0)
        assert await session_ended(gw, "doomed")
        assert gw.services.ended["doomed"] == 1
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        reader, writer = await raw_hello(gw.port, "doomed", token)
        assert (await read_reject(reader)).code == "revoked"
        writer.close()
        await client.aclose()

    ends = metric("flowcloud_gateway_session_ends_total", reason="revoked")
    run_beside_good_stream(redis_url, bad)
    assert metric("flowcloud_gateway_session_ends_total", reason="revoked") == ends + 1


def test_rotated_token_closes_session_and_old_token_fails(redis_url: str) -> None:
    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "rot")
        edge = await connect(gw.port, "rot", token)
        client = aioredis.Redis.from_url(redis_url)
        _, new_token = await DeviceRegistry(client).rotate("rot")
        await client.aclose()
        assert await edge.closed_by_gateway(timeout=10.0)
        reader, writer = await raw_hello(gw.port, "rot", token)
        assert (await read_reject(reader)).code == "bad_token"
        writer.close()
        edge = await connect(gw.port, "rot", new_token)
        assert await eventually(lambda: "rot" in gw.sessions, 2)
        await edge.close()

    run_beside_good_stream(redis_url, bad)


def test_garbage_after_handshake_ends_only_that_session(redis_url: str) -> None:
    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "noisy")
        edge = await connect(gw.port, "noisy", token)
        # Frames whose bodies are not RTP (version 0): every one is refused and counted.
        edge.writer.write(b"".join(frame(b"\x00" + os.urandom(30)) for _ in range(60)))
        # Then random bytes: random lengths, random bodies.
        edge.writer.write(os.urandom(20_000))
        await edge.writer.drain()
        assert await edge.closed_by_gateway(timeout=5.0)

    rejected = metric("flowcloud_gateway_packets_rejected_total", reason="malformed")
    ends = metric("flowcloud_gateway_session_ends_total", reason="malformed")
    run_beside_good_stream(redis_url, bad, max_malformed=50)
    assert metric("flowcloud_gateway_packets_rejected_total", reason="malformed") >= rejected + 50
    assert metric("flowcloud_gateway_session_ends_total", reason="malformed") == ends + 1


def _fu_a_without_start(seq: int, ts: int) -> bytes:
    return bytes(
        RtpPacket(
            sequence_number=seq, timestamp=ts, ssrc=7, payload=bytes((0x60 | NAL_TYPE_FU_A, 0x05)) + b"x" * 50
        )
    )


def test_malformed_rtp_and_loss_are_counted_and_recovered_at_the_next_idr(redis_url: str) -> None:
    packets = rtp_packets(libx264_access_units(45, gop=15), T0 + 100)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "broken")
        edge = await connect(gw.port, "broken", token)
        stap_overflow = bytes((0x78,)) + (1000).to_bytes(2, "big") + b"\x65" * 10
        huge_fragments = [bytes((0x7C, 0x85 if i == 0 else 0x05)) + b"\x11" * 1100 for i in range(6)]
        bad_packets = [
            _fu_a_without_start(1, 1000),
            bytes(RtpPacket(sequence_number=2, timestamp=2000, ssrc=7, payload=stap_overflow, marker=True)),
            b"",  # a zero-length frame
            b"\x80\x60\x00",  # a truncated RTP header
            *(
                bytes(RtpPacket(sequence_number=3 + i, timestamp=3000, ssrc=7, payload=p))
                for i, p in enumerate(huge_fragments)
            ),
        ]
        await edge.send(bad_packets, fps=0)
        # Then a real stream with packets lost in the middle of it: frames resume at the next IDR.
        lossy = packets[:40] + packets[46:]
        await edge.send(lossy, fps=2 * FPS)
        await edge.close()
        assert await session_ended(gw, "broken")

    before = {r: dropped(r) for r in ("malformed", "nal_too_large", "loss", "await_idr")}
    rejected = metric("flowcloud_gateway_packets_rejected_total", reason="malformed")
    run_beside_good_stream(redis_url, bad, max_nal_size=4096)
    assert metric("flowcloud_gateway_packets_rejected_total", reason="malformed") >= rejected + 5
    for reason in before:
        assert dropped(reason) > before[reason], reason
    # The frames before the loss and those from the next IDR on arrived, in order.
    frames = frames_on_redis(redis_url, "broken")
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
    assert 15 <= len(frames) < 45
    assert frames[-1].capture_ts - frames[0].capture_ts == pytest.approx(44 / FPS, abs=2e-6)


def _kill_decoder_then_resume(redis_url: str, device: str, sig: int, **settings: Any) -> None:
    """Stream, hit the session's decoder with ``sig``; once it is replaced, a stream starting at an
    IDR arrives whole (nothing after the restart is lost); every drop before is counted."""
    before = rtp_packets(libx264_access_units(45, gop=15), T0 + 200)
    after = rtp_packets(libx264_access_units(30, gop=15), T0 + 300)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, device)
        edge = await connect(gw.port, device, token)
        # The decoder is up before the stream starts, so that the signal lands mid-stream.
        assert await eventually(
            lambda: device in gw.sessions and gw.sessions[device].decoder_pid is not None, 10
        )
        sender = asyncio.create_task(edge.send(before, fps=FPS))
        assert await eventually(lambda: len(frames_on_redis(redis_url, device)) >= 1, 10)
        pid = gw.sessions[device].decoder_pid
        assert pid is not None
        os.kill(pid, sig)
        assert await eventually(lambda: gw.sessions[device].decoder_pid not in (None, pid), 10)
        await sender
        await edge.send(after, fps=FPS)
        await edge.close()
        assert await session_ended(gw, device)
        frames = frames_on_redis(redis_url, device)
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        published.append(len(frames))
        tail = frames[-30:]
        for i, f in enumerate(tail):
            assert f.capture_ts == pytest.approx(T0 + 300 + i / FPS + published_offset(edge, gw), abs=2e-6)

    published: list[int] = []
    restarts = metric("flowcloud_gateway_decoder_restarts_total")
    drops = all_drops()
    run_beside_good_stream(redis_url, bad, **settings)
    assert metric("flowcloud_gateway_decoder_restarts_total") == restarts + 1
    # Every access unit sent was either published or dropped with a counted reason.
    assert published[0] + all_drops() - drops == 75


def test_crashed_decoder_restarts_at_next_idr(redis_url: str) -> None:
    _kill_decoder_then_resume(redis_url, "crashy", signal.SIGKILL)


def test_stalled_decoder_is_killed_and_restarted(redis_url: str) -> None:
    _kill_decoder_then_resume(redis_url, "frozen", signal.SIGSTOP, decoder_stall_timeout=2.0)


def test_second_connection_newest_wins(redis_url: str) -> None:
    packets = [rtp_packets(libx264_access_units(15), t) for t in (T0 + 300, T0 + 400)]

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "twin")
        first = await connect(gw.port, "twin", token)
        await first.send(packets[0], fps=2 * FPS)
        assert await eventually(lambda: len(frames_on_redis(redis_url, "twin")) >= 15, 10)
        old = gw.sessions["twin"]
        second = await connect(gw.port, "twin", token)
        assert await first.closed_by_gateway(timeout=10.0)
        assert await eventually(lambda: gw.sessions.get("twin") not in (None, old), 10)
        assert old.end_reason == "replaced"
        await second.send(packets[1], fps=2 * FPS)
        assert await eventually(lambda: len(frames_on_redis(redis_url, "twin")) >= 30, 10)
        await second.close()
        frames = frames_on_redis(redis_url, "twin")
        assert [f.seq for f in frames] == list(range(1, 31))
        assert frames[15].capture_ts == pytest.approx(T0 + 400 + published_offset(second, gw), abs=2e-6)

    run_beside_good_stream(redis_url, bad)


def test_connection_and_session_limits(redis_url: str) -> None:
    async def bad(gw: Gateway) -> None:
        # Per address: the good stream holds one connection of 3; two more idle ones fill it.
        idle = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        reject = await read_reject(reader)
        assert reject.code == "limit" and "too many connections from 127.0.0.1" in reject.reason
        writer.close()
        for _, w in idle:
            w.close()
        assert await eventually(lambda: gw.connections.open_count("127.0.0.1") == 1, 2)
        # Total sessions: the good stream holds 1 of 2.
        tokens = [await register(redis_url, f"extra-{i}") for i in range(2)]
        edge = await connect(gw.port, "extra-0", tokens[0])
        reader, writer = await raw_hello(gw.port, "extra-1", tokens[1])
        reject = await read_reject(reader)
        assert reject.code == "limit" and "maximum of 2 sessions" in reject.reason
        writer.close()
        await edge.close()

    run_beside_good_stream(redis_url, bad, max_connections_per_ip=3, max_sessions=2)


def test_frame_rate_limit_drops(redis_url: str) -> None:
    packets = rtp_packets(libx264_access_units(120), T0 + 500)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "greedy")
        edge = await connect(gw.port, "greedy", token)
        await edge.send(packets, fps=0)  # a burst: 120 frames at once, above 2 s of 40 frames/s
        await edge.close()
        assert await session_ended(gw, "greedy")
        assert 0 < len(frames_on_redis(redis_url, "greedy")) < 120

    limited = dropped("rate_limit")
    run_beside_good_stream(redis_url, bad, max_frames_per_second=40)
    assert dropped("rate_limit") > limited


def test_byte_rate_limit_throttles_without_loss(redis_url: str) -> None:
    packets = rtp_packets(libx264_access_units(45), T0 + 600)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "bulky")
        edge = await connect(gw.port, "bulky", token)
        started = time.monotonic()
        await edge.send(packets, fps=0)  # ~72 kB at once
        await edge.close()
        assert await session_ended(gw, "bulky")
        assert time.monotonic() - started > 1.0  # paced to the byte rate, not dropped
        assert len(frames_on_redis(redis_url, "bulky")) == 45

    throttled = metric("flowcloud_gateway_throttled_seconds_total")
    run_beside_good_stream(redis_url, bad, max_bytes_per_second=30_000)
    assert metric("flowcloud_gateway_throttled_seconds_total") > throttled + 1.0


def test_stream_above_the_size_cap_is_dropped(redis_url: str) -> None:
    """A device that declares 320x240 and sends 480x360: its SPS gives it away before decoding."""
    packets = rtp_packets(libx264_access_units(10, width=480, height=360), T0 + 700)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "liar")
        edge = await connect(gw.port, "liar", token, width=320, height=240)  # declares less than it sends
        await edge.send(packets)
        await edge.close()
        assert await session_ended(gw, "liar")
        assert frames_on_redis(redis_url, "liar") == []

    before = dropped("dimensions")
    run_beside_good_stream(redis_url, bad, max_width=320, max_height=240)
    assert dropped("dimensions") >= before + 10


def test_decoder_backlog_drops_until_the_next_idr(redis_url: str) -> None:
    """A burst faster than the decoder: access units beyond the backlog are dropped (counted), and
    decoding resumes at an IDR, so what is published is whole GOP tails, in order, never garbage."""
    units = libx264_access_units(150, gop=10)
    packets = rtp_packets(units, T0 + 800)

    async def main() -> None:
        token = await register(redis_url, "burst")
        settings = gateway_settings(redis_url, decoder_backlog=2, max_frames_per_second=10_000)
        async with Gateway(settings).listen(port=0) as gw:
            backlog, waiting = dropped("decoder_backlog"), dropped("await_idr")
            edge = await connect(gw.port, "burst", token)
            await edge.send(packets, fps=0)  # 150 frames at once: the decoder holds at most 2
            await edge.close()
            assert await session_ended(gw, "burst")
            frames = frames_on_redis(redis_url, "burst")
            lost_to_backlog = dropped("decoder_backlog") - backlog
            lost_waiting = dropped("await_idr") - waiting
        assert lost_to_backlog > 0
        assert len(frames) + lost_to_backlog + lost_waiting == len(units)  # every unit accounted for
        assert 0 < len(frames) < len(units)
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        # Each run of published frames starts at an IDR (every 10th unit): the capture times say which.
        indices = [round((f.capture_ts - frames[0].capture_ts) * FPS) for f in frames]
        runs = [i for k, i in enumerate(indices) if k == 0 or indices[k - 1] != i - 1]
        assert indices[0] == 0 and all(i % 10 == 0 for i in runs), runs

    asyncio.run(main())
