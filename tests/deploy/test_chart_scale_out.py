"""The chart's scale-out variant, rendered by a real helm: the data plane on an external Redis Cluster
(TLS, a private CA, the password from a Secret), frames spread over shard queues, workers autoscaled on
the backlog of every shard (one KEDA trigger per shard, or one Prometheus trigger on the total), and the
gateway as several replicas behind a TCP load balancer that suits long-lived sessions."""

from __future__ import annotations

import math
import re
from typing import Any

import promql_parser
import pytest

from flowcloud import keys
from flowcloud.settings import ServiceSettings

from .conftest import ROOT
from .test_chart import CHART, CLUSTER_VALUES, KEDA_API, Obj, by_kind, containers, helm, one, pod_spec, render
from .test_chart_alerts import TARGET_LABELS, exported, selectors

SERVICES = ("gateway", "worker", "api", "alerts")  # every Deployment that talks to the data plane
PROMETHEUS = ("--set", "worker.autoscaling.keda.lagSource=prometheus")


def env_of(objs: list[Obj], component: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in next(containers(one(objs, "Deployment", component)))["env"]}


def triggers(objs: list[Obj]) -> list[Obj]:
    return list(one(objs, "ScaledObject", "worker")["spec"]["triggers"])


def refused(*args: str) -> str:
    """helm's error for values the chart must refuse (fails the test if they render)."""
    result = helm("template", "x", str(CHART), *args, check=False)
    assert result.returncode != 0, f"{args} was accepted"
    return result.stderr


@pytest.fixture(scope="module")
def cluster_objs() -> list[Obj]:
    return render("-f", str(CLUSTER_VALUES), "--api-versions", KEDA_API)


def test_the_cluster_variant_has_one_cluster_trigger_per_shard(cluster_objs: list[Obj]) -> None:
    shards = 6  # the cluster values
    found = triggers(cluster_objs)
    assert [t["metadata"]["stream"] for t in found] == [keys.frame_shard(i) for i in range(shards)]
    auth = one(cluster_objs, "TriggerAuthentication", "worker")
    for trigger in found:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-cluster-streams"
        assert meta["consumerGroup"] == keys.WORKER_GROUP
        assert meta["addresses"] == ",".join(f"redis-{i}.redis.example.internal:6379" for i in range(3))
        assert "address" not in meta and "databaseIndex" not in meta  # a cluster has database 0 only
        assert meta["lagCount"] == str(30 // shards) and meta["enableTLS"] == "true"
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert len({t["name"] for t in found}) == shards, "trigger names are unique"
    # The password and the private CA from their Secrets (KEDA reads `ca` with enableTLS).
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "flowcloud-redis-cluster", "key": "redis-password"},
        {"parameter": "ca", "name": "flowcloud-redis-ca", "key": "ca.crt"},
    ]


@pytest.mark.parametrize("shards", [1, 2, 3, 8, 20])
def test_the_shard_triggers_ask_for_the_workers_the_total_lag_needs(shards: int) -> None:
    """KEDA asks for the largest of its triggers' worker counts, ceil(lag_i / lagCount_i), not their
    sum: with the shards' lag even, that is at least the ceil(total / lagCount) the values promise (one
    trigger with the whole lagCount per shard would ask for `shards` times too few)."""
    lag_count = 20
    objs = render("--api-versions", KEDA_API, "--set", f"frameShards={shards}")
    found = triggers(objs)
    assert [t["metadata"]["stream"] for t in found] == [keys.frame_shard(i) for i in range(shards)]
    assert {t["type"] for t in found} == {"redis-streams"}
    assert {t["metadata"]["address"] for t in found} == {"flowcloud-redis:6379"}
    per_shard = {int(t["metadata"]["lagCount"]) for t in found}
    assert len(per_shard) == 1
    (target,) = per_shard
    assert target == lag_count // shards
    for per_shard_lag in (0, 1, 5, 19, 20, 21, 100, 1000):
        total = per_shard_lag * shards
        keda_asks = max(math.ceil(per_shard_lag / target) for _ in found)
        assert keda_asks >= math.ceil(total / lag_count), (shards, per_shard_lag)
    env = env_of(objs, "worker")
    assert env["FLOWCLOUD_FRAME_SHARDS"]["value"] == str(shards)


def test_more_shards_than_lag_count_is_refused() -> None:
    """A per-shard target below one frame cannot be written: KEDA would ask for too few workers."""
    error = refused("--api-versions", KEDA_API, "--set", "frameShards=21")
    assert "worker.autoscaling.keda.lagCount (20) must be at least frameShards (21)" in error
    objs = render("--api-versions", KEDA_API, *PROMETHEUS, "--set", "frameShards=64")
    assert [t["type"] for t in triggers(objs)] == ["prometheus"]


