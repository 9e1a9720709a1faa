"""Connecting to Redis: one place that knows whether the data plane is one Redis or a Redis Cluster.

Every service, CLI and bench opens its data-plane client here, from its settings'
``redis_url`` and ``redis_cluster`` (``FLOWCLOUD_REDIS_CLUSTER``). With a cluster the URL names any
one node; the client discovers the others, routes each command by its key's slot and follows
MOVED/ASK redirections and failovers by itself. Code written against these clients keeps to the
rules of `flowcloud.keys`: one command, script or transaction touches one stream's keys (one hash
tag) at most.

One repair to redis-py's asyncio cluster client (8.1): a command whose keys it finds by asking a node
(COMMAND GETKEYS: XREADGROUP, XREAD) asks the node it first connected to, and when that node dies
the client neither retries elsewhere nor rediscovers the cluster, so a worker's reads failed for
good after a failover that its other commands rode out. `FailoverSafeCluster` marks the client for
rediscovery after any connection error, so the next command finds the new topology.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster


class FailoverSafeCluster(AsyncRedisCluster):
    """redis-py's asyncio cluster client, rediscovering the cluster after any connection error."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:  # (redis-py would do this only after finding the command's keys)
            await self.initialize()
        try:
            return await super().execute_command(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            self._initialize = True  # redis-py's own flag: rediscover before the next command
            raise


def connect_async(url: str, cluster: bool = False, **options: Any) -> aioredis.Redis:
    """An asyncio client for ``url`` (a cluster client when ``cluster``), typed as a plain Redis:
    the commands FlowCloud uses have the same signatures on both."""
    if cluster:
        return FailoverSafeCluster.from_url(url, **options)  # type: ignore[return-value]
    return aioredis.Redis.from_url(url, **options)


def connect(url: str, cluster: bool = False, **options: Any) -> redis.Redis:
    """A blocking client for ``url`` (a cluster client when ``cluster``); see `connect_async`."""
    if cluster:
        return RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **options)
