"""Shared fixtures: a real redis-server and a real Redis Cluster for the session, a clean database
for each test, a worker's weights file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from flowcloud.redis_cluster import EmbeddedRedisCluster
from flowcloud.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server on a free loopback port with its own data directory."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False)
    with server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    """The URL of an empty database (flushed before each test)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A weights file of a calibrated random model (``support.worker``) for `flowcloud worker --weights`."""
    from support.worker import make_weights  # torch: imported only by the tests that ask for weights

    return make_weights(tmp_path / "weights.pt")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    """A real Redis Cluster (support.redis_cluster.three_master_cluster): 3 masters, a replica each, frame
    shard i on master i mod 3. Tests that kill nodes start a cluster of their own."""
    from support.redis_cluster import three_master_cluster

    with three_master_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: EmbeddedRedisCluster) -> Iterator[str]:
    """The URL of one node of the emptied cluster (a cluster client discovers the rest)."""
    from support.redis_cluster import flush

    flush(redis_cluster)
    yield redis_cluster.url
