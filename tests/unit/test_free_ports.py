"""Free ports for the embedded stack: a run of consecutive ports (one metrics port per worker) is
free as a whole, not only its first port."""

from __future__ import annotations

import socket

import pytest

from flowcloud import redis_server
from flowcloud.redis_server import free_port_run, free_ports


def test_a_run_whose_second_port_is_taken_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        firsts = iter([busy - 1, *free_ports(4)])  # the first candidate's successor is in use
        monkeypatch.setattr(redis_server, "free_port", lambda host="127.0.0.1": next(firsts))
        first = free_port_run(2)
        assert first != busy - 1 and busy not in (first, first + 1)
