"""An embedded Redis Cluster: real redis-server processes in cluster mode on loopback.

The tests, the Redis capacity bench and `flowcloud redis-cluster` use it. ``masters`` masters with
``replicas`` replicas each; every node is a `flowcloud.redis_server.EmbeddedRedis` on free ports
(its client port and its cluster-bus port, ``cluster-port``) with a data directory of its own, so
it dies with the process that started it (flowcloud.children). The 16384 hash slots are split into
even contiguous ranges (CLUSTER ADDSLOTSRANGE), the nodes meet (CLUSTER MEET), replicas follow their
masters (CLUSTER REPLICATE), and `start` returns once every node reports ``cluster_state:ok``,
every node's slot map (CLUSTER SLOTS) is the same, and every replica's link to its master is up.

``pins`` (slot -> master index) moves given slots to given masters: `frame_shard_pins` puts the
slot of frame shard ``i`` (`flowcloud.keys.frame_shard`) on master ``i mod masters``, so that a
few shards spread over the masters as many would by hashing. In production the operator moves
slots the same way with ``redis-cli --cluster reshard`` (docs/ARCHITECTURE.md).

`kill` ends a node with SIGKILL (a crash: nothing saved, no goodbye); `wait_failover` returns the
replica that took over its slots once the surviving nodes agree on it; `restart` brings the node
back on its old port and data directory, where it rejoins as a replica of whoever serves its slots.
A small ``node_timeout_ms`` (``cluster-node-timeout``) makes failover quick in tests; replicas
fail over whatever their replication lag (``cluster-replica-validity-factor 0``), as a test that
kills a master under load wants.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
from redis.crc import key_slot

from flowcloud import keys
from flowcloud.redis_server import EmbeddedRedis, free_ports

log = logging.getLogger(__name__)

SLOTS = 16384
HOST = "127.0.0.1"
PORT_TRIES = 3  # starts of a new node, each on fresh ports, when its ports were taken meanwhile
# One node's view of the slot map: (first slot, last slot, port of the master serving them), sorted.
SlotMap = tuple[tuple[int, int, int], ...]


def even_slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The 16384 slots in ``masters`` contiguous ranges of (nearly) equal size, first to last."""
    if not 1 <= masters <= SLOTS:
        raise ValueError(f"a cluster has 1 to {SLOTS} masters, not {masters}")
    return [(i * SLOTS // masters, (i + 1) * SLOTS // masters - 1) for i in range(masters)]


def frame_shard_pins(shards: int, masters: int) -> dict[int, int]:
    """Slot -> master index that puts frame shard ``i`` (and its backfill lane, same slot) on master
    ``i mod masters``."""
    pins: dict[int, int] = {}
    for shard in range(shards):
        slot = key_slot(keys.frame_shard(shard).encode())
        if pins.setdefault(slot, shard % masters) != shard % masters:
            raise ValueError(f"frame shards share slot {slot} but are pinned to different masters")
    return pins


def slots_of_masters(masters: int, pins: Mapping[int, int]) -> list[list[int]]:
    """Each master's slots: its even range, less the slots pinned elsewhere, plus those pinned to it."""
    owner = [0] * SLOTS
    for index, (first, last) in enumerate(even_slot_ranges(masters)):
        owner[first : last + 1] = [index] * (last - first + 1)
    for slot, index in pins.items():
        if not (0 <= slot < SLOTS and 0 <= index < masters):
            raise ValueError(f"cannot pin slot {slot} to master {index} of {masters}")
        owner[slot] = index
    return [[slot for slot in range(SLOTS) if owner[slot] == index] for index in range(masters)]


def contiguous_ranges(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slots as (first, last) runs, the arguments of CLUSTER ADDSLOTSRANGE."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][1] == slot - 1:
            runs[-1] = (runs[-1][0], slot)
        else:
            runs.append((slot, slot))
    return runs


@dataclass
class ClusterNode:
    """One redis-server of the cluster: its process, its bus port, and its cluster node id."""

    name: str  # "master-0", "master-0-replica-1"
    server: EmbeddedRedis
    bus_port: int
    node_id: str = ""

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def alive(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    def client(self) -> redis.Redis:
        """A plain connection to this node alone (admin commands; data commands get MOVED elsewhere)."""
        return redis.Redis(host=HOST, port=self.port, decode_responses=True, socket_timeout=5.0)

    def command(self, *args: object) -> object:
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, object]:
        with self.client() as client:
            return dict(client.info(section))

    def cluster_info(self) -> dict[str, str]:
        """CLUSTER INFO as fields (cluster_state, cluster_current_epoch, ...)."""
        with self.client() as client:
            text = client.execute_command("CLUSTER INFO")
        if isinstance(text, dict):
            return {str(k): str(v) for k, v in text.items()}
        return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)

    def cluster_nodes(self) -> list[str]:
        """CLUSTER NODES, one line per node this node knows."""
        with self.client() as client:
            text = client.execute_command("CLUSTER NODES")
        if isinstance(text, dict):
            return [f"{addr} {info}" for addr, info in text.items()]
        return str(text).splitlines()

    def cpu_seconds(self) -> float:
        """CPU time the server has used, system and user (INFO cpu)."""
        cpu = self.info("cpu")
        return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])  # type: ignore[arg-type]

    def slot_map(self) -> SlotMap:
        """This node's view of who serves which slots."""
        with self.client() as client:
            rows = client.execute_command("CLUSTER SLOTS")
        return tuple(sorted((int(row[0]), int(row[1]), int(row[2][1])) for row in rows))


