"""Gateways and workers whose machines' clocks are off by a minute: the times they exchange are on
Redis's clock (`flowcloud.clock`), so frame ages, stale drops and result latencies stay right."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import cast

import pytest
import redis
from prometheus_client import REGISTRY
from redis.asyncio import Redis as AsyncRedis
from support.api import seed_stream
from support.frames import publish
from support.gateway import gateway_settings
from support.waiting import eventually
from support.worker import frame, pending_total, result_count

from flowcloud import keys
from flowcloud.clock import RedisClock
from flowcloud.frame_queue import ensure_groups
from flowcloud.frames import Frame
from flowcloud.results import MaskResult, MaskStore
from flowcloud.settings import WorkerSettings
from flowcloud.stages import WORKER_STAGES
from services.api.queries import StreamQueries
from services.gateway.publisher import UNASSIGNED_SEQ, FramePublisher
from services.gateway.server import Gateway
from services.worker.consumer import Worker


def stage_count(service: str, stage: str) -> float:
    """Observations so far of a service's stage histogram (this process's registry)."""
    name = f"flowcloud_{service}_stage_seconds_count"
    return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0


def test_gateway_publishes_times_on_redis_clock(redis_url: str) -> None:
    """A gateway machine 100 s fast: what it publishes is on Redis's clock all the same, stage
    stamps included, and its stage histogram counts the frame's times."""
    skew = 100.0
    network_before = stage_count("gateway", "network")

    async def main() -> FramePublisher:
        aclient = AsyncRedis.from_url(redis_url)
        gateway_clock = RedisClock(local=lambda: time.time() + skew)
        publisher = FramePublisher(aclient, frames_maxlen=100, clock=gateway_clock)
        publisher.start()
        local_now = time.time() + skew - 0.05  # what this gateway's clock said at receipt
        received = Frame(
            "cam-skew",
            UNASSIGNED_SEQ,
            local_now - 0.5,
            local_now,
            8,
            8,
            "raw",
            bytes(192),
            sent_ts=local_now - 0.3,
            decoded_ts=local_now + 0.01,
        )
        publisher.submit(received)
        await publisher.close(timeout=10)
        await aclient.aclose()
        return publisher

    publisher = asyncio.run(main())
    assert publisher.published == 1 and publisher.clock.offset == pytest.approx(-skew, abs=0.05)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    [(_, fields)] = cast(list[tuple[str, dict[str, str]]], client.xrange(keys.stream_frames("cam-skew")))
    last_seen = float(client.hget(keys.stream_meta("cam-skew"), keys.M_LAST_SEEN) or 0)
    client.close()
    now = time.time()  # redis-server runs here: its clock is this one
    assert float(fields[keys.F_RECV_TS]) == pytest.approx(now, abs=1.0)
    assert float(fields[keys.F_RECV_TS]) - float(fields[keys.F_CAPTURE_TS]) == pytest.approx(0.5, abs=1e-6)
    assert float(fields[keys.F_SENT_TS]) - float(fields[keys.F_CAPTURE_TS]) == pytest.approx(0.2, abs=1e-6)
    assert float(fields[keys.F_DECODED_TS]) - float(fields[keys.F_RECV_TS]) == pytest.approx(0.01, abs=1e-6)
    assert float(fields[keys.F_DECODED_TS]) <= float(fields[keys.F_PUBLISHED_TS]) <= time.time()
    assert stage_count("gateway", "network") == network_before + 1
    assert last_seen == pytest.approx(now, abs=1.0)


def test_the_gateway_reads_redis_clock_before_its_first_session(redis_url: str) -> None:
    """A session stamps its start on Redis's clock as soon as it is accepted, which can be before
    anything was published: start() measures the clock, so the first session's start is right."""

    async def main() -> None:
        gateway = Gateway(gateway_settings(redis_url))
        gateway.publisher.clock = RedisClock(local=lambda: time.time() + 100.0)
        async with gateway.listen():
            assert gateway.publisher.clock.offset == pytest.approx(-100.0, abs=0.05)
            assert gateway.publisher.clock.now() == pytest.approx(time.time(), abs=0.5)

    asyncio.run(main())


