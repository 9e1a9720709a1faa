"""Results, alerts and the query API on a real 3-master Redis Cluster (support.redis_cluster), with
the control plane (API keys, alert rules) on a plain redis-server beside it: results of streams
spread over every master, written through the real MaskStore (tenant budget and per-stream bound
on), evaluated by the real Evaluator over sharded results, and queried through a real uvicorn."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
from redis.asyncio import Redis
from support.api import describe_stream, make_key, running_api, share_result

from flowcloud import alerts, keys
from flowcloud.groups import ensure_group
from flowcloud.redis_client import connect_async
from flowcloud.redis_cluster import EmbeddedRedisCluster
from flowcloud.results import (
    DROP_TRIMMED_UNREAD,
    EVENTS_DROPPED,
    EVICTED,
    EVICTED_BYTES,
    PRODUCER_EDGE,
    MaskResult,
    MaskStore,
)
from flowcloud.settings import ApiSettings
from flowcloud.share_index import index_call
from services.alerts import metrics as alerts_metrics
from services.alerts.evaluator import Evaluator, ResultEvent

START = 1_700_000_000.0
PERIOD = 0.1
SHARDS = 4  # results shards (the frame_shards of gateways and workers)


def spread_streams(cluster: EmbeddedRedisCluster, tenant: str) -> list[str]:
    """One stream per results shard, whose own keys cover every master between them."""
    by_shard: dict[int, str] = {}
    for i in range(1000):
        name = f"{tenant}-cam-{i}"
        shard = keys.shard_of(name, SHARDS)
        port = cluster.master_of(keys.mask_index(name)).port
        taken = {cluster.master_of(keys.mask_index(s)).port for s in by_shard.values()}
        if shard not in by_shard and (port not in taken or len(taken) == len(cluster.current_masters())):
            by_shard[shard] = name
        if len(by_shard) == SHARDS:
            break
    streams = [by_shard[shard] for shard in range(SHARDS)]
    assert len({cluster.master_of(keys.mask_index(s)).port for s in streams}) == 3
    return streams


def alternating(stream: str, count: int) -> list[MaskResult]:
    """People (10 %) on even seqs only: a rule 'person above 5 %' fires on each even seq."""
    return [
        share_result(stream, seq, START + seq * PERIOD, 0.1 if seq % 2 == 0 else 0.0) for seq in range(count)
    ]


def cluster_client(url: str) -> Redis:
    return connect_async(url, cluster=True)


def test_mask_store_writes_and_reads_streams_on_every_master(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str
) -> None:
    streams = spread_streams(redis_cluster, "acme")

    async def run() -> None:
        redis = cluster_client(redis_cluster_url)
        try:
            for stream in streams:
                await describe_stream(redis, stream, "acme", START)
            store = MaskStore(redis, max_per_stream=15, tenant_max_bytes=10**9, results_shards=SHARDS)
            results = [r for stream in streams for r in alternating(stream, 20)]
            assert await store.put_many(results) == len(results)  # one call over every master
            again = [r for r in results if r.seq >= 10]  # at-least-once delivery: nothing new
            assert await store.put_many(again) == 0
            for stream in streams:  # trimmed to its bound, oldest first
                assert await store.seqs(stream, limit=100) == list(range(19, 4, -1))
                got = await store.get_many([(stream, seq) for seq in range(20)])
                assert [r.seq for r in got if r is not None] == list(range(5, 20))
                assert all(r is not None and r.labels_png for r in got[5:])
                # One event per result, on its stream's results shard, never twice.
                shard = keys.results_shard(keys.shard_of(stream, SHARDS))
                events = [ResultEvent.parse(f) for _, f in cast(Any, await redis.xrange(shard))]
                assert [e.seq for e in events if e.stream == stream] == list(range(20))
            # The tenant's account holds exactly what is left: the evicted results were freed once.
            left = await store.get_many([(s, seq) for s in streams for seq in range(5, 20)])
            sizes = [len(r.to_fields()["meta"]) + len(r.labels_png) for r in left if r is not None]
            assert await store.tenant_usage("acme") == sum(sizes)
            assert await redis.zcard(keys.tenant_memory("acme")) == len(sizes)
            # Now a budget for half of it: the oldest go, across every stream and master.
            store.tenant_max_bytes = sum(sizes) // 2
            assert await store.enforce_budget("acme") > 0
            assert 0 < await store.tenant_usage("acme") <= store.tenant_max_bytes
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_a_result_whose_follow_ups_were_cut_short_gets_them_when_written_again(
    redis_cluster_url: str,
) -> None:
    """A worker that dies between the index script and the follow-ups (event, tenant account)
    leaves the result marked; the redelivered frame finishes the job, once."""

    async def run() -> None:
        redis = cluster_client(redis_cluster_url)
        try:
            await describe_stream(redis, "cam-cut", "acme", START)
            store = MaskStore(redis, tenant_max_bytes=10**9, results_shards=SHARDS)
            result = alternating("cam-cut", 1)[0]
            script_keys, args = index_call(
                result.stream, result.seq, result.capture_ts, result.label_set, result.shares,
                result.to_fields(), store.ttl_seconds,
            )  # fmt: skip
            assert await store._index(keys=script_keys, args=args) == 1  # the crash: nothing after it
            shard = keys.results_shard(keys.shard_of("cam-cut", SHARDS))
            assert await redis.smembers(keys.unfinished_results("cam-cut")) == {b"0"}
            assert await redis.xlen(shard) == 0 and await store.tenant_usage("acme") == 0
            assert await store.put_many([result]) == 0  # not new, but finished now
            assert await store.put_many([result]) == 0  # and only once
            assert await redis.xlen(shard) == 1
            assert await store.tenant_usage("acme") == len(result.to_fields()["meta"]) + len(
                result.labels_png
            )
            assert not await redis.exists(keys.unfinished_results("cam-cut"))
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_edge_masks_over_the_count_bound_are_deleted_and_counted(redis_cluster_url: str) -> None:
    """Without a memory budget too, edge masks trimmed by the per-stream bound are counted."""

    async def run() -> None:
        redis = cluster_client(redis_cluster_url)
        try:
            store = MaskStore(redis, max_per_stream=3)
            masks = [
                dataclasses.replace(share_result("cam-edge", 0, START + i, 0.1), producer=PRODUCER_EDGE)
                for i in range(5)
            ]
            sizes = [len(m.to_fields()["meta"]) + len(m.labels_png) for m in masks]
            count_before = EVICTED.labels("count")._value.get()
            bytes_before = EVICTED_BYTES.labels("count")._value.get()
            for mask in masks:
                await store.put_edge(mask)
            kept = [
                int(m) for m in cast(list[bytes], await redis.zrange(keys.edge_mask_index("cam-edge"), 0, -1))
            ]
            assert kept == [round((START + i) * 1_000_000) for i in (2, 3, 4)]
            for gone in (0, 1):
                assert not await redis.exists(keys.edge_mask("cam-edge", round((START + gone) * 1_000_000)))
            assert EVICTED.labels("count")._value.get() - count_before == 2
            assert EVICTED_BYTES.labels("count")._value.get() - bytes_before == sizes[0] + sizes[1]
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_evaluator_reads_every_results_shard_fairly_and_fires_once(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str, redis_url: str
) -> None:
    streams = spread_streams(redis_cluster, "acme")
    counts = {stream: (40 if i == 0 else 4) for i, stream in enumerate(streams)}  # one busy shard

    async def run() -> None:
        redis = cluster_client(redis_cluster_url)
        control = Redis.from_url(redis_url)
        try:
            rule = await alerts.RuleStore(control).add("acme", "person", "above", 0.05, cooldown=0.0)
            evaluator = Evaluator(redis, "eval-1", 4, 60_000, 60.0, control=control, shards=SHARDS)
            await evaluator.start()
            store = MaskStore(redis, results_shards=SHARDS)
            for stream, count in counts.items():
                await describe_stream(redis, stream, "acme", START)
                await store.put_many(alternating(stream, count))
            assert await evaluator.lag() == sum(counts.values())
            # One step reads up to batch_size from every shard: the busy one does not starve the rest.
            first = await evaluator.step(100)
            assert first == 4 + 3 * 4
            steps = 1
            while await evaluator.step(100):
                steps += 1
            assert steps == 10  # the busy shard's 40 results, 4 a step
            assert await evaluator.lag() == 0
            # A result evaluated between a crash and its firing's queueing: queued when redelivered.
            late = alternating(streams[1], 6)[-2]  # seq 4 fires
            event = ResultEvent(late.stream, late.seq, late.capture_ts, {"person": 0.1})
            script_keys, args = evaluator._call(rule, event)
            assert await evaluator._script(keys=script_keys, args=args) == 1  # the crash: nothing after it
            await store.put_many([late])
            assert await evaluator.step(100) == 1
            fired = await alerts.firings(redis, "acme", limit=1000)
            expected = sorted(
                alerts.firing_id(rule.id, s, seq)
                for s, n in {**counts, streams[1]: 6}.items()
                for seq in range(0, n, 2)
            )
            assert sorted(f["id"] for f in fired) == expected  # each firing once, none lost
            assert all(alerts.F_UNQUEUED not in f for f in fired)
            queued = cast(list[Any], await redis.xrange(keys.FIRINGS_STREAM))
            assert sorted(f[keys.FI_ID.encode()].decode() for _, f in queued) == expected
        finally:
            await redis.aclose()
            await control.aclose()

    asyncio.run(run())


def test_firings_trimmed_unread_are_counted_and_marked_dead_on_every_slot(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str
) -> None:
    """The firings queue's trim rides the queueing round trip (one key: one slot); the firings it
    removes unread are marked dead where they live, on every master."""
    streams = spread_streams(redis_cluster, "acme")
    rule = alerts.AlertRule("r1", "acme", "person", "above", 0.05)

    async def run() -> None:
        redis = cluster_client(redis_cluster_url)
        try:
            await ensure_group(redis, keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP, "0")
            evaluator = Evaluator(redis, "eval-1", 4, 60_000, 60.0, shards=SHARDS, firings_maxlen=10)
            queued = [
                (ResultEvent(s, seq, START + seq, {"person": 0.5}), rule) for seq in range(4) for s in streams
            ]
            ids = [alerts.firing_id(rule.id, e.stream, e.seq) for e, _ in queued]
            for (event, _), fid in zip(queued, ids, strict=True):
                await redis.hset(keys.alert_firing(event.stream, fid), alerts.F_STATUS, alerts.STATUS_PENDING)
            before = cast(float, alerts_metrics.FIRINGS_DROPPED.labels("trimmed_unread")._value.get())
            await evaluator._queue(queued)
            lost = len(queued) - 10
            assert alerts_metrics.FIRINGS_DROPPED.labels("trimmed_unread")._value.get() - before == lost
            statuses = [
                await redis.hget(keys.alert_firing(e.stream, fid), alerts.F_STATUS)
                for (e, _), fid in zip(queued, ids, strict=True)
            ]
            assert statuses == [alerts.STATUS_DEAD.encode()] * lost + [alerts.STATUS_PENDING.encode()] * 10
            assert {e.stream for e, _ in queued[:lost]} == set(streams)  # over every slot
            (group,) = cast(list[dict[str, Any]], await redis.xinfo_groups(keys.FIRINGS_STREAM))
            assert int(group["lag"]) == 10
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_results_shards_bound_counts_what_the_evaluators_never_read(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str, redis_url: str
) -> None:
    """Every shard trimmed in the writes' round trip (one script per shard, on its master), each
    unread event trimmed counted, the alerts group's lag true on every shard."""
    streams = spread_streams(redis_cluster, "acme")

    async def run() -> None:
        redis = cluster_client(redis_cluster_url)
        control = Redis.from_url(redis_url)
        try:
            evaluator = Evaluator(redis, "eval-1", 4, 60_000, 60.0, control=control, shards=SHARDS)
            await evaluator.start()
            store = MaskStore(redis, results_shards=SHARDS, events_maxlen=10)
            before = EVENTS_DROPPED.labels(DROP_TRIMMED_UNREAD)._value.get()
            await store.put_many([r for stream in streams for r in alternating(stream, 25)])
            assert EVENTS_DROPPED.labels(DROP_TRIMMED_UNREAD)._value.get() - before == SHARDS * 15
            for shard in range(SHARDS):
                (group,) = cast(list[dict[str, Any]], await redis.xinfo_groups(keys.results_shard(shard)))
                assert int(group["lag"]) == 10 and await redis.xlen(keys.results_shard(shard)) == 10
            assert await evaluator.lag() == SHARDS * 10
            seen = 0
            while got := await evaluator.step(100):
                seen += got
            assert seen == SHARDS * 10 and await evaluator.lag() == 0
        finally:
            await redis.aclose()
            await control.aclose()

    asyncio.run(run())


