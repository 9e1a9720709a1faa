"""The cluster view (/cluster): the real `kubernetes` client in a real API server reads a local HTTP
server that speaks the Kubernetes API's JSON (support.kubernetes). Admins only; off outside a
cluster; a Role that does not grant a read gives a 503 that says so."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from support.api import make_key, running_api
from support.kubernetes import Cluster, kubernetes_api

from flowcloud.settings import ApiSettings
from services.api.cluster import PERMISSIONS

ADMIN = "admin-key-for-cluster-tests"
NS = "fc"
WORKER_LABELS = {
    "app.kubernetes.io/name": "flowcloud",
    "app.kubernetes.io/instance": "flowcloud",
    "app.kubernetes.io/component": "worker",
}


def pod(
    name: str, node: str, restarts: int, ready: bool, gpus: int, labels: dict[str, str]
) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels, "uid": f"uid-{name}"},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "worker", "image": "flowcloud-worker-cuda:0.1.0", "resources": resources}
            ],
        },
        "status": {
            "phase": "Running",
            "startTime": "2026-12-03T10:00:00Z",
            "containerStatuses": [
                {
                    "name": "worker",
                    "ready": ready,
                    "restartCount": restarts,
                    "image": "flowcloud-worker-cuda:0.1.0",
                    "imageID": "sha256:0",
                    "started": True,
                    "state": {"running": {"startedAt": "2026-12-03T10:01:00Z"}},
                }
            ],
        },
    }


def node(name: str, gpu_model: str | None, gpus: int) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    capacity = {"cpu": "32", "memory": "256Gi"}
    if gpu_model:
        labels["nvidia.com/gpu.product"] = gpu_model
        capacity["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "DiskPressure", "status": "False"}],
        },
    }


def hpa(name: str, target: str, current: int, desired: int, managed_by: str | None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/managed-by": managed_by} if managed_by else {}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1,
            "maxReplicas": 8,
        },
        "status": {"currentReplicas": current, "desiredReplicas": desired},
    }


def a_cluster() -> Cluster:
    other_app = {**WORKER_LABELS, "app.kubernetes.io/instance": "other-release"}
    return Cluster(
        pods={
            NS: [
                pod(
                    "flowcloud-worker-b", "gpu-node-1", restarts=3, ready=False, gpus=1, labels=WORKER_LABELS
                ),
                pod("flowcloud-worker-a", "gpu-node-1", restarts=0, ready=True, gpus=1, labels=WORKER_LABELS),
                pod("flowcloud-worker-c", "cpu-node", restarts=1, ready=True, gpus=0, labels=WORKER_LABELS),
                pod("other-worker", "cpu-node", restarts=9, ready=True, gpus=0, labels=other_app),
            ]
        },
        nodes={
            "gpu-node-1": node("gpu-node-1", "NVIDIA-H100-80GB-HBM3", 8),
            "cpu-node": node("cpu-node", None, 0),
            "unused-node": node("unused-node", "NVIDIA-L4", 1),
        },
        deployments={
            (NS, "flowcloud-worker"): {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "flowcloud-worker", "namespace": NS},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": WORKER_LABELS},
                    "template": {
                        "metadata": {"labels": WORKER_LABELS},
                        "spec": {"containers": [{"name": "worker"}]},
                    },
                },
                "status": {"replicas": 3, "readyReplicas": 2},
            }
        },
        hpas={
            NS: [
                hpa("flowcloud-api", "flowcloud-api", 2, 2, None),
                hpa("keda-hpa-flowcloud-worker", "flowcloud-worker", 3, 5, "keda-operator"),
            ]
        },
    )


def settings(redis_url: str, api_url: str, **extra: Any) -> ApiSettings:
    return ApiSettings(
        redis_url=redis_url,
        admin_key=ADMIN,
        cluster_view=True,
        cluster_api_url=api_url,
        cluster_namespace=NS,
        cluster_worker_selector=",".join(f"{k}={v}" for k, v in WORKER_LABELS.items()),
        cluster_worker_deployment="flowcloud-worker",
        **extra,
    )


def test_admins_see_the_workers_nodes_gpus_and_autoscaler(redis_url: str) -> None:
    cluster = a_cluster()
    reader = make_key(redis_url, "reader", "acme")
    with kubernetes_api(cluster) as api_url, running_api(settings(redis_url, api_url)) as base:
        assert httpx.get(f"{base}/cluster").status_code == 401
        assert httpx.get(f"{base}/cluster", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
        response = httpx.get(f"{base}/cluster", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["namespace"] == NS
    assert view["deployment"] == {"name": "flowcloud-worker", "replicas": 3, "ready_replicas": 2}
    assert view["autoscaler"] == {
        "name": "keda-hpa-flowcloud-worker",
        "managed_by": "keda-operator",
        "min_replicas": 1,
        "max_replicas": 8,
        "current_replicas": 3,
        "desired_replicas": 5,
    }
    assert [(p["name"], p["node"], p["restarts"], p["ready"], p["gpus"]) for p in view["pods"]] == [
        ("flowcloud-worker-a", "gpu-node-1", 0, True, 1),
        ("flowcloud-worker-b", "gpu-node-1", 3, False, 1),
        ("flowcloud-worker-c", "cpu-node", 1, True, 0),
    ]
    assert view["pods"][0]["phase"] == "Running" and view["pods"][0]["started"].startswith(
        "2026-12-03T10:00:00"
    )
    assert view["nodes"] == [
        {"name": "cpu-node", "ready": True, "gpu_model": None, "gpus": 0, "gpus_allocatable": 0},
        {
            "name": "gpu-node-1",
            "ready": True,
            "gpu_model": "NVIDIA-H100-80GB-HBM3",
            "gpus": 8,
            "gpus_allocatable": 8,
        },
    ]
    # The client asked for the workers by label, and only for what PERMISSIONS (the chart's Role) grants.
    asked = {permission for permission, _query in cluster.requests}
    assert asked == PERMISSIONS
    (pods_query,) = [q for p, q in cluster.requests if p[1] == "pods"]
    assert pods_query["labelSelector"] == [",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())]


@pytest.mark.parametrize("refused", ["horizontalpodautoscalers", "nodes"])
def test_a_read_the_role_does_not_grant_is_a_503_that_says_so(redis_url: str, refused: str) -> None:
    cluster = a_cluster()
    cluster.refused.add(refused)
    with kubernetes_api(cluster) as api_url, running_api(settings(redis_url, api_url)) as base:
        response = httpx.get(f"{base}/cluster", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert response.status_code == 503
    assert (
        response.json()["detail"]
        == "the Kubernetes API answered 403 Forbidden (does the chart's Role grant it?)"
    )


def test_off_outside_a_cluster(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for on in (False, True):  # asked for, but there is no service account here: off, with a log line
        with running_api(ApiSettings(redis_url=redis_url, admin_key=ADMIN, cluster_view=on)) as base:
            response = httpx.get(f"{base}/cluster", headers=admin)
        assert response.status_code == 404
        assert response.json()["detail"] == "the cluster view is off: FLOWCLOUD_API_CLUSTER_VIEW"


def test_an_unreachable_kubernetes_api_is_a_503(redis_url: str) -> None:
    with kubernetes_api(a_cluster()) as api_url:
        pass  # the server is gone: nothing listens there any more
    with running_api(settings(redis_url, api_url)) as base:
        response = httpx.get(f"{base}/cluster", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert response.status_code == 503
    assert response.json()["detail"].startswith("the Kubernetes API is unreachable")
