"""Capture-to-mask latency of the whole pipeline, by stage, over emulated links and under load.

    python -m bench.latency                    # about 5 minutes on the 2-core machine
    python -m bench.latency --duration 30 --json out.json

Everything is a real process: the local stack (redis-server, gateway, one worker, API), an edge
daemon streaming synthetic street scenes (384x192, libx264) and, between edge and gateway, a
`flowcloud link` process emulating a link (flowcloud.linkemu). One stack serves every run; each
run has its own device, so its results are its own.

1. **The model alone** (the baseline): the bundled demo model (small_unet) at the model input
   size on this CPU, batch 1 and the worker's batch size (the fastest of 7 passes), in this
   process before the stack starts.
2. **Capacity**: one stream on loopback offered more than one worker can segment (raised until
   the worker falls behind); capacity is the worker's rate of results while saturated.
3. **Links**: the seed's three links (local, cloud-vm, far-gpu) and loopback, each at half the
   capacity: capture-to-persisted p50/p95, the median of every stage (flowcloud.stages), and the
   freshness of the newest mask (how old the newest mask was, sampled every 50 ms).
4. **Load**: loopback at 0.5x, 1x, 2x and 4x the capacity: p50, p95, the share of frames sent
   that were segmented, the worker's batch time in that run, and the goals: at or below capacity
   p50 <= the run's median model batch time + 30 ms; at any load p95 <= max_frame_age.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import redis
import torch
from redis.asyncio import Redis as AsyncRedis

from flowcloud import keys
from flowcloud.inference import Segmenter, SegmenterOptions
from flowcloud.linkemu import PROFILES
from flowcloud.redis_server import free_port
from flowcloud.registry import DeviceRegistry
from flowcloud.results import META_FIELD, MaskResult
from flowcloud.settings import GatewaySettings, ServiceSettings, WorkerSettings
from flowcloud.sizes import parse_size
from flowcloud.stack import Service, Stack, StackConfig
from flowcloud.stages import STAGE_NAMES
from flowcloud.zoo import load_model

EDGE_SIZE = (384, 192)  # width, height: the model input's 2:1, cheap to render and encode
LINKS = ("loopback", "local", "cloud-vm", "far-gpu")
LOADS = (0.5, 1.0, 2.0, 4.0)
FRESHNESS_STEP = 0.05
SATURATED = 0.8  # results below this share of the offered rate: the worker is the bottleneck
MAX_FPS = 30.0  # the synthetic source renders about that many scenes per second on one core
GOAL_MARGIN = 0.030  # p50 at or below capacity: the model's batch time plus this


@dataclass
class Run:
    name: str
    link: str
    offered_fps: float
    sent: int
    segmented: int
    p50: float | None
    p95: float | None
    stages: dict[str, float | None]  # median seconds of each stage
    freshness_p50: float | None
    freshness_p95: float | None
    batch_seconds: float | None  # median model time of the run's batches (the inference stage)
    mean_batch: float | None
    rate: float | None  # results per second while results arrived

    @property
    def share(self) -> float:
        return self.segmented / self.sent if self.sent else 0.0


def model_time(size: str, batch: int, repeats: int = 7) -> dict[int, float]:
    """Seconds of the demo model on a batch of 1 and of ``batch`` frames on this CPU: the fastest
    of ``repeats`` passes, the model's own cost with the least interference from other work."""
    height, width = parse_size(size)
    segmenter = Segmenter(load_model(None, None, None, False), SegmenterOptions(device="cpu"))
    out = {}
    for count in sorted({1, batch}):
        x = torch.zeros((count, height, width, 3), dtype=torch.uint8)
        segmenter.predict_tensor(x)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            segmenter.predict_tensor(x)
            times.append(time.perf_counter() - started)
        out[count] = min(times)
    return out


async def _register(redis_url: str, device: str) -> str:
    client = AsyncRedis.from_url(redis_url)
    try:
        _, token = await DeviceRegistry(client).add(device, "bench")
        return token
    finally:
        await client.aclose()


def _results(client: redis.Redis, stream: str) -> list[MaskResult]:
    seqs = cast(list[bytes], client.zrange(keys.mask_index(stream), 0, -1))
    pipe = client.pipeline(transaction=False)
    for seq in seqs:
        pipe.hget(keys.mask(stream, int(seq)), META_FIELD)
    return [MaskResult.from_fields({META_FIELD.encode(): m}) for m in pipe.execute() if m]