@pytest.fixture
def cluster_api(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str, redis_url: str
) -> Iterator[tuple[str, str, list[str], list[MaskResult]]]:
    streams = spread_streams(redis_cluster, "acme")
    results = [
        share_result(stream, seq, START + seq * PERIOD + i * 0.01, (0.02, 0.07, 0.3)[seq % 3])
        for i, stream in enumerate(streams)
        for seq in range(30)
    ]

    async def write() -> None:
        redis = cluster_client(redis_cluster_url)
        try:
            await MaskStore(redis, results_shards=SHARDS).put_many(results)
            for stream in streams:
                await describe_stream(redis, stream, "acme", START + 30 * PERIOD)
        finally:
            await redis.aclose()

    asyncio.run(write())
    token = make_key(redis_url, "reader", "acme")  # API keys: the control plane, a plain Redis
    settings = ApiSettings(
        redis_url=redis_cluster_url, redis_cluster=True, control_redis_url=redis_url, frame_shards=SHARDS
    )
    with running_api(settings) as base:
        yield base, token, streams, results


def test_api_answers_over_a_cluster(cluster_api: tuple[str, str, list[str], list[MaskResult]]) -> None:
    base, token, streams, results = cluster_api
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=20) as c:
        listed = c.get("/streams").json()["items"]
        assert {s["stream_id"] for s in listed} == set(streams)
        assert all(s["results"] == 30 for s in listed)
        for stream in streams:
            page = c.get(f"/streams/{stream}/masks", params={"limit": 10})
            assert page.status_code == 200, page.text
            assert [m["seq"] for m in page.json()["items"]] == list(range(29, 19, -1))
            assert c.get(f"/streams/{stream}/masks/latest").status_code == 200
            stats = c.get(f"/streams/{stream}/stats")
            assert stats.status_code == 200, stats.text
            aggregates = c.get(
                f"/streams/{stream}/aggregates",
                params={"since": START, "until": START + 60, "threshold": 0.05},
            )
            assert aggregates.status_code == 200, aggregates.text
            (bucket,) = aggregates.json()["buckets"]
            assert bucket["results"] == 30 and bucket["classes"]["person"]["results_above"] == 20
        found: list[tuple[str, int]] = []
        cursor = None
        while True:  # every page of a search over streams on every master
            params: dict[str, Any] = {"class": "person", "min_share": 0.05, "limit": 7}
            reply = c.get("/search", params={**params, **({"cursor": cursor} if cursor else {})})
            assert reply.status_code == 200, reply.text
            found += [(m["stream"], m["seq"]) for m in reply.json()["items"]]
            if (cursor := reply.json()["next_cursor"]) is None:
                break
    matches = sorted(
        (r for r in results if r.shares.get(11, 0.0) >= 0.05), key=lambda r: (r.capture_ts, r.stream, r.seq)
    )
    assert found == [(r.stream, r.seq) for r in reversed(matches)]
