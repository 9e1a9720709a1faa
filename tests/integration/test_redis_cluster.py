"""FlowCloud's Redis clients and key layout against a real Redis Cluster (3 masters, a replica each).

The cluster clients of `flowcloud.redis_client` route the data-plane commands by slot; every key of
one stream shares one slot, so a script or transaction over them runs (and one over two streams is
refused by the server); frame shards pinned by `frame_shard_pins` live on master ``i mod 3``.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from pathlib import Path
from typing import cast

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError
from support.redis_cluster import MASTERS, plain

from flowcloud import keys, redis_cluster
from flowcloud.redis_client import connect, connect_async
from flowcloud.redis_cluster import (
    SLOTS,
    EmbeddedRedisCluster,
    contiguous_ranges,
    even_slot_ranges,
    frame_shard_pins,
    slots_of_masters,
)
from flowcloud.redis_server import free_ports


def per_stream_keys(stream_id: str) -> dict[str, str]:
    """Every key `flowcloud.keys` makes for one stream: each function with a ``stream_id`` parameter
    that returns a name (not `keys.shard_of`), called with sample values for the others."""
    samples: dict[type | str, object] = {"str": "sample", "int": 7}
    out = {}
    for name, function in inspect.getmembers(keys, inspect.isfunction):
        parameters = inspect.signature(function).parameters
        if "stream_id" not in parameters or function is keys.shard_of:
            continue
        args = {
            p: stream_id if p == "stream_id" else samples[str(v.annotation)] for p, v in parameters.items()
        }
        out[name] = function(**args)
    return out


def test_every_key_of_a_stream_hashes_to_one_slot() -> None:
    found = per_stream_keys("cam-01")
    # (the list grows with keys.py; these must be among them)
    assert {
        "stream_meta",
        "stream_frames",
        "backfill_frames",
        "mask_index",
        "mask",
        "attempts",
        "alert_state",
    } <= set(found)
    slots = {name: key_slot(key.encode()) for name, key in found.items()}
    assert set(slots.values()) == {key_slot(b"{cam-01}")}, slots
    assert key_slot(keys.stream_meta("cam-02").encode()) != key_slot(keys.stream_meta("cam-01").encode())


def test_slot_layout() -> None:
    assert even_slot_ranges(3) == [(0, 5460), (5461, 10921), (10922, 16383)]
    assert contiguous_ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]
    pins = frame_shard_pins(keys.MAX_SHARDS, MASTERS)
    assigned = slots_of_masters(MASTERS, pins)
    assert sorted(s for slots in assigned for s in slots) == list(range(SLOTS))  # each slot once
    for shard in range(keys.MAX_SHARDS):
        assert key_slot(keys.frame_shard(shard).encode()) in assigned[shard % MASTERS]
        assert key_slot(keys.backfill_shard(shard).encode()) in assigned[shard % MASTERS]
    with pytest.raises(ValueError, match="cannot pin slot 16384"):
        slots_of_masters(3, {SLOTS: 0})


def test_free_ports_are_distinct() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(0 < port < 65536 for port in ports)


def test_a_node_whose_port_was_taken_meanwhile_starts_on_fresh_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may bind a port between `free_ports` and redis-server: the node then starts
    on fresh ports, whichever of its two ports (client, cluster bus) was taken."""
    for taken_index in (0, 1):
        with socket.socket() as taker:
            taker.bind(("127.0.0.1", 0))
            taker.listen()
            taken = taker.getsockname()[1]
            calls: list[int] = []

            def ports_with_one_taken(
                count: int, calls: list[int] = calls, taken: int = taken, index: int = taken_index
            ) -> list[int]:
                calls.append(count)
                ports = free_ports(count)
                if len(calls) == 1:  # the launcher's first allocation: one port is another's by now
                    ports[index] = taken
                return ports

            monkeypatch.setattr(redis_cluster, "free_ports", ports_with_one_taken)
            cluster = EmbeddedRedisCluster(tmp_path / f"taken-{taken_index}", masters=1, replicas=0)
            with cluster:
                (node,) = cluster.nodes
                assert taken not in (node.port, node.bus_port) and len(calls) == 2
                assert cluster.settled() and node.cluster_info()["cluster_state"] == "ok"