@dataclass
class EmbeddedRedisCluster:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; ``url`` names one master (a cluster
    client discovers the rest: `flowcloud.redis_client.connect`)."""

    data_dir: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 15_000  # Redis's default; tests use a few hundred ms to a few seconds
    pins: Mapping[int, int] = field(default_factory=dict)  # slot -> master index
    full_coverage: bool = True  # cluster-require-full-coverage: Redis's default
    appendonly: bool = False
    nodes: list[ClusterNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.assignment = slots_of_masters(self.masters, self.pins)  # checks masters and pins
        if self.replicas < 0:
            raise ValueError(f"replicas per master cannot be negative ({self.replicas})")

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def _node(self, name: str, port: int, bus_port: int) -> ClusterNode:
        server = EmbeddedRedis(
            self.data_dir / name, port=port, appendonly=self.appendonly, options=self._options(bus_port)
        )
        return ClusterNode(name, server, bus_port)

    def _options(self, bus_port: int) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-replica-validity-factor", "0",  # a lagging replica may still take over
            "--cluster-allow-replica-migration", "no",  # each master keeps the replicas it was given
            "--cluster-require-full-coverage", "yes" if self.full_coverage else "no",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip

    def _start_new_node(self, node: ClusterNode) -> None:
        """Start a node that has not joined yet; if another process took one of its ports since
        `free_ports` found them free (its log says so), start it again on fresh ones."""
        log_path = node.server.data_dir / "redis.log"
        for attempt in range(1, PORT_TRIES + 1):
            logged = log_path.stat().st_size if log_path.exists() else 0
            try:
                node.server.start()
                return
            except RuntimeError:
                taken = log_path.exists() and b"Address already in use" in log_path.read_bytes()[logged:]
                if not taken or attempt == PORT_TRIES:
                    raise
            log.warning(
                "%s: port %d or %d was taken; trying fresh ports", node.name, node.port, node.bus_port
            )
            (node.server.data_dir / "nodes.conf").unlink(missing_ok=True)  # it names the old ports
            node.server.port, node.bus_port = free_ports(2)
            node.server.options = self._options(node.bus_port)

    def start(self, timeout: float = 60.0) -> EmbeddedRedisCluster:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Every node's client and bus ports in one go: ports taken one by one may repeat.
        ports = iter(free_ports(2 * self.masters * (1 + self.replicas)))
        masters = [self._node(f"master-{i}", next(ports), next(ports)) for i in range(self.masters)]
        replicas = [
            (index, self._node(f"master-{index}-replica-{r}", next(ports), next(ports)))
            for index in range(self.masters)
            for r in range(self.replicas)
        ]
        self.nodes = masters + [node for _, node in replicas]
        try:
            for node in self.nodes:
                self._start_new_node(node)
                node.node_id = str(node.command("CLUSTER", "MYID"))
            for index, node in enumerate(masters):
                node.command(
                    "CLUSTER", "SET-CONFIG-EPOCH", index + 1
                )  # distinct epochs: no collisions to settle
                runs = contiguous_ranges(self.assignment[index])
                node.command("CLUSTER", "ADDSLOTSRANGE", *[s for run in runs for s in run])
            for node in self.nodes[1:]:
                self.nodes[0].command("CLUSTER", "MEET", HOST, node.port, node.bus_port)
            self._wait("every node to know every other", self._all_met, timeout)
            for index, node in replicas:
                node.command("CLUSTER", "REPLICATE", masters[index].node_id)
            self.wait_settled(timeout)
        except BaseException:
            self.stop()
            raise
        log.info(
            "redis cluster of %d masters and %d replicas each on ports %s, data in %s",
            self.masters,
            self.replicas,
            ", ".join(str(node.port) for node in self.nodes),
            self.data_dir,
        )
        return self

    # --- state ------------------------------------------------------------------------------

    def live_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive()]

    def _all_met(self) -> bool:
        for node in self.nodes:
            lines = node.cluster_nodes()
            if len(lines) != len(self.nodes) or any(
                "handshake" in line or "noaddr" in line for line in lines
            ):
                return False
        return True

    def slot_map(self) -> SlotMap | None:
        """The slot map every live node agrees on with ``cluster_state:ok``, or None while they differ."""
        maps = set()
        for node in self.live_nodes():
            try:
                if node.cluster_info().get("cluster_state") != "ok":
                    return None
                maps.add(node.slot_map())
            except redis.RedisError:
                return None
        return maps.pop() if len(maps) == 1 else None

    def settled(self) -> bool:
        """Every live node says ok and agrees on the slot map, which covers every slot; every master
        has ``replicas`` replicas attached and every live replica's link to its master is up."""
        view = self.slot_map()
        if view is None or sum(last - first + 1 for first, last, _ in view) != SLOTS:
            return False
        serving = {port for _, _, port in view}
        for node in self.live_nodes():
            replication = node.info("replication")
            if replication.get("role") == "slave":
                if replication.get("master_link_status") != "up":
                    return False
            elif node.port in serving and int(replication.get("connected_slaves", 0)) < self.replicas:  # type: ignore[call-overload]
                return False
        return True

    def wait_settled(self, timeout: float = 60.0) -> None:
        self._wait("cluster_state:ok, one slot map on every node, replicas in sync", self.settled, timeout)

    def master_of_slot(self, slot: int) -> ClusterNode:
        """The node that serves ``slot`` in the agreed slot map."""
        view = self.slot_map()
        if view is None:
            raise RuntimeError("the cluster's nodes do not agree on the slot map (yet)")
        for first, last, port in view:
            if first <= slot <= last:
                return self.node_on_port(port)
        raise RuntimeError(f"no node serves slot {slot}")

    def master_of(self, key: str) -> ClusterNode:
        """The node that serves ``key``."""
        return self.master_of_slot(key_slot(key.encode()))

    def node_on_port(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def current_masters(self) -> list[ClusterNode]:
        """The nodes that serve slots now, in slot order."""
        view = self.slot_map()
        if view is None:
            raise RuntimeError("the cluster's nodes do not agree on the slot map (yet)")
        ports = list(dict.fromkeys(port for _, _, port in view))
        return [self.node_on_port(port) for port in ports]

    # --- faults -----------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL ``node`` (a crash)."""
        log.info("killing %s (port %d)", node.name, node.port)
        node.server.kill()

    def wait_failover(self, killed: ClusterNode, timeout: float = 60.0) -> ClusterNode:
        """Once the live nodes agree that another node serves ``killed``'s slots, that node."""
        first_slot = self._last_map_with(killed)[0][0]

        def taken_over() -> bool:
            view = self.slot_map()
            return view is not None and all(port != killed.port for _, _, port in view)

        self._wait(f"a replica to take over from {killed.name}", taken_over, timeout)
        successor = self.master_of_slot(first_slot)
        log.info("%s (port %d) took over from %s", successor.name, successor.port, killed.name)
        return successor

    def _last_map_with(self, node: ClusterNode) -> list[tuple[int, int, int]]:
        """The rows of the slot map a live node still holds that name ``node`` as master."""
        for other in self.live_nodes():
            try:
                rows = [row for row in other.slot_map() if row[2] == node.port]
            except redis.RedisError:
                continue
            if rows:
                return rows
        raise RuntimeError(f"no live node knows {node.name} as a master")

    def restart(self, node: ClusterNode, timeout: float = 60.0) -> None:
        """Start a killed node again on its port and data directory; it rejoins as a replica."""
        node.server.start()
        self.wait_settled(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()

    def _wait(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster: timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def __enter__(self) -> EmbeddedRedisCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