def _drained(client: redis.Redis) -> bool:
    groups = cast(list[dict[str, Any]], client.xinfo_groups(keys.frame_shard(0)))  # one shard here
    group = next(g for g in groups if g["name"] in (keys.WORKER_GROUP, keys.WORKER_GROUP.encode()))
    return int(group["pending"]) == 0 and (group.get("lag") in (0, None))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def freshness(results: list[MaskResult], until: float) -> list[float]:
    """The newest mask's age, sampled every FRESHNESS_STEP from the first result to ``until``."""
    by_persist = sorted(results, key=lambda r: r.persisted_ts)
    if not by_persist:
        return []
    ages, newest, i = [], 0.0, 0
    t = by_persist[0].persisted_ts
    while t <= until:
        while i < len(by_persist) and by_persist[i].persisted_ts <= t:
            newest = max(newest, by_persist[i].capture_ts)
            i += 1
        ages.append(t - newest)
        t += FRESHNESS_STEP
    return ages


def summarise(name: str, link: str, fps: float, sent: int, results: list[MaskResult], until: float) -> Run:
    latencies = [r.latency for r in results]
    stages = {
        stage: statistics.median(known)
        if (known := [t for r in results if (t := r.stages()[stage]) is not None])
        else None
        for stage in STAGE_NAMES
    }
    batches = Counter((r.infer_start, r.infer_end) for r in results)
    ages = freshness(results, until)
    span = max(r.persisted_ts for r in results) - min(r.persisted_ts for r in results) if results else 0.0
    return Run(
        name=name,
        link=link,
        offered_fps=fps,
        sent=sent,
        segmented=len(results),
        p50=_quantile(latencies, 0.5),
        p95=_quantile(latencies, 0.95),
        stages=stages,
        freshness_p50=_quantile(ages, 0.5),
        freshness_p95=_quantile(ages, 0.95),
        batch_seconds=statistics.median(end - start for start, end in batches) if batches else None,
        mean_batch=len(results) / len(batches) if batches else None,
        rate=(len(results) - 1) / span if span > 0 else None,
    )


class Bench:
    def __init__(self, stack: Stack, duration: float, log_dir: Path) -> None:
        self.stack = stack
        self.duration = duration
        self.log_dir = log_dir
        self.client = redis.Redis.from_url(stack.redis_url)
        self.runs = 0

    def run(self, name: str, link: str, fps: float) -> Run:
        self.runs += 1
        device = f"bench-{self.runs}-{name}".replace(".", "_")
        # Where the stack's gateway looks for devices: FLOWCLOUD_CONTROL_REDIS_URL, else the stack's Redis.
        token = asyncio.run(_register(ServiceSettings(redis_url=self.stack.redis_url).control_url, device))
        address = self.stack.gateway_address
        proxy: Service | None = None
        if link != "loopback":
            port = free_port()
            proxy = Service(
                f"link-{device}",
                ["link", "--to", address, "--listen", f"127.0.0.1:{port}", "--profile", link],
                {},
                log_path=self.log_dir / f"link-{device}.log",
            )
            proxy.start()
            address = f"127.0.0.1:{port}"
            _wait_listening(port, proxy)
        edge = Service(
            f"edge-{device}",
            [
                "edge", "--gateway", address, "--device-id", device, "--source", "synthetic",
                "--width", str(EDGE_SIZE[0]), "--height", str(EDGE_SIZE[1]), "--fps", f"{fps:.3f}",
                "--duration", str(self.duration), "--metrics-port", "0", "--json",
            ],
            {"FLOWCLOUD_EDGE_TOKEN": token},
            log_path=self.log_dir / f"edge-{device}.log",
        )  # fmt: skip
        edge.start()
        assert edge.process is not None
        try:
            edge.process.wait(self.duration + 120)
        finally:
            edge.stop(10)
        until = time.time()  # redis-server runs here: its clock is this one
        deadline = time.monotonic() + 120
        while not _drained(self.client) and time.monotonic() < deadline:
            time.sleep(0.2)
        if proxy is not None:
            proxy.stop(10)
        assert edge.log_path is not None
        summary = json.loads(edge.log_path.read_text().strip().splitlines()[-1])
        run = summarise(name, link, fps, int(summary["sent"]), _results(self.client, device), until)
        print(f"  {name}: {_line(run)}", flush=True)
        return run

    def capacity(self, estimate: float) -> Run:
        """A loopback stream offered more than the worker segments: its rate of results. Offered
        three times the model-alone estimate (at least 8 fps), doubled until the worker falls behind."""
        fps = min(max(3 * estimate, 8.0), MAX_FPS)
        while True:
            run = self.run("capacity", "loopback", fps)
            if run.rate is None or run.rate < SATURATED * fps or fps >= MAX_FPS:
                return run
            fps = min(2 * fps, MAX_FPS)


