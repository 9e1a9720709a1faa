"""Frames per second that Redis carries for the whole frame and result path, on 1, 2 and 3 cluster
shards, and Redis CPU time per frame (``INFO cpu`` of every node).

    python -m bench.redis_capacity                    # 3000 frames per configuration
    python -m bench.redis_capacity --frames 6000 --json out.json

Each configuration is a fresh set of real redis-server processes on loopback: a plain redis-server
(not in cluster mode, the baseline of what cluster mode costs), then Redis Clusters of 1, 2 and 3
masters (`flowcloud.redis_cluster`, no replicas) with frame shard ``i`` pinned on master ``i``. The
streams (``--streams`` cameras) spread over the shards by `flowcloud.keys.shard_of`. One client
process (`flowcloud.redis_client.connect_async`) plays gateways and workers in rounds; per frame:

- publish: HINCRBY of the stream's seq counter (per stream and round), XADD of a 640x480 JPEG
  frame (`flowcloud.frames.Frame.to_fields`, about 60 KB) to its shard's queue with an
  approximate MAXLEN, HSET of the stream's last-seen time;
- consume: XREADGROUP of the shard's new frames (group ``keys.WORKER_GROUP``), XACK;
- result write: one pipeline per round of, per frame, HSETNX of the result's metadata, HSET of its
  label map (a 256x512 palette PNG), EXPIRE, and ZADD to the stream's mask index: the commands of
  `flowcloud.results.MaskStore`'s index script on the stream's own keys (the script's results
  stream and tenant keys are global keys, another slot, and are left out).

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

from flowcloud import keys
from flowcloud.frames import Frame, encode_image
from flowcloud.labels import TRAIN_IDS
from flowcloud.redis_client import connect_async
from flowcloud.redis_cluster import ClusterNode, EmbeddedRedisCluster, frame_shard_pins
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import LABELS_FIELD, META_FIELD, encode_label_map

WIDTH, HEIGHT = 640, 480
LABEL_H, LABEL_W = 256, 512  # the model's output size (the default model input)
QUEUE_MAXLEN = 2000
RESULT_TTL = 3600
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
    """Gateways' and workers' Redis commands for frames and results, in rounds."""

    def __init__(self, redis: Redis, shards: int, streams_per_shard: int, batch: int) -> None:
        self.redis = redis
        self.shards = shards
        self.batch = batch
        self.streams = streams_for(shards, streams_per_shard)
        self.pictures = pictures()
        self.png = label_png()
        self.seq = 0

    async def setup(self) -> None:
        for shard in range(self.shards):
            await self.redis.xgroup_create(keys.frame_shard(shard), keys.WORKER_GROUP, id="0", mkstream=True)

    async def round(self) -> int:
        """``batch`` frames through every shard: publish, consume, ack, write results."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for shard, streams in self.streams.items():
            per_stream = -(-self.batch // len(streams))
            for stream in streams:
                pipe.hincrby(keys.stream_meta(stream), keys.M_LAST_SEQ, per_stream)
            for i in range(self.batch):
                stream = streams[i % len(streams)]
                self.seq += 1
                frame = Frame(stream, self.seq, now, now, WIDTH, HEIGHT, "jpeg", self.pictures[self.seq % 8])
                pipe.xadd(
                    keys.frame_shard(shard),
                    frame.to_fields(),  # type: ignore[arg-type]
                    maxlen=QUEUE_MAXLEN,
                    approximate=True,
                )
            for stream in streams:
                pipe.hset(keys.stream_meta(stream), keys.M_LAST_SEEN, repr(now))
        await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.xreadgroup(keys.WORKER_GROUP, "bench", {keys.frame_shard(shard): ">"}, count=self.batch)
        replies = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        done = 0
        for shard, reply in enumerate(replies):
            entries = reply[0][1] if reply else []
            if not entries:
                continue
            pipe.xack(keys.frame_shard(shard), keys.WORKER_GROUP, *[entry_id for entry_id, _ in entries])
            for _, fields in entries:
                frame = Frame.from_fields(fields)
                meta = json.dumps({"stream": frame.stream, "seq": frame.seq, "capture_ts": frame.capture_ts})
                result = keys.mask(frame.stream, frame.seq)
                pipe.hsetnx(result, META_FIELD, meta)
                pipe.hset(result, LABELS_FIELD, self.png)
                pipe.expire(result, RESULT_TTL)
                pipe.zadd(keys.mask_index(frame.stream), {str(frame.seq): frame.seq})
                done += 1
        await pipe.execute()
        return done


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
        finally:
            await redis.aclose()
    return Measure(name, shards, done, seconds, sum(used), used, client)


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
    per_core = 1e6 / baseline.redis_us_per_frame
    cameras = per_core / 30
    print(f"\nOne Redis core carries {per_core:.0f} frames/s of this path ({cameras:.0f} cameras at 30 fps).")
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in measures], indent=2))


if __name__ == "__main__":
    main()
