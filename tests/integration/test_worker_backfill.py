"""The worker's backfill lane: a real `flowcloud worker` in realtime mode segments spooled frames
from the backfill lane (`keys.backfill_shard`) however old they are, marks their results, acknowledges them
on their own stream, and keeps serving live frames."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import redis
from support.frames import publish
from support.waiting import wait_for
from support.worker import frame, results_of, running_worker

from flowcloud import keys

pytestmark = pytest.mark.slow


def test_backfill_frames_are_segmented_in_complete_mode_and_marked(
    redis_url: str, weights: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    hour_ago = time.time() - 3600
    spooled = [
        dataclasses.replace(frame("cam-1", i, 64, 128, capture_ts=hour_ago + i), backfill=True)
        for i in range(5)
    ]
    publish(client, spooled)
    args = ("--batch-size", "4", "--batch-timeout-ms", "100", "--mode", "realtime", "--max-frame-age", "2")
    with running_worker(redis_url, weights, "w1", tmp_path, *args) as proc:
        publish(client, [frame("cam-1", 10, 64, 128)])
        wait_for("live and spooled segmented", lambda: len(results_of(client, "cam-1")) == 6, 120, proc)
        acked = lambda: client.xpending(keys.backfill_shard(0), keys.WORKER_GROUP)["pending"] == 0  # noqa: E731
        wait_for("spooled frames acknowledged on their own stream", acked, 30, proc)  # (stored, then acked)
        assert proc.stop() == 0
    by_seq = {r.seq: r for r in results_of(client, "cam-1")}
    assert [by_seq[i].backfill for i in range(5)] == [True] * 5  # an hour old, not dropped: complete
    assert not by_seq[10].backfill and by_seq[10].producer == "cloud"
    client.close()
