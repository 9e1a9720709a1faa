"""bench.api judges the rate it offered, not the count delivered inside the window."""

from __future__ import annotations

from bench.api import LoadResult, goal_verdict

CLOSED = {"rps": 1400.0}


def open_loop(offered: int, ok: int, errors: int = 0, p99: float = 0.0025) -> dict[str, float]:
    """The summary of an 8 s open loop at 1,000/s whose answers took ``p99`` at the 99th percentile."""
    latencies = [p99 / 2] * 98 + [p99] * 2
    result = LoadResult(offered, ok, errors, 8.2, latencies, offered=offered, window=8.0)
    return result.summary()


def test_all_offered_answered_in_time_is_met_although_fewer_fell_inside_the_window() -> None:
    summary = open_loop(8000, 8000)
    assert summary["rps"] < 980  # 8,000 answers over the 8.2 s the run took, as bench.api used to judge
    met, why = goal_verdict(CLOSED, summary)
    assert met, why
    assert "offered 1000/s" in why


def test_unanswered_errors_slow_answers_or_a_low_rate_are_not_met() -> None:
    assert not goal_verdict(CLOSED, open_loop(8000, 7990))[0]  # 10 never answered
    assert not goal_verdict(CLOSED, open_loop(8000, 7990, errors=10))[0]
    assert not goal_verdict(CLOSED, open_loop(8000, 8000, p99=0.2))[0]
    assert not goal_verdict(CLOSED, open_loop(4000, 4000))[0]  # offered only 500/s
    assert not goal_verdict({"rps": 900.0}, open_loop(8000, 8000))[0]
