"""The shard queue's bound never loses a frame silently, and the lag stays true (issue 16, item 1).

The gateway's real `FramePublisher` writes to a real redis-server with ``frames_maxlen`` 50; a real
complete-mode `flowcloud worker` process reads. Every published frame ends as a result or as a
counted ``trimmed_unread`` frame of its stream, and the worker's lag gauge, like Redis's own lag
(what KEDA scales on), falls to 0 once nothing is left to read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from support.frames import entries, frames_on_redis
from support.gateway import dropped
from support.waiting import wait_for
from support.worker import WorkerProcess, frame, pending_total, result_count, result_seqs, running_worker

from flowcloud import keys
from flowcloud.redis_server import free_port
from flowcloud.streams import StreamMeta
from services.gateway.publisher import UNASSIGNED_SEQ, FramePublisher

pytestmark = pytest.mark.slow

MAXLEN = 50
STREAM = "cam-r"


def publish(redis_url: str, count: int, backfill: bool = False) -> None:
    """Publish ``count`` frames through the gateway's publisher (seqs assigned by it), and wait."""

    async def main() -> None:
        client = AsyncRedis.from_url(redis_url)
        publisher = FramePublisher(client, MAXLEN, backfill_maxlen=MAXLEN)
        publisher.start()
        for i in range(count):
            publisher.submit(dataclasses.replace(frame(STREAM, UNASSIGNED_SEQ, 64, 128), backfill=backfill))
            if i % 10 == 9:
                await asyncio.sleep(0)  # batches of about ten, as a live stream gives
        await publisher.close(30.0)
        assert publisher.published == count
        await client.aclose()

    asyncio.run(main())


def worker_lag(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    (line,) = [line for line in body.splitlines() if line.startswith("flowcloud_worker_consumer_lag ")]
    return float(line.split()[1])


def redis_lag(client: redis.Redis) -> int:
    (group,) = client.xinfo_groups(keys.frame_shard(0))
    return int(group["lag"])


def trimmed(client: redis.Redis) -> int:
    return StreamMeta.from_fields(client.hgetall(keys.stream_meta(STREAM))).trimmed_unread or 0


def complete_worker(
    redis_url: str, weights: Path, tmp_path: Path, port: int
) -> AbstractContextManager[WorkerProcess]:
    args = ["--mode", "complete", "--batch-size", "8", "--batch-timeout-ms", "50"]
    args += ["--metrics-port", str(port)]
    return running_worker(redis_url, weights, "w-complete", tmp_path, *args)


def test_frames_published_before_any_worker_are_counted_when_trimmed(
    redis_url: str, weights: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    before = dropped("trimmed_unread")
    publish(redis_url, 300)
    # The group exists from the first frame, so the 250 frames the bound removed are known lost.
    assert trimmed(client) == 250 and dropped("trimmed_unread") - before == 250
    assert client.xlen(keys.frame_shard(0)) == MAXLEN and redis_lag(client) == MAXLEN
    port = free_port()
    with complete_worker(redis_url, weights, tmp_path, port) as proc:
        wait_for("the 50 kept frames segmented", lambda: result_count(client, STREAM) == MAXLEN, 120, proc)
        assert result_seqs(client, STREAM) == list(range(251, 301))
        done = lambda: worker_lag(port) == 0 and pending_total(client) == 0  # noqa: E731
        wait_for("nothing left to read", done, 30, proc)
        assert redis_lag(client) == 0
        assert proc.stop() == 0


def test_backfill_frames_beyond_their_bound_are_counted_when_trimmed(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    before = dropped("trimmed_unread")
    publish(redis_url, 80, backfill=True)  # an edge's spool drained before any worker reads the lane
    assert trimmed(client) == 30 and dropped("trimmed_unread") - before == 30
    assert client.xlen(keys.backfill_shard(0)) == MAXLEN and not client.exists(keys.frame_shard(0))
    refs = [int(fields[b"seq"]) for _, fields in entries(client, keys.backfill_shard(0))]
    assert refs == list(range(31, 81))
    # The stream's backfill log keeps at least as many (MAXLEN ~), its live log none.
    kept = frames_on_redis(redis_url, STREAM, backfill=True)
    assert {f.seq for f in kept} >= set(refs) and all(f.backfill for f in kept)
    assert not client.exists(keys.stream_frames(STREAM))


def test_worker_paused_mid_stream_loses_only_counted_frames_and_its_lag_returns_to_zero(
    redis_url: str, weights: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    port = free_port()
    with complete_worker(redis_url, weights, tmp_path, port) as proc:
        publish(redis_url, 13)
        wait_for("13 frames segmented", lambda: result_count(client, STREAM) == 13, 60, proc)
        os.kill(proc.pid, signal.SIGSTOP)  # the worker pauses; 100 more frames arrive meanwhile
        try:
            publish(redis_url, 100)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        lost = trimmed(client)
        assert lost > 0  # more unread frames than the bound keeps

        def settled() -> bool:
            return result_count(client, STREAM) + lost == 113 and pending_total(client) == 0

        wait_for("every frame segmented or counted as trimmed", settled, 120, proc)
        wait_for("the lag gauge at 0", lambda: worker_lag(port) == 0, 30, proc)
        assert redis_lag(client) == 0
        # The lost frames are the oldest unread ones; everything after them was segmented.
        seqs = result_seqs(client, STREAM)
        missing = sorted(set(range(1, 114)) - set(seqs))
        assert len(missing) == lost and missing == list(range(missing[0], missing[0] + lost))
        assert seqs[-1] == 113
        assert proc.stop() == 0