def _wait_listening(port: int, service: Service) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited; see {service.log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{service.name} did not listen on {port}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _line(run: Run) -> str:
    return (
        f"{run.offered_fps:.1f} fps offered, {run.segmented}/{run.sent} segmented, p50 {_ms(run.p50)} ms, "
        f"p95 {_ms(run.p95)} ms, batch {_ms(run.batch_seconds)} ms x {run.mean_batch or 0:.1f}"
    )


def tables(
    model: dict[int, float],
    size: str,
    capacity: Run,
    links: list[Run],
    loads: list[tuple[float, Run]],
    max_age: float,
) -> str:
    out = [
        f"Demo model (small_unet) alone at {size}, fastest of 7: batch of 1 {_ms(model[1])} ms, "
        + ", ".join(f"batch of {b} {_ms(t)} ms ({_ms(t / b)} ms/frame)" for b, t in model.items() if b != 1),
        f"One worker's capacity (saturated, loopback): {capacity.rate or 0:.2f} frames/s "
        f"(offered {capacity.offered_fps:.1f} fps; batches of {capacity.mean_batch or 0:.1f} "
        f"in {_ms(capacity.batch_seconds)} ms)",
        "",
        "| link | fps | p50 ms | p95 ms | "
        + " | ".join(STAGE_NAMES)
        + " | fresh p50 | fresh p95 | segmented |",
        "|---|---|---|---|" + "---|" * len(STAGE_NAMES) + "---|---|---|",
    ]
    for r in links:
        stages = " | ".join(_ms(r.stages[s]) for s in STAGE_NAMES)
        out.append(
            f"| {r.link} | {r.offered_fps:.1f} | {_ms(r.p50)} | {_ms(r.p95)} | {stages} | "
            f"{_ms(r.freshness_p50)} | {_ms(r.freshness_p95)} | {r.share:.0%} |"
        )
    out += [
        "",
        "| load | fps | p50 ms | p95 ms | fresh p50 | fresh p95 | segmented | batch ms (frames) "
        "| p50 goal: <= batch + 30 ms | p95 goal: <= max_frame_age |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for factor, r in loads:
        p50_goal = "-"
        if factor <= 1.0 and r.p50 is not None and r.batch_seconds is not None:
            p50_goal = (
                "met"
                if r.p50 <= r.batch_seconds + GOAL_MARGIN
                else f"**not met** (+{_ms(r.p50 - r.batch_seconds)} ms)"
            )
        p95_goal = "met" if r.p95 is not None and r.p95 <= max_age else "**not met**"
        out.append(
            f"| {factor:g}x | {r.offered_fps:.1f} | {_ms(r.p50)} | {_ms(r.p95)} | "
            f"{_ms(r.freshness_p50)} | {_ms(r.freshness_p95)} | {r.share:.0%} | "
            f"{_ms(r.batch_seconds)} ({r.mean_batch or 0:.1f}) | {p50_goal} | {p95_goal} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each edge streams")
    parser.add_argument(
        "--links", nargs="*", default=list(LINKS), choices=list(PROFILES), help="link profiles"
    )
    parser.add_argument("--loads", nargs="*", type=float, default=list(LOADS), help="offered load factors")
    parser.add_argument("--json", type=Path, help="also write the runs as JSON here")
    args = parser.parse_args()
    size = GatewaySettings.model_fields["model_size"].default
    worker = WorkerSettings(redis_url="redis://unused")
    max_age = float(os.environ.get("FLOWCLOUD_WORKER_MAX_FRAME_AGE", worker.max_frame_age))
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    model = model_time(size, worker.batch_size)
    print(f"model alone: {model}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        data_dir = Path(tmp)
        with Stack(StackConfig.on_free_ports(data_dir, workers=1)) as stack:
            bench = Bench(stack, args.duration, data_dir)
            capacity = bench.capacity(worker.batch_size / model[worker.batch_size])
            if capacity.rate is None:
                print("no results in the capacity run; see the logs", file=sys.stderr)
                return 1
            links = [bench.run(link, link, capacity.rate / 2) for link in args.links]
            loads = [bench.run(f"load-{f:g}x", "loopback", f * capacity.rate) for f in args.loads]
            print(f"load average at end: {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print(tables(model, size, capacity, links, list(zip(args.loads, loads, strict=True)), max_age))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": model,
                    "capacity": asdict(capacity),
                    "links": [asdict(r) for r in links],
                    "loads": [asdict(r) for r in loads],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
