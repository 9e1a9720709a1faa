"""The chart's NetworkPolicies, rendered by a real helm: every pod is selected by an ingress policy,
with the in-cluster Redis servers and with external ones, and the policies admit exactly what the
chart promises. `admits` evaluates the rendered policies with Kubernetes' rules for the parts of the
API the chart uses (matchLabels selectors, ports, policyTypes): a pod selected by an ingress policy
admits a connection only when a rule of one of those policies matches its source and port."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from .test_chart import CI_VALUES, KEDA_API, RENDERINGS, Obj, by_kind, render

NAMESPACE = "fc"
POD_KINDS = ("Deployment", "StatefulSet", "Pod")


@dataclass(frozen=True)
class Source:
    """Where a connection comes from: a pod (its labels and its namespace's labels) or, with no
    namespace, an address outside the cluster (an edge device, a browser)."""

    pod_labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] | None = None


INTERNET = Source()


def namespace(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def pod_in(ns: str, **labels: str) -> Source:
    return Source(dict(labels), namespace(ns))


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the evaluator knows only matchLabels: {selector}"
    return dict(selector.get("matchLabels", {})).items() <= labels.items()


def peer_matches(peer: dict[str, Any], source: Source) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"the evaluator knows no {peer}"
    if source.namespace_labels is None:
        return False  # outside the cluster: only a rule without `from` admits it
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], source.namespace_labels):
            return False
    elif source.namespace_labels != namespace(NAMESPACE):
        return False  # a podSelector alone selects pods of the policy's own namespace
    return "podSelector" not in peer or matches(peer["podSelector"], source.pod_labels)


def workloads(objs: list[Obj]) -> dict[str, tuple[dict[str, str], set[int]]]:
    """Component -> (pod labels, container ports) of every pod the release runs."""
    out = {}
    for obj in (o for o in objs if o["kind"] in POD_KINDS):
        meta = obj["metadata"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]
        spec = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
        ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        out[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = (meta["labels"], ports)
    return out


def admits(objs: list[Obj], target: str, port: int, source: Source) -> bool:
    labels, _ports = workloads(objs)[target]
    policies = [
        p
        for p in by_kind(objs, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True  # not isolated
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p["port"] == port and p["protocol"] == "TCP" for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(peer_matches(peer, source) for peer in peers):
                return True
    return False


def release_pod(component: str) -> Source:
    return pod_in(
        NAMESPACE,
        **{
            "app.kubernetes.io/name": "flowcloud",
            "app.kubernetes.io/instance": "flowcloud",
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "flowcloud",
        },
    )


PROMETHEUS = pod_in("monitoring", app="prometheus")
INGRESS_CONTROLLER = pod_in("ingress-nginx", app="ingress-nginx")
KEDA = pod_in("keda", app="keda-operator")
NEIGHBOUR = pod_in(NAMESPACE, app="something-else")  # another app in the release's namespace
STRANGER = pod_in("default", app="curl")
EVERYONE = {
    "internet": INTERNET,
    "prometheus": PROMETHEUS,
    "ingress": INGRESS_CONTROLLER,
    "keda": KEDA,
    "neighbour": NEIGHBOUR,
    "stranger": STRANGER,
    "gateway": release_pod("gateway"),
    "api": release_pod("api"),
    "worker": release_pod("worker"),
    "alerts": release_pod("alerts"),
    "api-test": release_pod("api-test"),
}
# (target, port) -> the sources admitted; every other source of EVERYONE is refused.
PROMISES: dict[tuple[str, int], set[str]] = {
    ("gateway", 7000): set(EVERYONE),  # edge devices dial from anywhere
    ("gateway", 9101): {"prometheus"},
    ("api", 8000): {"ingress", "prometheus", "api-test"},
    ("worker", 9102): {"prometheus"},
    ("alerts", 9104): {"prometheus"},
    ("redis", 6379): {"gateway", "api", "worker", "alerts", "api-test", "keda"},
    ("control-redis", 6379): {"gateway", "api", "alerts"},
    ("api-test", 8000): set(),
}


@pytest.fixture(scope="module", params=["default", "gpu-keda-external-redis"])
def objs(request: pytest.FixtureRequest) -> list[Obj]:
    return render(*RENDERINGS[request.param])


@pytest.mark.parametrize("rendering", sorted(RENDERINGS))
def test_every_pod_is_selected_by_an_ingress_policy(rendering: str) -> None:
    objs = render(*RENDERINGS[rendering])
    policies = by_kind(objs, "NetworkPolicy")
    for component, (labels, _ports) in workloads(objs).items():
        selecting = [p for p in policies if matches(p["spec"]["podSelector"], labels)]
        assert len(selecting) == 1, f"{rendering}: {component} is selected by {len(selecting)} policies"
        assert selecting[0]["spec"]["policyTypes"] == ["Ingress"]


def test_policies_admit_exactly_what_the_chart_promises(objs: list[Obj]) -> None:
    running = workloads(objs)
    checked = 0
    for (target, port), allowed in PROMISES.items():
        if target not in running:
            continue  # Redis outside the cluster
        for name, source in EVERYONE.items():
            assert admits(objs, target, port, source) == (name in allowed), (target, port, name)
        # No port of the pod without a promise is reachable from anywhere.
        for other in running[target][1] - {p for t, p in PROMISES if t == target}:
            assert not any(admits(objs, target, other, s) for s in EVERYONE.values()), (target, other)
        checked += 1
    assert checked == (8 if "control-redis" in running else 6)


def test_external_redis_still_covers_every_pod() -> None:
    objs = render("-f", str(CI_VALUES), "--api-versions", KEDA_API)
    assert {p["metadata"]["name"] for p in by_kind(objs, "NetworkPolicy")} == {
        "flowcloud-gateway",
        "flowcloud-api",
        "flowcloud-worker",
        "flowcloud-alerts",
        "flowcloud-api-test",
    }


def test_the_evaluator_sees_an_open_pod() -> None:
    """Without policies every source reaches every port: the promises above can fail."""
    objs = render("--set", "networkPolicy.enabled=false")
    assert not by_kind(objs, "NetworkPolicy")
    assert admits(objs, "control-redis", 6379, INTERNET) and admits(objs, "worker", 9102, STRANGER)


def test_peers_are_configurable() -> None:
    objs = render(
        "--set-json",
        'networkPolicy.metricsScrapers=[{"namespaceSelector":{"matchLabels":{"team":"obs"}}}]',
        "--set-json",
        'networkPolicy.apiClients=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"traefik"}}}]',
    )
    assert admits(objs, "worker", 9102, Source({}, {"team": "obs"}))
    assert not admits(objs, "worker", 9102, PROMETHEUS)
    assert admits(objs, "api", 8000, pod_in("traefik")) and not admits(objs, "api", 8000, INGRESS_CONTROLLER)