def test_cluster_is_up_with_replicas(redis_cluster: EmbeddedRedisCluster) -> None:
    assert redis_cluster.settled()
    ports = [port for node in redis_cluster.nodes for port in (node.port, node.bus_port)]
    assert len(set(ports)) == len(ports), ports  # no node is given another's client or bus port
    masters = redis_cluster.current_masters()
    assert len(masters) == MASTERS and len(redis_cluster.live_nodes()) == 2 * MASTERS
    for node in masters:
        assert node.info("replication")["connected_slaves"] == 1
    assert all(node.cluster_info()["cluster_known_nodes"] == "6" for node in redis_cluster.nodes)


def test_frame_shards_pinned_across_masters(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str
) -> None:
    shards = 6
    client = connect(redis_cluster_url, cluster=True)
    try:
        for shard in range(shards):
            client.xadd(keys.frame_shard(shard), {keys.F_STREAM: f"s{shard}", keys.F_SEQ: 1})
    finally:
        client.close()
    holders = []
    for shard in range(shards):
        owner = redis_cluster.master_of(keys.frame_shard(shard))
        assert owner is redis_cluster.nodes[shard % MASTERS]  # the masters are the first nodes
        with plain(owner.url) as direct:  # the entry is on that node itself
            assert direct.xlen(keys.frame_shard(shard)) == 1
        holders.append(owner.port)
    assert len(set(holders[:MASTERS])) == MASTERS  # three shards, three masters


def test_blocking_client_routes_the_frame_path(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str
) -> None:
    # Connected through a replica: the client discovers the masters and routes by slot.
    replica = redis_cluster.nodes[MASTERS]
    client = connect(replica.url, cluster=True)
    try:
        primaries = cast(RedisCluster, client).get_primaries()
        assert {node.port for node in primaries} == {n.port for n in redis_cluster.nodes[:MASTERS]}
        for shard in range(MASTERS):
            queue = keys.frame_shard(shard)
            client.xgroup_create(queue, keys.WORKER_GROUP, id="0", mkstream=True)
            client.xadd(queue, {keys.F_STREAM: f"cam-{shard}", keys.F_SEQ: 1, keys.F_DATA: b"\xff\xd8"})
            reply = client.xreadgroup(keys.WORKER_GROUP, "w1", {queue: ">"}, count=10)
            [(_, [(entry_id, fields)])] = cast(
                list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply
            )
            assert fields[keys.F_DATA.encode()] == b"\xff\xd8"
            assert client.xack(queue, keys.WORKER_GROUP, entry_id) == 1
            client.hset(keys.mask(f"cam-{shard}", 1), mapping={"seq": 1})
            client.zadd(keys.mask_index(f"cam-{shard}"), {"1": 1})
        assert client.zcard(keys.mask_index("cam-2")) == 1
    finally:
        client.close()


def test_async_client_runs_one_streams_keys_atomically(
    redis_cluster: EmbeddedRedisCluster, redis_cluster_url: str
) -> None:
    stream = "cam-07"
    meta, index, result = keys.stream_meta(stream), keys.mask_index(stream), keys.mask(stream, 3)

    async def main() -> None:
        client = connect_async(redis_cluster_url, cluster=True)
        try:
            async with client.pipeline(transaction=True) as tx:  # MULTI over one stream's keys
                tx.hincrby(meta, keys.M_LAST_SEQ, 3)
                tx.hset(result, mapping={"seq": 3})
                tx.zadd(index, {"3": 3})
                assert await tx.execute() == [3, 1, 1]
            script = client.register_script(
                "return redis.call('ZCARD', KEYS[1]) + #redis.call('HKEYS', KEYS[2])"
            )
            assert await script(keys=[index, result]) == 2
        finally:
            await client.aclose()

    asyncio.run(main())
    # A script over two streams' keys: the server itself refuses it (the client would not send it).
    with plain(redis_cluster.master_of(meta).url) as node, pytest.raises(ResponseError, match="same slot"):
        node.eval("return 1", 2, meta, keys.stream_meta("cam-08"))