@pytest.mark.parametrize("skew", [60.0, -60.0])
def test_frame_ages_do_not_depend_on_the_worker_clock(redis_url: str, skew: float) -> None:
    settings = WorkerSettings(
        redis_url=redis_url,
        metrics_port=0,
        batch_size=4,
        max_frame_age=1.0,
        warmup_size="32x64",
        decode_threads=1,
    )
    client = redis.Redis.from_url(redis_url)
    inference_before = stage_count("worker", "inference")
    fresh: list[Frame] = []
    beats: list[float | None] = []

    async def main() -> Worker:
        aclient = AsyncRedis.from_url(redis_url)
        await ensure_groups(aclient, 1)
        clock = RedisClock(local=lambda: time.time() + skew)  # this machine's clock is off
        worker = Worker(settings, aclient, clock=clock)
        await worker.start()  # the frames after it: loading the model may take longer than their bound
        now = time.time()
        fresh.extend(replace(frame("cam-clock", seq, 32, 64), published_ts=now) for seq in (1, 2, 3))
        slow = frame("cam-clock", 4, 32, 64, capture_ts=now - 5.0)  # 5 s from capture to the gateway
        assert slow.recv_ts - slow.capture_ts > 4.9
        publish(client, [*fresh, slow])
        serving = asyncio.create_task(worker.serve())
        finished = await eventually(
            lambda: result_count(client, "cam-clock") >= 3 and not pending_total(client), 60
        )
        assert finished, "the worker did not finish the frames"
        await worker.heartbeat.beat()  # on Redis's clock too: the API lists it as alive
        beats.append(await aclient.zscore(keys.WORKERS_INDEX, worker.name))
        worker.request_stop()
        await serving
        await worker.close()
        await aclient.aclose()
        return worker

    worker = asyncio.run(main())
    assert worker.clock.offset == pytest.approx(-skew, abs=0.5)
    assert result_count(client, "cam-clock") == 3  # the fresh ones, whatever the worker's clock says
    for seq in (1, 2, 3):  # stamped on Redis's clock: latencies of a fraction of a second, not a minute
        result = MaskResult.from_fields(client.hgetall(keys.mask("cam-clock", seq)))  # type: ignore[arg-type]
        assert 0 < result.latency < 30
        # The worker's stamps too: its stages are all there, none negative, and they add up.
        assert result.published_ts == fresh[seq - 1].published_ts
        worker_stages = [result.stages()[s.name] for s in WORKER_STAGES]
        known = [t for t in worker_stages if t is not None]
        assert len(known) == len(WORKER_STAGES) and min(known) >= 0 and result.published_ts is not None
        assert sum(known) == pytest.approx(result.persisted_ts - result.published_ts, abs=1e-6)
    assert stage_count("worker", "inference") >= inference_before + 3
    assert not client.exists(keys.mask("cam-clock", 4))  # the slow one was dropped as stale
    assert pending_total(client) == 0
    assert beats == [pytest.approx(time.time(), abs=30)]
    client.close()


def test_api_judges_liveness_on_redis_clock(redis_url: str) -> None:
    """An API machine two minutes slow: a stream seen a moment ago is live, an old one is not."""
    seed_stream(redis_url, "cam-live", "acme", count=2, live=True)  # last seen now
    seed_stream(redis_url, "cam-old", "acme", count=2, live=False)  # last seen in 2023

    async def main() -> dict[str, str]:
        aclient = AsyncRedis.from_url(redis_url)
        api_clock = RedisClock(local=lambda: time.time() - 120)
        queries = StreamQueries(aclient, MaskStore(aclient), live_window=10.0, clock=api_clock)
        infos = await queries.streams(["cam-live", "cam-old"])
        await aclient.aclose()
        return {info.stream_id: info.status for info in infos}

    assert asyncio.run(main()) == {"cam-live": keys.STATUS_LIVE, "cam-old": keys.STATUS_IDLE}
