"""Frames per second that Redis carries for the whole frame and result path, on 1, 2 and 3 cluster
shards, and Redis CPU time per frame (``INFO cpu`` of every node).

    python -m bench.redis_capacity                    # 3000 frames per configuration
    python -m bench.redis_capacity --frames 6000 --json out.json

Each configuration is a fresh set of real redis-server processes on loopback: a plain redis-server
(not in cluster mode, the baseline of what cluster mode costs), then Redis Clusters of 1, 2 and 3
masters (`flowcloud.redis_cluster`, no replicas) with frame shard ``i`` pinned on master ``i``. The
streams (``--streams`` cameras) spread over the shards by `flowcloud.keys.shard_of`. One client
process (`flowcloud.redis_client.connect_async`) plays gateways and workers in rounds; per frame:

- publish (the gateway's `services.gateway.publisher.FramePublisher`): HINCRBY of the stream's seq
  counter, the frame log append script (the 640x480 JPEG frame, about 60 KB, once into Redis, and
  the stream's last-seen time), ZADD to the streams index, XADD of a reference to the shard's queue,
  and the queue's trim script;
- consume (what a worker does, with the product's functions): XREADGROUP of the shard's new
  references (group ``keys.WORKER_GROUP``), `flowcloud.frame_log.fetch` of the frames' bytes,
  `flowcloud.results.MaskStore.put_many` of one result each (a 256x512 palette label map and its
  class-share indexes, results-stream event, per-stream bound), XACK.

Every round moves ``--batch`` frames through every shard, so each shard sees the same load per
round whatever the shard count. Measured per configuration: frames per second through the whole
path, Redis CPU time per frame (``used_cpu_sys`` + ``used_cpu_user`` of every node, less what the
nodes use idle), the client's CPU per frame, and each process's share of a core, which says where
the bottleneck is. The goal: Redis CPU per frame at 3 shards within 10 % of 1 shard (ratio in the
last table), so that capacity grows with shards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from redis.asyncio import Redis
from tqdm import tqdm

from flowcloud import frame_log, keys
from flowcloud.frames import Frame, encode_image
from flowcloud.labels import TRAIN_IDS
from flowcloud.redis_client import connect_async
from flowcloud.redis_cluster import ClusterNode, EmbeddedRedisCluster, frame_shard_pins
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import MaskResult, MaskStore, encode_label_map
from services.gateway.publisher import FramePublisher

WIDTH, HEIGHT = 640, 480
LABEL_H, LABEL_W = 256, 512  # the model's output size (the default model input)
QUEUE_MAXLEN = 2000
RESULT_TTL = 3600
SHARES = {0: 0.4, 2: 0.15, 10: 0.33, 13: 0.12}  # road, building, sky, car: the label map's
IDLE_SECONDS = 1.0


@dataclass
class Measure:
    name: str
    shards: int
    frames: int
    seconds: float
    redis_cpu: float  # seconds, all nodes, net of idle
    redis_cpu_by_node: list[float]
    client_cpu: float
    command_usec: dict[str, float]  # Redis's own time per command (INFO commandstats), all nodes

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def redis_us_per_frame(self) -> float:
        return 1e6 * self.redis_cpu / self.frames

    @property
    def client_us_per_frame(self) -> float:
        return 1e6 * self.client_cpu / self.frames

    def busiest_node_share(self) -> float:
        return max(self.redis_cpu_by_node) / self.seconds

    def client_share(self) -> float:
        return self.client_cpu / self.seconds


def pictures(count: int = 8) -> list[bytes]:
    """640x480 JPEGs of smooth random scenes (the size a camera frame has on the queue)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (HEIGHT // 16, WIDTH // 16, 3), dtype=np.uint8)
        image = np.kron(small, np.ones((16, 16, 1), dtype=np.uint8))
        noise = rng.integers(0, 24, image.shape, dtype=np.uint8)
        out.append(encode_image(image + noise))
    return out


def label_png() -> bytes:
    """A street-like label map: road, building, sky bands and a few cars."""
    labels = np.zeros((LABEL_H, LABEL_W), dtype=np.uint8)
    labels[: LABEL_H // 3] = 10  # sky
    labels[LABEL_H // 3 : LABEL_H // 2] = 2  # building
    for x in range(20, LABEL_W, 90):
        labels[LABEL_H // 2 + 20 : LABEL_H // 2 + 60, x : x + 50] = 13  # car
    return encode_label_map(labels, TRAIN_IDS)


def streams_for(shards: int, per_shard: int) -> dict[int, list[str]]:
    """``per_shard`` stream ids on each shard (by `keys.shard_of`)."""
    out: dict[int, list[str]] = {shard: [] for shard in range(shards)}
    n = 0
    while any(len(v) < per_shard for v in out.values()):
        stream = f"cam-{n:04d}"
        shard = keys.shard_of(stream, shards)
        if len(out[shard]) < per_shard:
            out[shard].append(stream)
        n += 1
    return out


class FramePath:
    """The gateways' and workers' Redis work for frames and results, in rounds, through the
    product's code: `FramePublisher` (gateway), `frame_log.fetch` and `MaskStore.put_many` (worker)."""

    def __init__(self, redis: Redis, shards: int, streams_per_shard: int, batch: int) -> None:
        self.redis = redis
        self.shards = shards
        self.batch = batch
        self.streams = streams_for(shards, streams_per_shard)
        self.pictures = pictures()
        self.png = label_png()
        self.n = 0
        self.publisher = FramePublisher(
            redis,
            frames_maxlen=QUEUE_MAXLEN,
            queue_max=10 * shards * batch,
            stream_frames_maxlen=QUEUE_MAXLEN,
            shards=shards,
        )
        self.store = MaskStore(redis, ttl_seconds=RESULT_TTL, results_shards=shards)

    async def setup(self) -> None:
        for shard in range(self.shards):
            await self.redis.xgroup_create(keys.frame_shard(shard), keys.WORKER_GROUP, id="0", mkstream=True)
        self.publisher.start()

    async def close(self) -> None:
        await self.publisher.close()

    async def round(self) -> int:
        """``batch`` frames through every shard: publish, read, fetch, write results, acknowledge."""
        now = time.time()
        target = self.publisher.published + self.shards * self.batch
        for streams in self.streams.values():
            for i in range(self.batch):
                self.n += 1
                picture = self.pictures[self.n % len(self.pictures)]
                frame = Frame(streams[i % len(streams)], 0, now, now, WIDTH, HEIGHT, "jpeg", picture)
                self.publisher.submit(frame)
        while self.publisher.published < target:
            await asyncio.sleep(0.0005)
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.xreadgroup(keys.WORKER_GROUP, "bench", {keys.frame_shard(shard): ">"}, count=self.batch)
        reads = [(shard, reply[0][1]) for shard, reply in enumerate(await pipe.execute()) if reply]
        refs = [(shard, entry_id, fields) for shard, entries in reads for entry_id, fields in entries]
        locations = [frame_log.ref_location(fields) for _, _, fields in refs]
        found = await frame_log.fetch(self.redis, [loc for loc in locations if loc is not None])
        results = []
        for fields in found:
            if fields is None:
                continue
            frame = Frame.from_fields(fields)
            results.append(
                MaskResult(
                    stream=frame.stream, seq=frame.seq, capture_ts=frame.capture_ts, recv_ts=frame.recv_ts,
                    infer_start=now, infer_end=now, persisted_ts=time.time(), model="bench",
                    model_version="1", label_set=TRAIN_IDS.name, width=LABEL_W, height=LABEL_H,
                    shares=SHARES, labels_png=self.png,
                )
            )  # fmt: skip
        await self.store.put_many(results)
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.shards):
            ids = [entry_id for s, entry_id, _ in refs if s == shard]
            if ids:
                pipe.xack(keys.frame_shard(shard), keys.WORKER_GROUP, *ids)
        await pipe.execute()
        return len(results)


@contextmanager
def redis_nodes(kind: str, shards: int, data_dir: Path) -> Iterator[tuple[str, bool, list[ClusterNode]]]:
    """(url, cluster, nodes) of a fresh plain redis-server or Redis Cluster."""
    if kind == "plain":
        server = EmbeddedRedis(data_dir, appendonly=False)
        with server:
            yield server.url, False, [ClusterNode("plain", server, 0)]
        return
    cluster = EmbeddedRedisCluster(
        data_dir, masters=shards, replicas=0, pins=frame_shard_pins(shards, shards)
    )
    with cluster:
        yield cluster.url, True, cluster.nodes


def cpu_of(nodes: list[ClusterNode]) -> list[float]:
    return [node.cpu_seconds() for node in nodes]


def command_usec(nodes: list[ClusterNode]) -> dict[str, float]:
    """Microseconds Redis spent in each command so far (INFO commandstats), summed over the nodes.
    (A script's time includes the commands it calls, which are also counted on their own.)"""
    out: dict[str, float] = {}
    for node in nodes:
        for name, stats in node.info("commandstats").items():
            command = name.removeprefix("cmdstat_")
            out[command] = out.get(command, 0.0) + float(stats["usec"])  # type: ignore[index]
    return out


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


async def measure(
    kind: str, shards: int, frames: int, args: argparse.Namespace, data_dir: Path, bar: tqdm
) -> Measure:
    name = "plain redis-server" if kind == "plain" else f"cluster, {shards} shard{'s' * (shards > 1)}"
    with redis_nodes(kind, shards, data_dir) as (url, cluster, nodes):
        redis = connect_async(url, cluster=cluster)
        try:
            path = FramePath(redis, shards, args.streams_per_shard, args.batch)
            await path.setup()
            for _ in range(max(1, args.warmup // (shards * args.batch))):
                await path.round()
            idle_before = cpu_of(nodes)
            await asyncio.sleep(IDLE_SECONDS)
            idle = [b - a for a, b in zip(idle_before, cpu_of(nodes), strict=True)]
            commands_before = command_usec(nodes)
            before, client_before, started = cpu_of(nodes), process_cpu(), time.perf_counter()
            done = 0
            while done < frames:
                moved = await path.round()
                done += moved
                bar.update(moved)
            seconds = time.perf_counter() - started
            client = process_cpu() - client_before
            used = [
                max(0.0, b - a - i * seconds / IDLE_SECONDS)
                for a, b, i in zip(before, cpu_of(nodes), idle, strict=True)
            ]
            commands = {c: t - commands_before.get(c, 0.0) for c, t in command_usec(nodes).items()}
            await path.close()
        finally:
            await redis.aclose()
    return Measure(name, shards, done, seconds, sum(used), used, client, commands)


def table(measures: list[Measure]) -> str:
    rows = [
        "| configuration | frames/s | Redis CPU µs/frame (all nodes) | busiest node, share of a core "
        "| client CPU µs/frame | client, share of a core |",
        "|---|---|---|---|---|---|",
    ]
    for m in measures:
        rows.append(
            f"| {m.name} | {m.fps:.0f} | {m.redis_us_per_frame:.1f} | {m.busiest_node_share():.2f} "
            f"| {m.client_us_per_frame:.0f} | {m.client_share():.2f} |"
        )
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> list[Measure]:
    configs = [("plain", 1)] + [("cluster", s) for s in range(1, args.max_shards + 1)]
    total = args.frames * len(configs)
    measures = []
    with tempfile.TemporaryDirectory(prefix="redis-capacity-") as tmp, tqdm(total=total, unit="frame") as bar:
        for kind, shards in configs:
            bar.set_description(f"{kind} {shards}")
            measures.append(
                await measure(kind, shards, args.frames, args, Path(tmp) / f"{kind}-{shards}", bar)
            )
    return measures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=3000, help="frames measured per configuration")
    parser.add_argument("--warmup", type=int, default=300, help="frames before measuring")
    parser.add_argument("--batch", type=int, default=16, help="frames per shard and round")
    parser.add_argument("--streams-per-shard", type=int, default=4)
    parser.add_argument("--max-shards", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the measures here")
    args = parser.parse_args()
    measures = asyncio.run(run(args))
    load = os.getloadavg()[0]
    print(f"\n{WIDTH}x{HEIGHT} JPEG frames, batch {args.batch} per shard, load average {load:.1f}\n")
    print(table(measures))
    baseline = next(m for m in measures if m.name.startswith("cluster, 1"))
    plain = measures[0]
    print()
    print("| ratio | value |")
    print("|---|---|")
    overhead = baseline.redis_us_per_frame / plain.redis_us_per_frame
    print(f"| cluster mode vs plain redis-server, Redis CPU per frame | {overhead:.2f} |")
    for m in measures[2:]:
        ratio = m.redis_us_per_frame / baseline.redis_us_per_frame
        print(f"| {m.shards} shards vs 1, Redis CPU per frame (goal ≤ 1.10) | {ratio:.2f} |")
    print("\nRedis's time by command, µs per frame (a script's time includes the commands it calls):\n")
    print("| command | " + " | ".join(m.name for m in measures) + " |")
    print("|---|" + "---|" * len(measures))
    top = sorted(baseline.command_usec, key=lambda c: -baseline.command_usec[c])[:8]
    for command in top:
        cells = " | ".join(f"{m.command_usec.get(command, 0.0) / m.frames:.1f}" for m in measures)
        print(f"| {command} | {cells} |")
    per_core = 1e6 / baseline.redis_us_per_frame
    cameras = per_core / 30
    print(f"\nOne Redis core carries {per_core:.0f} frames/s of this path ({cameras:.0f} cameras at 30 fps).")
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in measures], indent=2))


if __name__ == "__main__":
    main()
