"""Streams, paging, image formats, stats and the live view, against a real redis-server with data
written through the real MaskStore and real Frame entries, over a real uvicorn on loopback."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from support.api import (
    HEIGHT,
    RECENT_MAXLEN,
    WIDTH,
    class_map,
    frame_image,
    make_key,
    running_api,
    seed_stream,
)

from flowcloud import keys
from flowcloud.frames import decode_image
from flowcloud.labels import TRAIN_IDS, blend_overlay
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.settings import ApiSettings
from flowcloud.stages import STAGE_NAMES

COUNT = 250
START = 1_700_000_000.0
PERIOD = 0.1


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One seeded Redis and API for the read-only tests of this module (its own redis-server, so
    the per-test flush of the shared one cannot touch it)."""
    with EmbeddedRedis(tmp_path_factory.mktemp("api-streams-redis"), appendonly=False) as server:
        seed_stream(server.url, "cam-1", "acme", count=COUNT, start_ts=START, period=PERIOD)
        seed_stream(
            server.url,
            "cam-old",
            "acme",
            count=3,
            start_ts=START,
            period=PERIOD,
            live=False,
            trimmed_unread=7,
        )
        token = make_key(server.url, "reader", "acme")
        with (
            running_api(ApiSettings(redis_url=server.url)) as base,
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c,
        ):
            yield c


def test_streams_describe_status_resolution_and_latency(client: httpx.Client) -> None:
    items = {s["stream_id"]: s for s in client.get("/streams").json()["items"]}
    assert set(items) == {"cam-1", "cam-old"}
    live, old = items["cam-1"], items["cam-old"]
    assert (live["status"], old["status"]) == ("live", "idle")
    assert (live["width"], live["height"], live["fps"]) == (1280, 720, pytest.approx(10.0))
    assert live["results"] == COUNT and live["latest_result_seq"] == COUNT - 1
    # Seeded latencies are 0.06 s + 1 ms * (seq % 10).
    assert 0.06 <= live["latency"]["p50"] <= live["latency"]["p95"] <= 0.0695
    assert live["latency"]["result_fps"] == pytest.approx(10.0)
    one = client.get("/streams/cam-1").json()
    assert one["stream_id"] == "cam-1" and one["tenant"] == "acme" and one["last_seq"] == COUNT - 1
    # Frames the bounded frames stream lost before a worker read them, counted by the gateway.
    assert (live["trimmed_unread"], old["trimmed_unread"]) == (0, 7)


