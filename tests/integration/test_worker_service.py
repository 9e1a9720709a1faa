"""A real `flowcloud worker` process against a real redis-server: results, poison, retention, drain."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis
import torch
from redis.asyncio import Redis as AsyncRedis
from support.frames import publish
from support.waiting import wait_for
from support.worker import (
    frame,
    metric,
    pending_of,
    pending_total,
    result_count,
    result_seqs,
    running_worker,
)

from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.inference import Segmenter
from flowcloud.labels import class_shares
from flowcloud.redis_server import free_port
from flowcloud.results import MaskStore, decode_label_map
from flowcloud.zoo import load_model

pytestmark = pytest.mark.slow

BATCH = 8
KEEP = 8  # results kept per stream
TTL = 120


def stored(client: redis.Redis, stream: str, seq: int) -> dict[bytes, bytes]:
    return client.hgetall(keys.mask(stream, seq))  # type: ignore[return-value]


def test_worker_segments_drops_dead_letters_trims_and_drains(
    redis_url: str, weights: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    # Stream order decides the batches: the first XREADGROUP (COUNT 8) takes exactly the 8 "cam-a"
    # frames, which the worker splits by size into one batch of 6 and one of 2.
    cam_a = [frame("cam-a", i, 64, 128) for i in range(6)] + [frame("cam-a", i, 48, 96) for i in (6, 7)]
    poison = Frame("cam-p", 0, now, now, 128, 64, "jpeg", b"\xff\xd8 not really a JPEG")
    cam_b = [frame("cam-b", i, 64, 128) for i in range(12)]  # more than KEEP: retention trims
    stale = [frame("cam-s", i, 64, 128, capture_ts=now - 3600) for i in range(3)]
    publish(client, [*cam_a, poison, *cam_b, *stale])
    port = free_port()
    args = (
        "--batch-size", str(BATCH), "--batch-timeout-ms", "200",
        "--mode", "realtime", "--max-frame-age", "600",
        "--claim-idle-ms", "500", "--max-attempts", "3", "--results-max-per-stream", str(KEEP),
        "--results-ttl", str(TTL), "--metrics-port", str(port),
    )  # fmt: skip
    with running_worker(redis_url, weights, "w1", tmp_path, *args) as proc:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200

        def settled() -> bool:
            return (
                result_count(client, "cam-a") == 8
                and client.zrange(keys.mask_index("cam-b"), -1, -1) == [b"11"]
                and client.xlen(keys.DEAD_LETTER_STREAM) == 1
                and pending_total(client) == 0
            )

        wait_for("all frames handled and the poison frame dead-lettered", settled, 120, proc)

        # N frames in, N results out, each equal to a direct model call on the same batch.
        # (Same thread count as the worker's --threads 1: float sums depend on how work is split.)
        segmenter = Segmenter(load_model(weights=weights))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            expected_groups = [segmenter.predict([f.image() for f in g]) for g in (cam_a[:6], cam_a[6:])]
            want_map = segmenter.predict([cam_a[3].image()])[0]
        finally:
            torch.set_num_threads(threads)
        for group, expected in zip((cam_a[:6], cam_a[6:]), expected_groups, strict=True):
            for f, want in zip(group, expected, strict=True):
                fields = stored(client, "cam-a", f.seq)
                got = decode_label_map(fields[b"labels_png"])
                assert got.shape == (f.height, f.width)
                assert np.array_equal(got, want), (
                    f"frame {f.seq}: {np.mean(got != want):.4%} of pixels differ"
                )
        assert (
            len({decode_label_map(stored(client, "cam-a", i)[b"labels_png"]).tobytes() for i in range(6)}) > 1
        )
        result = asyncio.run(MaskStore(AsyncRedis.from_url(redis_url)).get("cam-a", 3))
        assert result is not None
        assert result.shares == pytest.approx(
            class_shares(want_map, segmenter.label_set.num_classes), abs=0.01
        )
        assert sum(result.shares.values()) == pytest.approx(1.0)
        assert (result.model, result.model_version, result.label_set) == (
            "lraspp_mobilenet_v3_large",
            "test-0",
            "labelIds-34",
        )
        assert (
            result.capture_ts
            <= result.recv_ts
            <= result.infer_start
            <= result.infer_end
            <= result.persisted_ts
        )
        assert 0 < result.latency < 300

        # The poison frame failed 3 times, then went to the dead-letter stream with its error.
        [(_, dead)] = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.DEAD_LETTER_STREAM))
        assert dead[keys.F_ERROR.encode()].startswith(b"frame data is not a decodable JPEG: ")
        assert dead[keys.F_ATTEMPTS.encode()] == b"3"
        assert dead[keys.F_STREAM.encode()] == b"cam-p"
        # Its reference, not a copy of its bytes: they stay in the stream's frame log while it keeps them.
        assert (
            keys.F_DATA.encode() not in dead
            and dead[keys.F_SOURCE_QUEUE.encode()] == keys.frame_shard(0).encode()
        )
        [(logged_id, logged)] = cast(
            list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.stream_frames("cam-p"))
        )
        assert dead[keys.F_FRAME_ID.encode()] == logged_id and logged[keys.F_DATA.encode()] == poison.data
        assert not client.exists(keys.attempts("cam-p", 0))
        assert result_count(client, "cam-p") == 0

        # Retention: only the newest KEEP results of cam-b remain, each with a TTL.
        assert result_seqs(client, "cam-b") == list(range(12 - KEEP, 12))
        assert len(list(client.scan_iter(match=keys.mask("cam-b", 0)[:-1] + "*"))) == KEEP
        assert 0 < client.ttl(keys.mask("cam-b", 11)) <= TTL

        # Real-time policy: stale frames were acknowledged without inference, and counted.
        assert result_count(client, "cam-s") == 0
        assert metric(port, 'flowcloud_worker_frames_dropped_total{reason="stale"}') == 3
        assert metric(port, "flowcloud_worker_frames_dead_lettered_total") == 1
        assert metric(port, 'flowcloud_worker_frames_dead_lettered_total{reason="failed"}') == 1
        assert metric(port, "flowcloud_worker_frames_processed_total") >= 8 + 12
        assert metric(port, "flowcloud_worker_end_to_end_latency_seconds_count") >= 20

        # SIGTERM with batches in flight: they are finished and acknowledged, then the worker exits 0.
        # (Three batches' worth, one stream each, so that some are surely in flight when it comes.)
        late = [frame(f"cam-t{i % 3}", i, 64, 128) for i in range(3 * BATCH)]
        by_id = dict(zip(publish(client, late), late, strict=True))
        wait_for("the worker to read new frames", lambda: bool(pending_of(client, "w1")), 30, proc)
        in_flight = pending_of(client, "w1")
        assert proc.stop() == 0, proc.log()
        assert in_flight and set(in_flight) <= set(by_id)
        assert pending_total(client) == 0
        assert all(client.exists(keys.mask(by_id[i].stream, by_id[i].seq)) for i in in_flight)
        # It left the worker index and the consumer group on its way out.
        assert not client.exists(keys.worker("w1"))
        assert client.zscore(keys.WORKERS_INDEX, "w1") is None
        consumers = client.xinfo_consumers(keys.frame_shard(0), keys.WORKER_GROUP)
        assert all(c["name"] not in ("w1", b"w1") for c in consumers)
    assert "drained" in proc.log()
