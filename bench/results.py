"""Mask-native queries and alert evaluation on one hour of 30 fps results (108,000), on a real
redis-server, through the real MaskStore (write-time indexes), ShareSearch and Evaluator.

    python -m bench.results                  # one hour at 30 fps, 200 queries of each kind
    python -m bench.results --fps 10 --queries 50

Measured, each against a baseline from the same run:
  * write: MaskStore.put_many (result + share-ladder indexes + minute aggregate + results-stream
    event, one Lua script per result) against the plain pipeline it replaced (HSET, EXPIRE, ZADD);
  * queries: a page of the 50 newest results with person >= 5% (over the hour and over a random
    10-minute window), a page deep in the hour (after 10 pages), per-class aggregates of the hour by
    minute and by hour: p50 and p99 of ``--queries`` runs; against a brute-force scan of the hour
    (every result's metadata read and filtered, as a query without the indexes must);
  * alerts: the evaluator's cost per result with 1 and 10 rules, against the cost of writing it.
Times are in-process (no HTTP): what the indexes cost and save, not the API's own overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.alerts import RuleStore
from flowcloud.labels import TRAIN_IDS, class_shares
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import MaskResult, MaskStore, encode_label_map
from services.alerts.evaluator import Evaluator
from services.api.search import ShareSearch

STREAM = "bench-cam"
PLAIN = "bench-plain"
START = 1_700_000_000.0
BATCH = 16  # results per put_many, as a worker's batch
PERSON, CAR, ROAD = 11, 13, 0
H, W = 32, 64  # small label maps: queries never read them, and the write cost is the indexes'


def make_results(stream: str, count: int, fps: float, seed: int) -> list[MaskResult]:
    """A street whose person share wanders: absent most of the time, sometimes crowded."""
    rng = random.Random(seed)
    maps: dict[tuple[int, int], bytes] = {}
    out = []
    person = 0.0
    for seq in range(count):
        person = min(0.4, max(0.0, person + rng.gauss(0.0, 0.01))) if rng.random() > 0.002 else 0.0
        people = round(person * H * W)
        cars = rng.choice((0, 100, 300))
        key = (people, cars)
        if key not in maps:
            flat = np.full(H * W, ROAD, dtype=np.uint8)
            flat[:people] = PERSON
            flat[people : people + cars] = CAR
            maps[key] = encode_label_map(flat.reshape(H, W), TRAIN_IDS)
        flat = np.full(H * W, ROAD, dtype=np.uint8)
        flat[:people] = PERSON
        flat[people : people + cars] = CAR
        ts = START + seq / fps
        out.append(
            MaskResult(
                stream=stream, seq=seq, capture_ts=ts, recv_ts=ts, infer_start=ts, infer_end=ts,
                persisted_ts=ts + 0.05, model="bench", model_version="1", label_set=TRAIN_IDS.name,
                width=W, height=H, shares=class_shares(flat, TRAIN_IDS.num_classes), labels_png=maps[key],
            )
        )  # fmt: skip
    return out


async def plain_put(redis: Redis, results: list[MaskResult]) -> None:
    """The write path before the indexes: the result hash, its TTL, the per-stream index."""
    pipe = redis.pipeline(transaction=False)
    for r in results:
        key = keys.mask(r.stream, r.seq)
        pipe.hset(key, mapping=r.to_fields())  # type: ignore[arg-type]
        pipe.expire(key, 86_400)
        pipe.zadd(keys.mask_index(r.stream), {str(r.seq): r.seq})
    await pipe.execute()


async def timed_writes(
    write: Callable[[list[MaskResult]], Awaitable[object]], results: list[MaskResult]
) -> float:
    started = time.perf_counter()
    for i in range(0, len(results), BATCH):
        await write(results[i : i + BATCH])
    return (time.perf_counter() - started) / len(results)


async def percentiles(run: Callable[[], Awaitable[object]], times: int) -> dict[str, float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        await run()
        samples.append(time.perf_counter() - started)
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


async def brute_force(store: MaskStore, count: int, since: float, until: float) -> list[MaskResult]:
    """What a query costs without the indexes: read every result of the window and filter."""
    found = []
    for start in range(0, count, 2000):
        refs = [(STREAM, seq) for seq in range(start, min(count, start + 2000))]
        for r in await store.get_many(refs, labels=False):
            if r is not None and since <= r.capture_ts < until and r.shares.get(PERSON, 0.0) >= 0.05:
                found.append(r)
    return sorted(found, key=lambda r: r.capture_ts, reverse=True)[:50]


async def evaluation_cost(redis: Redis, rules: int, count: int) -> float:
    """Seconds per result of evaluating ``rules`` rules (all on the stream) over ``count`` results."""
    store = RuleStore(redis)
    for rule in await store.rules("bench"):
        await store.delete("bench", rule.id)
        await redis.delete(keys.alert_state(rule.id, STREAM))
    for i in range(rules):
        await store.add("bench", "person", "above", 0.05 + 0.02 * i, hold_frames=5, cooldown=60.0)
    await redis.xgroup_setid(keys.results_shard(0), keys.ALERTS_GROUP, "0")
    evaluator = Evaluator(redis, "bench", 256, 60_000, 60.0)
    started = time.perf_counter()
    while evaluator.evaluated < count and await evaluator.step(block_ms=10):
        pass
    return (time.perf_counter() - started) / evaluator.evaluated


async def main(args: argparse.Namespace) -> dict[str, object]:
    count = int(args.fps * args.seconds)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), appendonly=False) as server:
        redis = Redis.from_url(server.url)
        store = MaskStore(redis, max_per_stream=count + 1)
        await redis.hset(keys.stream_meta(STREAM), keys.M_TENANT, "bench")
        await Evaluator(redis, "bench", 256, 60_000, 60.0).start()  # the group sees every result
        print(f"making {count} results ...", flush=True)
        results = make_results(STREAM, count, args.fps, 1)
        plain = [MaskResult(**{**r.__dict__, "stream": PLAIN}) for r in results[: args.write_sample]]
        print("writing ...", flush=True)
        plain_cost = await timed_writes(lambda b: plain_put(redis, b), plain)
        index_cost = await timed_writes(store.put_many, results)
        await redis.delete(*(keys.mask(PLAIN, r.seq) for r in plain), keys.mask_index(PLAIN))
        memory = await redis.info("memory")
        end = START + count / args.fps
        search = ShareSearch(redis, store)
        rng = random.Random(2)
        matches = sum(1 for r in results if r.shares.get(PERSON, 0.0) >= 0.05)

        async def page_hour() -> tuple[list[MaskResult], str | None]:
            return await search.search([STREAM], "person", 0.05, 50, START, end)

        async def page_window() -> object:
            since = START + rng.uniform(0, max(0.0, end - START - 600))
            return await search.search([STREAM], "person", 0.05, 50, since, since + 600)

        async def page_deep() -> object:
            cursor = None
            for _ in range(11):
                _items, cursor = await search.search([STREAM], "person", 0.05, 50, START, end, cursor)
            return cursor

        print("querying ...", flush=True)
        queries = {
            "page of 50, person >= 5%, the hour": await percentiles(page_hour, args.queries),
            "page of 50, person >= 5%, random 10 min": await percentiles(page_window, args.queries),
            "11th page of 50 (cursor), the hour": await percentiles(page_deep, max(5, args.queries // 10)),
            "aggregates of the hour by minute": await percentiles(
                lambda: search.aggregates(STREAM, START, end, "minute", 3), args.queries
            ),
            "aggregates of the hour by hour": await percentiles(
                lambda: search.aggregates(STREAM, START, end, "hour", 3), args.queries
            ),
        }
        expected = await brute_force(store, count, START, end)
        got, _cursor = await page_hour()
        assert [r.seq for r in got] == [r.seq for r in expected], "the index disagrees with a scan"
        scan = await percentiles(lambda: brute_force(store, count, START, end), 3)
        print("evaluating alerts ...", flush=True)
        evaluate = {n: await evaluation_cost(redis, n, args.evaluate) for n in (1, 10)}
        await redis.aclose()  # type: ignore[attr-defined,unused-ignore]
    page = queries["page of 50, person >= 5%, the hour"]
    return {
        "results": count,
        "matches (person >= 5%)": matches,
        "load average at the end": os.getloadavg()[0],
        "write, plain pipeline (baseline), us/result": 1e6 * plain_cost,
        "write, with indexes, us/result": 1e6 * index_cost,
        "write cost ratio": index_cost / plain_cost,
        "redis used memory, MiB": int(memory["used_memory"]) / 2**20,
        "queries": queries,
        "brute-force scan of the hour (baseline)": scan,
        "scan p50 / indexed page p50": scan["p50_ms"] / page["p50_ms"],
        "alert evaluation, us/result, 1 rule": 1e6 * evaluate[1],
        "alert evaluation, us/result, 10 rules": 1e6 * evaluate[10],
        "evaluation (1 rule) / write": evaluate[1] / index_cost,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--queries", type=int, default=200, help="runs of each query")
    parser.add_argument("--write-sample", type=int, default=20_000, help="results written the plain way")
    parser.add_argument("--evaluate", type=int, default=20_000, help="results evaluated per rule count")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
