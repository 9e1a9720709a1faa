"""Worker failures against real processes: kill -9 in the middle of a batch, and a Redis restart."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from support.frames import publish
from support.waiting import wait_for
from support.worker import frame, pending_of, pending_total, result_count, result_seqs, running_worker

from flowcloud import keys
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import decode_label_map

pytestmark = pytest.mark.slow


def test_kill_9_mid_batch_another_worker_finishes_without_loss_or_duplicates(
    redis_url: str, weights: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    frames = [frame("cam-k", i, 128, 256) for i in range(24)]
    publish(client, frames)
    common = ("--batch-size", "8", "--mode", "complete", "--claim-idle-ms", "1500", "--max-attempts", "3")
    with running_worker(redis_url, weights, "doomed", tmp_path, *common) as doomed:
        wait_for("the doomed worker to take a batch", lambda: bool(pending_of(client, "doomed")), 30, doomed)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    # It died holding frames it had read but not acknowledged (possibly after persisting some).
    orphaned = pending_of(client, "doomed")
    assert orphaned, "the worker was not killed in the middle of a batch"

    with running_worker(redis_url, weights, "heir", tmp_path, *common) as heir:
        wait_for("every frame to have a result", lambda: result_count(client, "cam-k") == 24, 120, heir)
        wait_for("nothing left pending", lambda: pending_total(client) == 0, 30, heir)
        assert heir.stop() == 0

    # None lost, none duplicated: one result per frame, and nothing dead-lettered.
    assert result_seqs(client, "cam-k") == list(range(24))
    assert len(list(client.scan_iter(match="fc:mask:{cam-k}:*"))) == 24
    assert client.xlen(keys.DEAD_LETTER_STREAM) == 0
    for f in frames:
        labels = decode_label_map(client.hget(keys.mask("cam-k", f.seq), "labels_png"))  # type: ignore[arg-type]
        assert labels.shape == (128, 256) and labels.dtype == np.uint8
    # The heir took over exactly the orphaned frames (XAUTOCLAIM in batches of up to 8).
    claimed = re.findall(r"reclaimed (\d+) idle pending frames", heir.log())
    assert sum(map(int, claimed)) == len(orphaned)


def test_worker_survives_a_redis_restart(weights: Path, tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        args = ("--batch-size", "4", "--mode", "complete", "--claim-idle-ms", "1500")
        with running_worker(server.url, weights, "steady", tmp_path, *args) as proc:
            publish(client, [frame("cam-r", i, 64, 128) for i in range(4)])
            wait_for("the first frames' results", lambda: result_count(client, "cam-r") == 4, 60, proc)

            server.stop()  # SIGTERM: redis-server finishes its append-only file and exits
            time.sleep(1.5)  # the worker meets a refused connection at least once
            assert proc.poll() is None
            server.start()
            client = redis.Redis.from_url(server.url)
            publish(client, [frame("cam-r", i, 64, 128) for i in range(4, 8)])
            wait_for("results after the restart", lambda: result_count(client, "cam-r") == 8, 60, proc)
            wait_for("nothing left pending", lambda: pending_total(client) == 0, 30, proc)
            wait_for(
                "a heartbeat after the restart", lambda: client.exists(keys.worker("steady")) == 1, 10, proc
            )
            assert proc.stop() == 0
        assert "Redis unavailable" in proc.log()
    finally:
        server.stop()
