"""Helpers for the query API tests: data written through the real MaskStore and real Frame
entries, API keys made by the real key store, and a real uvicorn server on loopback (in a thread,
or as a `flowcloud api` process)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.frames import Frame, encode_image
from flowcloud.labels import TRAIN_IDS, class_shares
from flowcloud.redis_server import free_port
from flowcloud.results import MaskResult, MaskStore, encode_label_map
from flowcloud.settings import ApiSettings
from flowcloud.stack import Service
from flowcloud.streams import StreamMeta
from services.api.apikeys import ApiKeyStore
from services.api.main import build_server
from support.waiting import wait_for

WIDTH, HEIGHT = 64, 32
RECENT_MAXLEN = 8
ROAD, BUILDING, SKY, CAR = 0, 2, 10, 13  # trainIds


def class_map(seq: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A street-like class map whose car moves with the seq (so shares vary over time)."""
    m = np.full((height, width), BUILDING, dtype=np.uint8)
    m[: height // 4] = SKY
    m[height // 2 :] = ROAD
    unit = max(1, width // 64)
    x = (seq * 3 * unit) % (width - 12 * unit)
    m[height // 2 - 4 * unit : height // 2 + 6 * unit, x : x + (4 + seq % 8) * unit] = CAR
    return m


def frame_image(seq: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """An RGB frame: a horizontal gradient, brighter for later seqs."""
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    rgb = np.broadcast_to(ramp + (seq % 50), (height, width, 3))
    return np.ascontiguousarray(rgb.astype(np.uint8))


@dataclass
class SeededStream:
    stream_id: str
    tenant: str
    seqs: list[int]  # oldest first
    capture_ts: dict[int, float]
    recent: list[int]  # seqs still in the recent-frames window


async def _seed(
    redis_url: str,
    stream_id: str,
    tenant: str,
    count: int,
    start_ts: float,
    period: float,
    live: bool,
    size: tuple[int, int],
    trimmed_unread: int | None = None,
    link_delay: float = 0.0,
) -> SeededStream:
    width, height = size
    redis = Redis.from_url(redis_url)
    try:
        store = MaskStore(redis)
        results = []
        capture = {}
        for seq in range(count):
            ts = start_ts + seq * period
            capture[seq] = ts
            at = ts + link_delay  # the gateway's and the worker's stamps come that much later
            cmap = class_map(seq, width, height)
            results.append(
                MaskResult(
                    stream=stream_id,
                    seq=seq,
                    capture_ts=ts,
                    recv_ts=at + 0.01,
                    infer_start=at + 0.02,
                    infer_end=at + 0.05,
                    persisted_ts=at + 0.06 + 0.001 * (seq % 10),
                    model="test-model",
                    model_version="1",
                    label_set=TRAIN_IDS.name,
                    width=width,
                    height=height,
                    shares=class_shares(cmap, TRAIN_IDS.num_classes),
                    labels_png=encode_label_map(cmap, TRAIN_IDS),
                    sent_ts=ts + 0.002,
                    decoded_ts=at + 0.013,
                    published_ts=at + 0.014,
                    read_ts=at + 0.016,
                )
            )
        await store.put_many(results)
        recent = list(range(max(0, count - RECENT_MAXLEN), count))
        for seq in recent:
            frame = Frame(
                stream=stream_id,
                seq=seq,
                capture_ts=capture[seq],
                recv_ts=capture[seq] + 0.01,
                width=width,
                height=height,
                encoding="jpeg",
                data=encode_image(frame_image(seq, width, height), "jpeg", quality=95),
            )
            fields: dict[Any, Any] = frame.to_fields()
            await redis.xadd(keys.stream_frames(stream_id), fields, maxlen=RECENT_MAXLEN)
        last = start_ts + (count - 1) * period if count else start_ts
        seen = time.time() if live else last
        meta = StreamMeta(
            device=stream_id,
            tenant=tenant,
            width=1280,
            height=720,
            fps=1.0 / period,
            last_seen=seen,
            started=start_ts,
            status=keys.STATUS_LIVE if live else keys.STATUS_IDLE,
            last_seq=max(count - 1, 0),
            trimmed_unread=trimmed_unread,
        )
        await redis.hset(keys.stream_meta(stream_id), mapping=meta.to_fields())  # type: ignore[arg-type]
        await redis.zadd(keys.STREAMS_INDEX, {stream_id: seen})
        await redis.zadd(keys.tenant_streams(tenant), {stream_id: seen})
    finally:
        await redis.aclose()  # type: ignore[attr-defined,unused-ignore]  # types-redis predates aclose
    return SeededStream(stream_id, tenant, list(range(count)), capture, recent)


def seed_stream(
    redis_url: str,
    stream_id: str,
    tenant: str,
    count: int = 30,
    start_ts: float = 1_700_000_000.0,
    period: float = 0.1,
    live: bool = True,
    size: tuple[int, int] = (WIDTH, HEIGHT),
    trimmed_unread: int | None = None,
    link_delay: float = 0.0,
) -> SeededStream:
    """A stream described as the gateway does, ``count`` results as workers write them, and the
    last RECENT_MAXLEN frames in its recent-frames window. Every result has all its stage stamps;
    ``link_delay`` seconds more in the network stage (edge to gateway) than on loopback."""
    return asyncio.run(
        _seed(redis_url, stream_id, tenant, count, start_ts, period, live, size, trimmed_unread, link_delay)
    )


PERSON = TRAIN_IDS.class_names.index("person")
SHARE_PIXELS = 1000  # pixels of a share_result map: shares are multiples of 0.001


def share_result(stream_id: str, seq: int, capture_ts: float, person: float, car: float = 0.0) -> MaskResult:
    """A result whose map is ``person`` people and ``car`` cars (fractions), road elsewhere."""
    flat = np.full(SHARE_PIXELS, ROAD, dtype=np.uint8)
    people = round(person * SHARE_PIXELS)
    flat[:people] = PERSON
    flat[people : people + round(car * SHARE_PIXELS)] = CAR
    cmap = flat.reshape(20, SHARE_PIXELS // 20)
    return MaskResult(
        stream=stream_id,
        seq=seq,
        capture_ts=capture_ts,
        recv_ts=capture_ts + 0.01,
        infer_start=capture_ts + 0.02,
        infer_end=capture_ts + 0.03,
        persisted_ts=capture_ts + 0.04,
        model="test-model",
        model_version="1",
        label_set=TRAIN_IDS.name,
        width=cmap.shape[1],
        height=cmap.shape[0],
        shares=class_shares(cmap, TRAIN_IDS.num_classes),
        labels_png=encode_label_map(cmap, TRAIN_IDS),
    )


async def describe_stream(redis: Redis, stream_id: str, tenant: str, last_seen: float) -> None:
    """The stream's metadata and index entries as the gateway writes them."""
    await redis.hset(
        keys.stream_meta(stream_id),
        mapping={keys.M_DEVICE: stream_id, keys.M_TENANT: tenant, keys.M_LAST_SEEN: repr(last_seen)},
    )
    await redis.zadd(keys.STREAMS_INDEX, {stream_id: last_seen})
    await redis.zadd(keys.tenant_streams(tenant), {stream_id: last_seen})


def make_key(redis_url: str, role: str, tenant: str) -> str:
    async def add() -> str:
        redis = Redis.from_url(redis_url)
        try:
            _key, token = await ApiKeyStore(redis).add(role, tenant)
            return token
        finally:
            await redis.aclose()  # type: ignore[attr-defined,unused-ignore]  # types-redis predates aclose

    return asyncio.run(add())


@contextmanager
def running_api(settings: ApiSettings) -> Iterator[str]:
    """A real uvicorn server with the app on 127.0.0.1 in a thread; yields its base URL."""
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    server = build_server(settings)
    thread = threading.Thread(target=server.run, name="api-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def api_process(log_path: Path, env: dict[str, str]) -> Iterator[str]:
    """`flowcloud api` as a real process on a free loopback port (settings from ``env``, added to
    this environment), run as the one-machine stack runs its services; yields its base URL once
    /healthz answers, and stops it with SIGTERM."""
    port = free_port()
    service = Service("api", ["api", "--host", "127.0.0.1", "--port", str(port)], env, log_path=log_path)
    service.start()
    assert service.process is not None
    service.process.log_path = log_path  # type: ignore[attr-defined]  # wait_for shows its tail
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the API to answer /healthz", lambda: _answers(f"{base}/healthz"), 60, service.process)
        yield base
    finally:
        service.stop(timeout=15)
