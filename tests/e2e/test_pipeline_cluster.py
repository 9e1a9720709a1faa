"""The whole platform on a Redis Cluster, in real processes: two edges -> two gateways -> a 3-master
Redis Cluster (a replica each) -> two workers -> API.

The single-Redis test (test_pipeline.py) run scaled out: the services find the cluster through
``FLOWCLOUD_REDIS_CLUSTER`` and spread the frames over three shards (``FLOWCLOUD_FRAME_SHARDS``),
pinned on the three masters. Each edge streams the synthetic street scenes to its own gateway; the
two workers share every shard; every stream's masks come back through the API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from support.waiting import wait_for

from flowcloud import keys, tokens
from flowcloud.redis_client import connect
from flowcloud.redis_cluster import EmbeddedRedisCluster
from flowcloud.redis_server import free_port
from flowcloud.registry import DeviceRegistry
from flowcloud.stack import Service, Stack, StackConfig
from flowcloud.zoo import DEMO_WEIGHTS

FRAMES = 16
WIDTH, HEIGHT = 320, 240
SHARDS = 3
TENANT = "city"
# Two cameras whose streams hash to different shards (so to different masters).
DEVICES = ("cam-north", "cam-south")


@pytest.fixture
def stack(
    tmp_path: Path, redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str, redis_url: str
) -> Iterator[Stack]:
    """The stack's services on the cluster (data plane) and a plain Redis (control plane: devices,
    API keys, alert rules)."""
    assert DEMO_WEIGHTS.is_file(), "the bundled demo model is missing"
    cluster_env = {
        "FLOWCLOUD_REDIS_CLUSTER": "1",
        "FLOWCLOUD_FRAME_SHARDS": str(SHARDS),
        "FLOWCLOUD_CONTROL_REDIS_URL": redis_url,
    }
    config = StackConfig.on_free_ports(
        tmp_path / "stack",
        redis_url=redis_cluster_url,
        workers=2,
        admin_key=tokens.new_token(),
        env={**cluster_env, "FLOWCLOUD_WORKER_MODE": "complete", "FLOWCLOUD_WORKER_BATCH_SIZE": "4"},
    )
    with Stack(config) as running:
        yield running


def second_gateway(stack: Stack) -> Service:
    """Another gateway replica on the same cluster (the stack runs one)."""
    port, metrics_port = free_port(), free_port()
    gateway = Service(
        "gateway-2",
        ["gateway"],
        {
            "FLOWCLOUD_REDIS_URL": stack.redis_url,
            **stack.config.env,
            "FLOWCLOUD_GATEWAY_HOST": "127.0.0.1",
            "FLOWCLOUD_GATEWAY_PORT": str(port),
            "FLOWCLOUD_GATEWAY_METRICS_PORT": str(metrics_port),
        },
        ready_url=f"http://127.0.0.1:{metrics_port}/readyz",
        ready_port=metrics_port,
        log_path=stack.config.data_dir / "gateway-2.log",
    )
    gateway.start()
    stack.services.insert(1, gateway)  # stopped with the stack, in data-flow order
    wait_for("the second gateway to be ready", gateway.ready, 120, gateway.process)
    return gateway


async def register(control_url: str) -> dict[str, str]:
    client = Redis.from_url(control_url)
    try:
        registry = DeviceRegistry(client)
        return {device: (await registry.add(device, TENANT))[1] for device in DEVICES}
    finally:
        await client.aclose()


def test_two_gateways_two_workers_on_a_cluster(stack: Stack, redis_cluster: EmbeddedRedisCluster) -> None:
    assert len({keys.shard_of(device, SHARDS) for device in DEVICES}) == 2
    gateway_2 = second_gateway(stack)
    device_tokens = asyncio.run(register(stack.config.env["FLOWCLOUD_CONTROL_REDIS_URL"]))
    gateway_2_address = f"127.0.0.1:{gateway_2.env['FLOWCLOUD_GATEWAY_PORT']}"
    gateways = {DEVICES[0]: stack.gateway_address, DEVICES[1]: gateway_2_address}
    edges = []
    for device in DEVICES:
        edge = Service(
            f"edge-{device}",
            [
                "edge", "--gateway", gateways[device], "--device-id", device, "--source", "synthetic",
                "--width", str(WIDTH), "--height", str(HEIGHT), "--fps", "10", "--frames", str(FRAMES),
                "--metrics-port", "0",
            ],
            {"FLOWCLOUD_EDGE_TOKEN": device_tokens[device]},
            log_path=stack.config.data_dir / f"edge-{device}.log",
        )  # fmt: skip
        edge.start()
        edges.append(edge)
    for edge in edges:
        assert edge.process is not None and edge.log_path is not None
        assert edge.process.wait(timeout=180) == 0, edge.log_path.read_text()[-2000:]

    auth = {"Authorization": f"Bearer {stack.config.admin_key}"}
    with httpx.Client(base_url=stack.api_url, headers=auth, timeout=10) as api:
        for device in DEVICES:

            def all_segmented(device: str = device) -> bool:
                reply = api.get(f"/streams/{device}/masks", params={"limit": 100})
                return reply.status_code == 200 and len(reply.json()["items"]) == FRAMES

            wait_for(f"{FRAMES} masks of {device}", all_segmented, 180, step=0.5)
            items = api.get(f"/streams/{device}/masks", params={"limit": 100}).json()["items"]
            seqs = [item["seq"] for item in items]
            assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == FRAMES
            png = api.get(f"/streams/{device}/masks/{seqs[0]}", params={"format": "labels"})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            stream = api.get(f"/streams/{device}").json()
            assert (stream["width"], stream["height"]) == (WIDTH, HEIGHT)
        listed = api.get("/streams").json()["items"]
        assert set(DEVICES) <= {stream["stream_id"] for stream in listed}

    # The two streams' frames went through two different masters, and both workers took part.
    client = connect(stack.redis_url, cluster=True)
    try:
        owners = {redis_cluster.master_of(keys.frame_shard(keys.shard_of(d, SHARDS))).port for d in DEVICES}
        assert len(owners) == 2
        workers = client.zrange(keys.WORKERS_INDEX, 0, -1)
        assert {b"local-0", b"local-1"} <= set(workers)
    finally:
        client.close()
