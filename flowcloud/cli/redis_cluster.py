"""`flowcloud redis-cluster`: a Redis Cluster of local redis-server processes, for trying the
services in cluster mode on one machine.

    flowcloud redis-cluster --data-dir /tmp/fc-cluster --masters 3 --replicas 1 --pin-frame-shards 6
    export FLOWCLOUD_REDIS_URL=redis://127.0.0.1:PORT/0 FLOWCLOUD_REDIS_CLUSTER=1 FLOWCLOUD_FRAME_SHARDS=6
    flowcloud gateway ...   # and workers, API: every service in cluster mode

Runs until Ctrl-C, then stops every node (see `flowcloud.redis_cluster`). A production cluster is
the operator's (managed Redis, or redis-cli --cluster create); this one is for a laptop or a test.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from pathlib import Path

from flowcloud.cli.errors import CommandError
from flowcloud.keys import MAX_SHARDS
from flowcloud.redis_cluster import EmbeddedRedisCluster, frame_shard_pins


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, required=True, help="one directory per node is made here")
    parser.add_argument("--masters", type=int, default=3, help="masters, each serving an even share of slots")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per master")
    parser.add_argument(
        "--node-timeout-ms", type=int, default=5000, help="cluster-node-timeout: how soon a failover starts"
    )
    parser.add_argument(
        "--pin-frame-shards",
        type=int,
        default=0,
        metavar="N",
        help=f"put frame shard i (of N, up to {MAX_SHARDS}) on master i mod MASTERS (0: slots as hashed)",
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.pin_frame_shards <= MAX_SHARDS:
        raise CommandError(f"--pin-frame-shards takes 0 to {MAX_SHARDS}, not {args.pin_frame_shards}")
    try:
        cluster = EmbeddedRedisCluster(
            args.data_dir,
            masters=args.masters,
            replicas=args.replicas,
            node_timeout_ms=args.node_timeout_ms,
            pins=frame_shard_pins(args.pin_frame_shards, args.masters) if args.pin_frame_shards else {},
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise CommandError(f"the cluster did not start: {exc}") from None
    try:
        for node in cluster.nodes:
            role = "master" if node in cluster.nodes[: args.masters] else "replica"
            print(f"{node.name:<24} {role:<8} {node.url}  data {node.server.data_dir}", flush=True)
        print(f"\nFLOWCLOUD_REDIS_URL={cluster.url} FLOWCLOUD_REDIS_CLUSTER=1", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        cluster.stop()
    return 0