def test_a_single_external_redis_keeps_its_address_and_database() -> None:
    objs = render(
        "--api-versions", KEDA_API, "--set", "redis.enabled=false", "--set", "externalRedis.url.secretName=u",
        "--set", "externalRedis.address=redis.example:6380", "--set", "externalRedis.databaseIndex=2",
        "--set", "frameShards=2",
    )  # fmt: skip
    for trigger in triggers(objs):
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["address"] == "redis.example:6380"
        assert trigger["metadata"]["databaseIndex"] == "2"


@pytest.mark.parametrize("variant", ["single", "cluster"])
def test_the_prometheus_lag_source_is_one_trigger_on_the_sum_over_shards(variant: str) -> None:
    values = (
        ("-f", str(CLUSTER_VALUES), "--set", "worker.autoscaling.minReplicas=1")
        if variant == "cluster"
        else ()
    )
    objs = render("--api-versions", KEDA_API, *PROMETHEUS, *values)
    (trigger,) = triggers(objs)
    assert not by_kind(objs, "TriggerAuthentication"), "KEDA needs no Redis credentials then"
    meta = trigger["metadata"]
    assert trigger["type"] == "prometheus"
    assert meta["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
    assert meta["threshold"] == ("30" if variant == "cluster" else "20")
    assert meta["activationThreshold"] == "0"
    assert_total_lag_query(meta["query"], objs)


def assert_total_lag_query(query: str, objs: list[Obj]) -> None:
    """The query adds up one value per shard: the lag every worker reports for each shard is the same
    group lag, so summing over pods would count it once per worker."""
    expr = promql_parser.parse(query)
    assert isinstance(expr, promql_parser.AggregateExpr) and str(expr.op) == "sum"
    assert expr.modifier is None, "the outer sum adds everything up"
    inner = expr.expr
    assert isinstance(inner, promql_parser.AggregateExpr) and str(inner.op) == "max"
    assert inner.modifier is not None and str(inner.modifier) == "by (shard)"
    assert list(inner.modifier.labels) == ["shard"]
    (selector,) = selectors(expr)
    series = exported()
    assert selector.name == "flowcloud_worker_consumer_lag" and selector.name in series
    # Per shard (label `shard`), or one queue: then `max by (shard)` is the max over the workers.
    assert series[selector.name] in (set(), {"shard"}), "the workers' lag gauge and the query agree"
    matchers = {m.name: m.value for m in selector.matchers.matchers}
    assert set(matchers) <= TARGET_LABELS
    # Only this release's workers: their metrics Service in the release's namespace.
    assert matchers["namespace"] == "fc"
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    metrics_service = services[matchers["service"]]
    assert metrics_service["spec"]["selector"].items() <= (
        one(objs, "Deployment", "worker")["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_prometheus_lag_source_cannot_scale_from_zero() -> None:
    error = refused("--api-versions", KEDA_API, *PROMETHEUS, "--set", "worker.autoscaling.minReplicas=0")
    assert "needs worker.autoscaling.minReplicas >= 1" in error
    assert "schema" in refused("--set", "worker.autoscaling.keda.lagSource=statsd")


@pytest.mark.parametrize(
    ("variant", "cluster", "shards"), [("default", "false", "1"), ("cluster", "true", "6")]
)
def test_every_service_gets_the_cluster_and_shard_settings(
    cluster_objs: list[Obj], variant: str, cluster: str, shards: str
) -> None:
    objs = cluster_objs if variant == "cluster" else render()
    assert {
        o["metadata"]["labels"]["app.kubernetes.io/component"] for o in by_kind(objs, "Deployment")
    } == set(SERVICES)
    for component in SERVICES:
        env = env_of(objs, component)
        assert env["FLOWCLOUD_REDIS_CLUSTER"]["value"] == cluster, component
        assert env["FLOWCLOUD_FRAME_SHARDS"]["value"] == shards, component
    # The values are what the settings accept.
    parsed = ServiceSettings(redis_cluster=cluster, frame_shards=shards)
    assert parsed.redis_cluster is (cluster == "true") and parsed.frame_shards == int(shards)
    assert "schema" in refused("--set", f"frameShards={keys.MAX_SHARDS + 1}")


def test_the_external_cluster_gets_its_password_and_ca_in_every_service(cluster_objs: list[Obj]) -> None:
    for component in SERVICES:
        deployment = one(cluster_objs, "Deployment", component)
        env = env_of(cluster_objs, component)
        assert env["FLOWCLOUD_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "flowcloud-redis-cluster",
            "key": "redis-url",
        }
        assert env["FLOWCLOUD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "flowcloud-redis-cluster",
            "key": "redis-password",
        }
        ca_file = env["FLOWCLOUD_REDIS_CA_FILE"]["value"]
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        mounts = [
            m
            for m in next(containers(deployment))["volumeMounts"]
            if ca_file.startswith(m["mountPath"] + "/")
        ]
        assert len(mounts) == 1 and mounts[0]["readOnly"] is True, component
        secret = volumes[mounts[0]["name"]]["secret"]
        assert secret["secretName"] == "flowcloud-redis-ca"
        assert secret["items"] == [
            {"key": "ca.crt", "path": ca_file.removeprefix(mounts[0]["mountPath"] + "/")}
        ]
    assert not by_kind(cluster_objs, "StatefulSet") or {
        o["metadata"]["labels"]["app.kubernetes.io/component"] for o in by_kind(cluster_objs, "StatefulSet")
    } == {"control-redis"}


def test_the_single_redis_default_is_unchanged() -> None:
    objs = render()
    for component in SERVICES:
        env = env_of(objs, component)
        assert "FLOWCLOUD_REDIS_PASSWORD" not in env and "FLOWCLOUD_REDIS_CA_FILE" not in env
        assert env["FLOWCLOUD_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "flowcloud-redis"
        volumes = pod_spec(one(objs, "Deployment", component)).get("volumes", [])
        assert not any(v["name"] == "redis-ca" for v in volumes)
    assert one(objs, "StatefulSet", "redis")["spec"]["replicas"] == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (("redis.cluster.enabled=true",), "redis.cluster.enabled needs an external Redis Cluster"),
        (
            ("redis.cluster.enabled=true", "redis.enabled=false", "externalRedis.url.secretName=u"),
            "externalRedis.addresses (host:port of the cluster's nodes) is required",
        ),
        (
            ("redis.enabled=false", "externalRedis.url.secretName=u", "externalRedis.address=h:1",
             "externalRedis.ca.secretName=ca"),
            "externalRedis.ca needs externalRedis.enableTLS=true",
        ),
    ],
)  # fmt: skip
def test_the_chart_refuses_a_cluster_it_cannot_reach(settings: tuple[str, ...], message: str) -> None:
    args = [a for s in settings for a in ("--set", s)]
    assert message in refused("--api-versions", KEDA_API, *args)


@pytest.mark.parametrize("variant", ["default", "cluster"])
def test_gateway_replicas_budget_and_shutdown(cluster_objs: list[Obj], variant: str) -> None:
    objs = cluster_objs if variant == "cluster" else render()
    gateway = one(objs, "Deployment", "gateway")
    replicas = gateway["spec"]["replicas"]
    assert replicas == (3 if variant == "cluster" else 2)
    pdb = one(objs, "PodDisruptionBudget", "gateway")
    assert 1 <= pdb["spec"]["minAvailable"] < replicas, "a budget that still lets a node drain"
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= gateway["spec"]["template"]["metadata"]["labels"].items()
    )
    assert gateway["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spec = pod_spec(gateway)
    (spread,) = spec["topologySpreadConstraints"]
    assert (
        spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    )
    assert spread["labelSelector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"]
    # Out of the load balancer before SIGTERM, and the drain finishes before the kill.
    container = next(containers(gateway))
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= 5
    configmap = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"] == "flowcloud-gateway")
    drain = float(configmap["data"]["FLOWCLOUD_GATEWAY_DRAIN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > sleep + drain


def test_gateway_service_suits_long_lived_sessions() -> None:
    objs = render()
    svc = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "flowcloud-gateway")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["sessionAffinity"] == "None", "a lease in Redis fences sessions, not the LB"
    node_port = render("--set", "gateway.service.type=NodePort", "--set", "gateway.service.nodePort=30700")
    svc = next(s for s in by_kind(node_port, "Service") if s["metadata"]["name"] == "flowcloud-gateway")
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["externalTrafficPolicy"] == "Local"
    # The idle-timeout annotations for cloud load balancers are documented beside the value.
    values = (CHART / "values.yaml").read_text()
    assert "aws-load-balancer-connection-idle-timeout" in values
    assert "azure-load-balancer-tcp-idle-timeout" in values


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (("gateway.terminationGracePeriodSeconds=15",), "must be above gateway.preStopSleepSeconds (10)"),
        (("gateway.settings.drain_timeout=25",), "must be above gateway.preStopSleepSeconds (10)"),
        (
            ("gateway.replicaCount=2", "gateway.podDisruptionBudget.minAvailable=2"),
            "must be below gateway.replicaCount",
        ),
    ],
)
def test_the_chart_refuses_a_gateway_that_cannot_drain(settings: tuple[str, ...], message: str) -> None:
    assert message in refused(*[a for s in settings for a in ("--set", s)])


def test_the_docs_explain_the_choice() -> None:
    readme = (CHART / "README.md").read_text()
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for text in (readme, architecture):
        assert "redis-cluster-streams" in text and "lagSource" in text
        assert re.search(r"max\w*\W+(over|of)\W+(its|the)\W+triggers", text, re.IGNORECASE), (
            "why not one trigger"
        )
        assert "sum(max by (shard)" in text
