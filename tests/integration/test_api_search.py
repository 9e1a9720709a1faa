"""Mask-native queries (/search, /streams/{id}/masks?class=, /streams/{id}/aggregates) against a
real redis-server with results written through the real MaskStore, over a real uvicorn: answers
equal a brute-force filter of the same data, tenants stay apart, and a query's Redis reads grow
with its matches, not with the results stored."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from support.api import describe_stream, make_key, running_api, share_result

from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import MaskResult, MaskStore
from flowcloud.settings import ApiSettings
from services.api.search import ShareSearch

START = 1_700_000_000.0
PERIOD = 0.1
SHARES = (0.0, 0.0, 0.004, 0.01, 0.03, 0.05, 0.07, 0.2, 0.6)  # person shares drawn per result
STREAMS = {"cam-a": "acme", "cam-b": "acme", "cam-c": "globex"}
COUNT = 400  # results per stream


@dataclass
class Data:
    results: list[MaskResult]
    base: str
    tokens: dict[str, str]


def _person(result: MaskResult) -> float:
    return result.shares.get(11, 0.0)  # trainId 11 is person


def _write(url: str, results: list[MaskResult], tenants: dict[str, str]) -> None:
    async def run() -> None:
        redis = Redis.from_url(url)
        try:
            store = MaskStore(redis)
            for i in range(0, len(results), 50):  # batches, as workers write
                await store.put_many(results[i : i + 50])
            for stream, tenant in tenants.items():
                await describe_stream(redis, stream, tenant, START + COUNT * PERIOD)
        finally:
            await redis.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(run())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Data]:
    rng = random.Random(15)
    results = []
    for offset, stream in enumerate(STREAMS):
        for seq in range(COUNT):
            # Streams interleave in time, with some equal capture times across streams.
            ts = START + seq * PERIOD + (0.0 if seq % 7 == 0 else offset * 0.01)
            results.append(share_result(stream, seq, ts, rng.choice(SHARES), car=rng.choice((0.0, 0.1))))
    with EmbeddedRedis(tmp_path_factory.mktemp("search-redis"), appendonly=False) as server:
        _write(server.url, results, STREAMS)
        tokens = {
            "acme": make_key(server.url, "reader", "acme"),
            "globex": make_key(server.url, "reader", "globex"),
            "admin": make_key(server.url, "admin", "ops"),
        }
        with running_api(ApiSettings(redis_url=server.url)) as base:
            yield Data(results, base, tokens)


def _pages(data: Data, who: str, path: str, params: dict[str, Any]) -> list[tuple[str, int]]:
    """Every page of a query, as (stream, seq) newest first."""
    out: list[tuple[str, int]] = []
    cursor = None
    with httpx.Client(base_url=data.base, headers={"Authorization": f"Bearer {data.tokens[who]}"}) as client:
        while True:
            reply = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})}, timeout=20)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert len(body["items"]) <= params.get("limit", 50)
            out += [(item["stream"], item["seq"]) for item in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                return out


def _brute(data: Data, streams: set[str], min_share: float, since: float | None, until: float | None) -> list:
    matches = [
        r
        for r in data.results
        if r.stream in streams
        and _person(r) > 0
        and _person(r) >= min_share
        and (since is None or r.capture_ts >= since)
        and (until is None or r.capture_ts < until)
    ]
    matches.sort(key=lambda r: (r.capture_ts, r.stream, r.seq), reverse=True)
    return [(r.stream, r.seq) for r in matches]


@pytest.mark.parametrize("min_share", [0.05, 0.03, 0.0, 0.5])
def test_search_equals_brute_force_and_keeps_tenants_apart(data: Data, min_share: float) -> None:
    since, until = START + 5.0, START + 33.3
    params = {"class": "person", "min_share": min_share, "since": since, "until": until, "limit": 17}
    acme = _pages(data, "acme", "/search", params)
    assert acme == _brute(data, {"cam-a", "cam-b"}, min_share, since, until)
    assert acme  # the data has matches in every case
    assert _pages(data, "globex", "/search", params) == _brute(data, {"cam-c"}, min_share, since, until)
    everything = _pages(data, "admin", "/search", {**params, "limit": 100})
    assert everything == _brute(data, set(STREAMS), min_share, since, until)


def test_stream_masks_by_class_equal_brute_force(data: Data) -> None:
    params: dict[str, Any] = {"class": "person", "min_share": 0.05, "limit": 9}
    got = _pages(data, "acme", "/streams/cam-b/masks", params)
    assert got == _brute(data, {"cam-b"}, 0.05, None, None)
    with httpx.Client(base_url=data.base, headers={"Authorization": f"Bearer {data.tokens['globex']}"}) as c:
        assert c.get("/streams/cam-b/masks", params=params).status_code == 404  # another tenant's
        assert c.get("/search", params={"class": "nobody"}).status_code == 422
        assert c.get("/search", params={"class": "person", "cursor": "x"}).status_code == 422


def test_streams_lists_only_the_tenants_index(data: Data) -> None:
    with httpx.Client(base_url=data.base, headers={"Authorization": f"Bearer {data.tokens['acme']}"}) as c:
        assert {s["stream_id"] for s in c.get("/streams").json()["items"]} == {"cam-a", "cam-b"}


def test_aggregates_equal_brute_force(data: Data) -> None:
    since, until = START, START + 120.0  # 400 results at 10 fps: 40 s, in the first minutes
    with httpx.Client(base_url=data.base, headers={"Authorization": f"Bearer {data.tokens['acme']}"}) as c:
        reply = c.get(
            "/streams/cam-a/aggregates",
            params={"since": since, "until": until, "resolution": "minute", "threshold": 0.05},
        )
        assert reply.status_code == 200, reply.text
        buckets = reply.json()["buckets"]
        hourly = c.get(
            "/streams/cam-a/aggregates", params={"since": since, "until": until, "resolution": "hour"}
        ).json()["buckets"]
        assert c.get("/streams/cam-a/aggregates", params={"threshold": 0.06}).status_code == 422
    mine = [r for r in data.results if r.stream == "cam-a"]
    assert sum(b["results"] for b in buckets) == len(mine) == sum(b["results"] for b in hourly)
    for bucket in buckets:
        inside = [r for r in mine if bucket["start"] <= r.capture_ts < bucket["start"] + 60]
        people = [_person(r) for r in inside]
        person = bucket["classes"]["person"]
        assert bucket["results"] == len(inside)
        assert person["mean"] == pytest.approx(sum(people) / len(inside))
        assert person["max"] == pytest.approx(max(people))
        above = sum(1 for s in people if s >= 0.05)
        assert person["results_above"] == above
        times = sorted(r.capture_ts for r in inside)
        interval = (times[-1] - times[0]) / (len(times) - 1)
        assert person["seconds_above"] == pytest.approx(above * interval)
    assert hourly[0]["classes"]["person"]["max"] == pytest.approx(max(_person(r) for r in mine))


def _read_calls(info: dict[str, Any]) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): int(stats["calls"])
        for name, stats in info.items()
        if name not in ("cmdstat_info", "cmdstat_config|resetstat")
    }


def test_query_cost_grows_with_matches_not_with_results_stored(redis_url: str) -> None:
    """The same query before and after adding 10x more non-matching results (class absent, or
    present below the threshold): the Redis commands it runs are the same, by name and count."""

    async def measure(redis: Redis) -> tuple[list[tuple[str, int]], dict[str, int]]:
        search = ShareSearch(redis, MaskStore(redis))
        await redis.config_resetstat()
        found: list[tuple[str, int]] = []
        cursor = None
        while True:
            items, cursor = await search.search(["cam-x"], "person", 0.05, 20, cursor=cursor)
            found += [(r.stream, r.seq) for r in items]
            if cursor is None:
                break
        return found, _read_calls(await redis.info("commandstats"))

    async def run() -> None:
        redis = Redis.from_url(redis_url)
        store = MaskStore(redis)
        try:
            matching = [share_result("cam-x", s, START + s, 0.1 + 0.001 * s) for s in range(0, 1000, 10)]
            await store.put_many(matching)
            before, cost_before = await measure(redis)
            others = [
                share_result("cam-x", seq, START + seq, 0.0 if seq % 2 else 0.04, car=0.2)
                for seq in range(1000)
                if seq % 10
            ]
            others += [share_result("cam-x", 1000 + seq, START + 1000 + seq, 0.02) for seq in range(100)]
            for i in range(0, len(others), 100):
                await store.put_many(others[i : i + 100])
            after, cost_after = await measure(redis)
            assert len(others) >= 10 * len(matching)
            assert before == after == [("cam-x", r.seq) for r in reversed(matching)]
            assert cost_after == cost_before
            pages = len(matching) // 20
            # One read per match, plus the one a page reads to know there is a next page.
            assert len(matching) <= cost_before["hget"] <= len(matching) + pages
            assert cost_before["zrevrangebyscore"] <= pages + 1
        finally:
            await redis.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(run())