def test_pages_walk_every_result_newest_first_once(client: httpx.Client) -> None:
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 100}
        if cursor is not None:
            params["cursor"] = cursor
        page = client.get("/streams/cam-1/masks", params=params).json()
        pages += 1
        assert len(page["items"]) <= 100
        seen += [m["seq"] for m in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(range(COUNT - 1, -1, -1))


@pytest.mark.parametrize("limit", ["0", "101", "-1", "ten"])
def test_limit_out_of_bounds_is_422(client: httpx.Client, limit: str) -> None:
    response = client.get("/streams/cam-1/masks", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "limit"]


def test_limit_bounds_hold(client: httpx.Client) -> None:
    assert len(client.get("/streams/cam-1/masks", params={"limit": 1}).json()["items"]) == 1
    full = client.get("/streams/cam-1/masks", params={"limit": 100}).json()
    assert len(full["items"]) == 100 and full["next_cursor"] == str(COUNT - 100)
    default = client.get("/streams/cam-1/masks").json()
    assert len(default["items"]) == 50


@pytest.mark.parametrize(
    "params",
    [{"cursor": "-5"}, {"cursor": "x"}, {"since": "yesterday"}, {"until": "2026-13-40"}],
)
def test_bad_paging_params_are_422(client: httpx.Client, params: dict[str, str]) -> None:
    assert client.get("/streams/cam-1/masks", params=params).status_code == 422


def test_since_and_until_filter_by_capture_time(client: httpx.Client) -> None:
    since, until = START + 10 * PERIOD, START + 40 * PERIOD  # seqs 10..39
    seqs: list[int] = []
    cursor = None
    while True:
        params: dict[str, str | float] = {"since": since, "until": until, "limit": 7}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/streams/cam-1/masks", params=params).json()
        seqs += [m["seq"] for m in page["items"]]
        for m in page["items"]:
            assert since <= m["capture_ts"] < until
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seqs == list(range(39, 9, -1))
    iso = datetime.fromtimestamp(START + 200 * PERIOD, tz=UTC).isoformat()
    after = client.get("/streams/cam-1/masks", params={"since": iso, "limit": 100}).json()
    assert [m["seq"] for m in after["items"]] == list(range(COUNT - 1, 199, -1))
    assert after["next_cursor"] is None
    empty = client.get("/streams/cam-1/masks", params={"until": START - 1}).json()
    assert empty == {"items": [], "next_cursor": None}


def test_latest_and_frame_metadata(client: httpx.Client) -> None:
    latest = client.get("/streams/cam-1/masks/latest").json()
    assert latest["seq"] == COUNT - 1 and latest["label_set"] == TRAIN_IDS.name
    assert latest["latency"] == pytest.approx(latest["persisted_ts"] - latest["capture_ts"])
    # Every stage of the frame's way, in order, adding up to the latency.
    assert list(latest["stages"]) == list(STAGE_NAMES)
    assert sum(latest["stages"].values()) == pytest.approx(latest["latency"], abs=1e-6)
    assert latest["read_ts"] - latest["published_ts"] == pytest.approx(latest["stages"]["queue"], abs=1e-6)
    expected = class_map(COUNT - 1)
    share_road = float((expected == 0).mean())
    assert latest["shares"]["0"] == pytest.approx(share_road)
    one = client.get("/streams/cam-1/masks/7").json()
    assert one["seq"] == 7 and one["capture_ts"] == pytest.approx(START + 7 * PERIOD)
    missing = client.get("/streams/cam-1/masks/99999")
    assert missing.status_code == 404 and "99999" in missing.json()["detail"]
    assert client.get("/streams/cam-1/masks/-3").status_code == 422
    assert client.get("/streams/cam-1/masks/latest", params={"format": "gif"}).status_code == 422


def test_image_formats(client: httpx.Client) -> None:
    seq = COUNT - 2
    labels = client.get(f"/streams/cam-1/masks/{seq}", params={"format": "labels"})
    assert labels.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(labels.content)) as image:
        assert image.mode == "P"
        assert np.array_equal(np.asarray(image), class_map(seq))

    color = client.get(f"/streams/cam-1/masks/{seq}", params={"format": "color"})
    assert color.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(color.content)) as image:
        rgb = np.asarray(image.convert("RGB"))
    assert np.array_equal(rgb, TRAIN_IDS.colorize(class_map(seq)))

    overlay = client.get(f"/streams/cam-1/masks/{seq}", params={"format": "overlay"})
    assert overlay.headers["content-type"] == "image/jpeg"
    got = decode_image(overlay.content, "jpeg", WIDTH, HEIGHT)  # raises unless the size is right
    want = blend_overlay(frame_image(seq), TRAIN_IDS.colorize(class_map(seq)), 0.5)
    assert got.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 6  # two JPEG generations apart

    latest = client.get("/streams/cam-1/masks/latest", params={"format": "overlay"})
    assert latest.status_code == 200 and latest.content[:2] == b"\xff\xd8"


def test_overlay_of_a_frame_gone_from_the_window_is_410(client: httpx.Client) -> None:
    old = COUNT - RECENT_MAXLEN - 1
    response = client.get(f"/streams/cam-1/masks/{old}", params={"format": "overlay"})
    assert response.status_code == 410
    detail = response.json()["detail"]
    assert f"frame {old}" in detail and f"{COUNT - RECENT_MAXLEN}..{COUNT - 1}" in detail
    # The mask itself is still there in the other formats.
    assert client.get(f"/streams/cam-1/masks/{old}", params={"format": "color"}).status_code == 200


def test_stats_sample_class_shares_over_time(client: httpx.Client) -> None:
    stats = client.get("/streams/cam-1/stats", params={"points": 50}).json()
    assert stats["label_set"] == TRAIN_IDS.name
    assert {c["name"] for c in stats["classes"]} == {"road", "building", "sky", "car"}
    assert {c["id"]: c["color"] for c in stats["classes"]}[13] == [0, 0, 142]
    series = stats["series"]
    assert len(series) == 50 and series[0]["seq"] == 0 and series[-1]["seq"] == COUNT - 1
    assert [p["seq"] for p in series] == sorted(p["seq"] for p in series)
    for point in series:
        assert sum(point["shares"].values()) == pytest.approx(1.0)
    assert stats["mean"]["10"] == pytest.approx(0.25)  # the sky is the top quarter
    # Where the time goes: each stage's summary in order; the means add up to the mean latency.
    assert [stage["name"] for stage in stats["stages"]] == list(STAGE_NAMES)
    assert sum(stage["share"] for stage in stats["stages"]) == pytest.approx(1.0)
    inference = next(stage for stage in stats["stages"] if stage["name"] == "inference")
    assert inference["p50"] == pytest.approx(0.03, abs=1e-6) and inference["samples"] == 50
    assert all(set(point["stages"]) == set(STAGE_NAMES) for point in series)
    window = client.get(
        "/streams/cam-1/stats", params={"since": START + 100 * PERIOD, "until": START + 110 * PERIOD}
    ).json()
    assert [p["seq"] for p in window["series"]] == list(range(100, 110))
    assert client.get("/streams/cam-1/stats", params={"points": 501}).status_code == 422


