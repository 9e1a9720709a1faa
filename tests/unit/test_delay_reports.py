"""Delay reports (gateway -> edge): the message and the HELLO flag that asks for it (old peers see
nothing new), the gateway's rate-limited reporter, the edge's reading of them (`PathDelay`)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from edge.sender import PathDelay
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import read_frame
from flowcloud.protocol.handshake import DelayReport, Hello, StreamInfo, parse_control
from services.gateway.delay_reports import DelayReporter
from services.gateway.pipeline import UnitTimes


def test_a_delay_report_round_trips_and_is_bounded() -> None:
    assert parse_control(DelayReport(0.25).to_bytes()) == DelayReport(0.25)
    assert parse_control(DelayReport(-0.003).to_bytes()) == DelayReport(-0.003)  # a clock offset error
    with pytest.raises(ProtocolError, match="delay lacks field 'delay'"):
        DelayReport.parse(b'{"type":"delay"}')
    with pytest.raises(ProtocolError, match="out of range"):
        DelayReport.parse(b'{"type":"delay","delay":1e9}')
    with pytest.raises(ProtocolError, match="not a finite number"):
        DelayReport.parse(b'{"type":"delay","delay":1e999}')


def test_only_an_edge_that_asks_gets_reports() -> None:
    asking = StreamInfo(96, 64, 30.0, delay_reports=True)
    assert Hello.parse(Hello("cam-1", "tok", asking).to_bytes()).stream == asking
    assert "delay_reports" not in StreamInfo(96, 64, 30.0).to_dict()  # an old gateway sees what it knew
    assert not StreamInfo.from_dict(StreamInfo(96, 64, 30.0).to_dict()).delay_reports  # an old edge
    with pytest.raises(ProtocolError, match="'delay_reports' must be bool"):
        StreamInfo.from_dict({**StreamInfo(96, 64, 30.0).to_dict(), "delay_reports": "yes"})


def test_the_gateway_reports_the_newest_delay_at_most_every_interval() -> None:
    async def main() -> None:
        left, right = socket.socketpair()
        reader, left_writer = await asyncio.open_connection(sock=left)
        right_reader, writer = await asyncio.open_connection(sock=right)  # both kept: GC would close them
        reporter = DelayReporter(writer, "s1", interval=0.2)
        assert not reporter.observe(UnitTimes(100.0, 100.5, None))  # an older edge: no send time
        assert reporter.observe(UnitTimes(100.0, 100.5, 100.2))
        assert not reporter.observe(UnitTimes(100.0, 100.6, 100.2))  # within the interval
        await asyncio.sleep(0.25)
        assert reporter.observe(UnitTimes(100.0, 101.0, 100.1))
        await writer.drain()
        got = [parse_control(await read_frame(reader)) for _ in range(2)]
        assert [g.delay for g in got if isinstance(g, DelayReport)] == pytest.approx([0.3, 0.9])
        assert reporter.sent == 2
        writer.close()
        left_writer.close()
        assert not right_reader.at_eof()

    asyncio.run(main())


def test_the_edge_reads_a_rise_above_the_lowest_that_holds_while_reports_are_fresh() -> None:
    path = PathDelay(ttl=0.5, window=0.3)
    assert path.queued(10.0) == 0.0  # no report yet
    path.report(0.35, 10.0)  # the base delay (a far link), or a clock offset error
    assert path.queued(10.1) == 0.0
    path.report(1.35, 10.1)  # a lone high report: the gateway paused, then read the backlog at once
    path.report(0.36, 10.2)
    assert path.queued(10.2) == 0.0  # (it counts for nothing)
    for i, delay in enumerate((0.6, 0.8, 1.0, 1.2)):  # the path's queue grows: it has held
        path.report(delay, 10.3 + i / 10)
    assert path.queued(10.6) == pytest.approx(0.6 - 0.35)  # the lowest of the last 0.3 s and the one before
    assert path.queued(11.11) == 0.0  # stale: no live access unit arrived since
    path.reset()  # a new session: a new path and clock offset
    path.report(2.0, 12.0)
    assert path.queued(12.0) == 0.0
