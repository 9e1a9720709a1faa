"""Helpers for the Redis Cluster tests: a cluster laid out as the tests expect, emptied between tests,
and the CPU time a process has used (to tell a client that waits from one that spins)."""

from __future__ import annotations

import os
from pathlib import Path

import redis

from flowcloud import keys
from flowcloud.redis_cluster import EmbeddedRedisCluster, frame_shard_pins

MASTERS = 3
REPLICAS = 1
# Failure detection takes one node timeout, then an election: a few seconds in all. Not less: a
# busy 2-core machine must not make a live master look dead.
NODE_TIMEOUT_MS = 2000


def three_master_cluster(data_dir: Path, node_timeout_ms: int = NODE_TIMEOUT_MS) -> EmbeddedRedisCluster:
    """3 masters with a replica each, frame shard i (of any count) pinned on master i mod 3."""
    return EmbeddedRedisCluster(
        data_dir,
        masters=MASTERS,
        replicas=REPLICAS,
        node_timeout_ms=node_timeout_ms,
        pins=frame_shard_pins(keys.MAX_SHARDS, MASTERS),
    )


def flush(cluster: EmbeddedRedisCluster) -> None:
    """Empty every master (replicas follow)."""
    for node in cluster.current_masters():
        with node.client() as client:
            client.flushall()


def cpu_seconds(pid: int | None = None) -> float:
    """User and system CPU time of a process so far (this one by default), from /proc."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain(url: str) -> redis.Redis:
    """A plain (non-cluster) client of one node."""
    return redis.Redis.from_url(url)