def test_live_sse_sends_overlays_with_latency(client: httpx.Client) -> None:
    with client.stream("GET", "/streams/cam-1/live", params={"fps": 20}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event, data = None, None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "mask":
                data = json.loads(line[5:])
                break
    assert data is not None
    assert data["seq"] == COUNT - 1 and data["overlay"] is True
    assert data["latency"] == pytest.approx(0.069, abs=1e-3)
    jpeg = base64.b64decode(data["jpeg"])
    assert decode_image(jpeg, "jpeg", WIDTH, HEIGHT).shape == (HEIGHT, WIDTH, 3)


def test_live_mjpeg_parts(client: httpx.Client) -> None:
    with client.stream("GET", "/streams/cam-1/live", params={"format": "mjpeg"}) as response:
        boundary = response.headers["content-type"].split("boundary=")[1]
        buffer = b""
        for chunk in response.iter_bytes():
            buffer += chunk
            if buffer.count(b"\xff\xd9") >= 1:
                break
    head, _, body = buffer.partition(b"\r\n\r\n")
    assert head.startswith(f"--{boundary}".encode()) and b"Content-Type: image/jpeg" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert decode_image(body[:length], "jpeg", WIDTH, HEIGHT).shape == (HEIGHT, WIDTH, 3)


def test_devices_admin_round_trip(redis_url: str) -> None:
    admin = make_key(redis_url, "admin", "*")
    headers = {"Authorization": f"Bearer {admin}"}
    with (
        running_api(ApiSettings(redis_url=redis_url)) as base,
        httpx.Client(base_url=base, headers=headers) as c,
    ):
        made = c.post("/devices", json={"device_id": "jetson-7", "tenant": "acme"})
        assert made.status_code == 201 and made.json()["token"] and made.json()["active"]
        assert c.post("/devices", json={"device_id": "jetson-7"}).status_code == 409
        assert c.post("/devices", json={"device_id": "bad id!"}).status_code == 422
        assert c.post("/devices", json={"tenant": "acme"}).status_code == 422
        listed = c.get("/devices").json()["items"]
        assert [d["device_id"] for d in listed] == ["jetson-7"]
        assert "token" not in listed[0]
        rotated = c.post("/devices/jetson-7/rotate").json()
        assert rotated["token"] != made.json()["token"] and rotated["rotated"]
        gone = c.delete("/devices/jetson-7")
        assert gone.status_code == 200 and gone.json()["active"] is False
        assert c.delete("/devices/nobody").status_code == 404
        assert c.post("/devices/jetson-7/rotate").status_code == 409


def test_readyz_reports_workers(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    now = time.time()
    r.zadd(keys.WORKERS_INDEX, {"w-ready": now, "w-loading": now, "w-dead": now - 3600})
    r.hset(keys.worker("w-ready"), mapping={"state": "ready", "model": "demo"})
    r.hset(keys.worker("w-loading"), mapping={"state": "loading"})
    r.close()
    settings = ApiSettings(redis_url=redis_url, require_worker=True, admin_key="admin-key-for-tests")
    with running_api(settings) as base:
        body = httpx.get(f"{base}/readyz").json()
        # Public: a probe's answer and a count, no worker names, models or counters.
        assert body == {"status": "ready", "redis": True, "workers_ready": 1, "detail": None}
        assert httpx.get(f"{base}/workers").status_code == 401
        admin = {"Authorization": "Bearer admin-key-for-tests"}
        workers = httpx.get(f"{base}/workers", headers=admin).json()["items"]
        assert {w["name"] for w in workers} == {"w-ready", "w-loading"}
        assert {w["name"]: w.get("model") for w in workers}["w-ready"] == "demo"
    redis.Redis.from_url(redis_url).delete(keys.worker("w-ready"))
    with running_api(ApiSettings(redis_url=redis_url, require_worker=True)) as base:
        response = httpx.get(f"{base}/readyz")
        assert response.status_code == 503 and response.json()["detail"] == "no worker is ready"


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for row in text.splitlines():
        if row.startswith(name + "{") and all(f'{k}="{v}"' in row for k, v in labels.items()):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_by_route(client: httpx.Client) -> None:
    latest = {"method": "GET", "route": "/streams/{stream_id}/masks/latest"}
    before = client.get("/metrics").text
    for _ in range(3):
        client.get("/streams/cam-1/masks/latest")
    client.get("/streams/nope")
    after = client.get("/metrics").text
    count = "flowcloud_api_requests_total"
    assert _sample(after, count, status="200", **latest) - _sample(before, count, status="200", **latest) == 3
    one = {"method": "GET", "route": "/streams/{stream_id}", "status": "404"}
    assert _sample(after, count, **one) - _sample(before, count, **one) == 1
    seconds = "flowcloud_api_request_seconds_count"
    assert _sample(after, seconds, **latest) - _sample(before, seconds, **latest) == 3


def test_latest_follows_new_results_within_the_cache_window(redis_url: str) -> None:
    seed_stream(redis_url, "cam-1", "acme", count=5)
    token = make_key(redis_url, "reader", "acme")
    settings = ApiSettings(redis_url=redis_url, latest_cache_ms=100)
    with (
        running_api(settings) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c,
    ):
        assert c.get("/streams/cam-1/masks/latest").json()["seq"] == 4
        seed_stream(redis_url, "cam-1", "acme", count=9)  # a worker persists frames 5..8
        time.sleep(0.15)
        assert c.get("/streams/cam-1/masks/latest").json()["seq"] == 8
        assert c.get("/streams/cam-1/masks/latest", params={"format": "labels"}).status_code == 200


def _sse_mask_seqs(response: httpx.Response) -> Iterator[int]:
    """The seq of each 'mask' event of an SSE live view, as it arrives."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event == "mask":
            yield json.loads(line[5:])["seq"]


def _mjpeg_part_seqs(response: httpx.Response) -> Iterator[int]:
    """The X-Frame-Seq of each whole JPEG part of an MJPEG live view, as it arrives."""
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        while (head_end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:head_end]
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            end = head_end + 4 + length + 2
            if len(buffer) < end:
                break
            assert buffer[head_end + 4 : head_end + 6] == b"\xff\xd8"  # a JPEG
            yield int(head.split(b"X-Frame-Seq: ")[1].split(b"\r\n")[0])
            buffer = buffer[end:]


LIVE_SEQS = {"sse": _sse_mask_seqs, "mjpeg": _mjpeg_part_seqs}


def _wait_for_a_free_place(c: httpx.Client, params: dict[str, str | int]) -> None:
    """A new viewer is let in within a few seconds (a place was given back)."""
    deadline = time.monotonic() + 5
    while True:
        with c.stream("GET", "/streams/cam-1/live", params=params) as again:
            if again.status_code == 200 or time.monotonic() > deadline:
                break
        time.sleep(0.05)
    assert again.status_code == 200


@pytest.mark.parametrize("fmt", ["sse", "mjpeg"])
def test_live_viewers_are_bounded_and_the_first_keeps_streaming(redis_url: str, fmt: str) -> None:
    seed_stream(redis_url, "cam-1", "acme", count=3)
    token = make_key(redis_url, "reader", "acme")
    settings = ApiSettings(redis_url=redis_url, live_max_clients=1)
    params: dict[str, str | int] = {"format": fmt, "fps": 20}
    with (
        running_api(settings) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c,
    ):
        with c.stream("GET", "/streams/cam-1/live", params=params) as first:
            assert first.status_code == 200
            # One iterator for the whole response: httpx closes the connection when a discarded
            # (garbage-collected) iter_lines()/iter_bytes() generator is finalized mid-body.
            seqs = LIVE_SEQS[fmt](first)
            assert next(seqs) == 2  # open, counted, and sending the newest mask
            second = c.get("/streams/cam-1/live", params=params)
            assert second.status_code == 503 and "too many live viewers" in second.json()["detail"]
            seed_stream(redis_url, "cam-1", "acme", count=4)  # a worker persists frame 3
            assert next(seqs) == 3  # the first viewer is still served after the refusal
        _wait_for_a_free_place(c, params)  # the first viewer left: its place is free again


def _calls(client: redis.Redis, command: str) -> int:
    """How many ``command`` calls the server has answered."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})["calls"])


def _index_reads(client: redis.Redis) -> int:
    """ZRANGE calls: how the API finds a stream's newest result."""
    return _calls(client, "zrange")


def test_an_unchanged_newest_result_is_not_read_again(redis_url: str) -> None:
    """With no cache period, every /masks/latest asks for the newest seq, but the result itself
    (label map included) is read only when that seq changes."""
    seed_stream(redis_url, "cam-1", "acme", count=3)
    token = make_key(redis_url, "reader", "acme")
    client = redis.Redis.from_url(redis_url)
    # Keys and tenants stay cached throughout: the only HGETALLs left are the results'.
    settings = ApiSettings(
        redis_url=redis_url, latest_cache_ms=0, auth_cache_seconds=60, tenant_cache_seconds=60
    )
    with (
        running_api(settings) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c,
    ):
        assert c.get("/streams/cam-1/masks/latest").json()["seq"] == 2
        before = (_index_reads(client), _calls(client, "hgetall"))
        assert [c.get("/streams/cam-1/masks/latest").json()["seq"] for _ in range(5)] == [2] * 5
        assert (_index_reads(client) - before[0], _calls(client, "hgetall") - before[1]) == (5, 0)
        seed_stream(redis_url, "cam-1", "acme", count=4)  # a worker persists frame 3
        assert c.get("/streams/cam-1/masks/latest").json()["seq"] == 3
        assert _calls(client, "hgetall") - before[1] >= 1


def test_live_viewers_of_a_stream_share_the_latest_cache(redis_url: str) -> None:
    """Three viewers at 20 fps poll the newest result through one cache: a read per cache period
    in all (not 60 a second), and a new result still reaches every viewer."""
    seed_stream(redis_url, "cam-1", "acme", count=3)
    token = make_key(redis_url, "reader", "acme")
    settings = ApiSettings(redis_url=redis_url, latest_cache_ms=500, live_max_clients=3)
    client = redis.Redis.from_url(redis_url)
    with (
        running_api(settings) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c,
        contextlib.ExitStack() as viewers,
    ):
        responses = [
            viewers.enter_context(c.stream("GET", "/streams/cam-1/live", params={"fps": 20}))
            for _ in range(3)
        ]
        streams = [_sse_mask_seqs(response) for response in responses]
        assert [next(seqs) for seqs in streams] == [2, 2, 2]
        before = _index_reads(client)
        time.sleep(1.5)
        reads = _index_reads(client) - before
        assert 1 <= reads <= 5, f"{reads} index reads in 1.5 s by 3 viewers polling at 20 fps"
        seed_stream(redis_url, "cam-1", "acme", count=4)  # a worker persists frame 3
        assert [next(seqs) for seqs in streams] == [3, 3, 3]


def test_concurrent_viewers_never_exceed_the_bound(redis_url: str) -> None:
    """Viewers arriving at once: exactly live_max_clients get a stream, the rest a 503, and every
    place comes back when they leave (including viewers that leave before reading anything)."""
    seed_stream(redis_url, "cam-1", "acme", count=3)
    token = make_key(redis_url, "reader", "acme")
    settings = ApiSettings(redis_url=redis_url, live_max_clients=2)
    arrivals = 6
    start = threading.Barrier(arrivals)
    leave = threading.Event()
    statuses: list[int] = []
    done = threading.Semaphore(0)

    def viewer(base: str) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
            start.wait()
            with c.stream("GET", "/streams/cam-1/live") as response:
                statuses.append(response.status_code)
                seqs = _sse_mask_seqs(response)  # kept: a discarded one would close the connection
                if response.status_code == 200:
                    assert next(seqs) == 2  # served, and holding its place until told to leave
                done.release()
                leave.wait(10)

    with running_api(settings) as base:
        threads = [threading.Thread(target=viewer, args=(base,)) for _ in range(arrivals)]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert done.acquire(timeout=15)
        leave.set()
        for thread in threads:
            thread.join(timeout=15)
        assert sorted(statuses) == [200, 200] + [503] * (arrivals - 2)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
            for _ in range(3):  # more than the bound, one after another: no place leaked
                _wait_for_a_free_place(c, {"format": "sse"})
