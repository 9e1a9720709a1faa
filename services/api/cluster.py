"""The cluster view: the workers as Kubernetes runs them (pods, nodes, GPU model, restarts, the
autoscaler's current and desired replicas), read with the official `kubernetes` client.

Off unless ``FLOWCLOUD_API_CLUSTER_VIEW`` is true (the chart turns it on with a read-only Role).
In a pod it authenticates with its service account; ``cluster_api_url`` points it at another API
server that needs no credentials from us (``kubectl proxy``). It only reads, and only what
``PERMISSIONS`` lists: the chart's Role and ClusterRole grant exactly those verbs
(tests/deploy/test_chart_cluster_view.py). The client (over a second to import) is imported only
when the view is on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from urllib3.exceptions import HTTPError

from flowcloud.settings import ApiSettings

if TYPE_CHECKING:
    from kubernetes import client

log = logging.getLogger(__name__)

# (API group, resource, verb): every request the view makes. Nodes are cluster-scoped (a ClusterRole).
PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("", "pods", "list"),
        ("apps", "deployments", "get"),
        ("autoscaling", "horizontalpodautoscalers", "list"),
        ("", "nodes", "get"),
    }
)
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery (GPU operator)
REQUEST_TIMEOUT = 5.0


class ClusterUnavailableError(Exception):
    """The Kubernetes API could not be asked (unreachable, or it refused: the message says which)."""


@dataclass(frozen=True)
class ClusterTarget:
    namespace: str
    worker_selector: str  # label selector of the worker pods
    worker_deployment: str | None  # the Deployment the autoscaler scales
    gpu_resource: str  # extended resource name of a GPU


def _gpus(resources: dict[str, str] | None, name: str) -> int:
    value = (resources or {}).get(name)
    return int(value) if value is not None else 0


def _pod(pod: Any, gpu_resource: str) -> dict[str, Any]:
    statuses = pod.status.container_statuses or []
    requests = [c.resources.requests if c.resources else None for c in pod.spec.containers]
    return {
        "name": pod.metadata.name,
        "phase": pod.status.phase,
        "ready": bool(statuses) and all(s.ready for s in statuses),
        "node": pod.spec.node_name,
        "restarts": sum(s.restart_count for s in statuses),
        "started": pod.status.start_time.isoformat() if pod.status.start_time else None,
        "gpus": sum(_gpus(r, gpu_resource) for r in requests),
    }


def _node(node: Any, gpu_resource: str) -> dict[str, Any]:
    conditions = {c.type: c.status for c in node.status.conditions or []}
    return {
        "name": node.metadata.name,
        "ready": conditions.get("Ready") == "True",
        "gpu_model": (node.metadata.labels or {}).get(GPU_PRODUCT_LABEL),
        "gpus": _gpus(node.status.capacity, gpu_resource),
        "gpus_allocatable": _gpus(node.status.allocatable, gpu_resource),
    }


def _autoscaler(hpa: Any) -> dict[str, Any]:
    labels = hpa.metadata.labels or {}
    return {
        "name": hpa.metadata.name,
        "managed_by": labels.get("app.kubernetes.io/managed-by"),  # keda-operator for KEDA's HPA
        "min_replicas": hpa.spec.min_replicas,
        "max_replicas": hpa.spec.max_replicas,
        "current_replicas": hpa.status.current_replicas,
        "desired_replicas": hpa.status.desired_replicas,
    }


class ClusterView:
    """Reads the workers' state from one Kubernetes API server (the client is blocking: each view
    runs in a thread)."""

    def __init__(self, api: client.ApiClient, target: ClusterTarget) -> None:
        from kubernetes import client

        self.api = api
        self.target = target
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.autoscaling = client.AutoscalingV2Api(api)

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> ClusterView:
        """The in-cluster service account, or ``cluster_api_url`` (no credentials) when set."""
        from kubernetes import client, config

        if settings.cluster_api_url:
            configuration = client.Configuration(host=settings.cluster_api_url)
        else:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException as exc:
                raise ClusterUnavailableError(f"not inside a Kubernetes pod ({exc})") from None
        namespace = settings.cluster_namespace
        if namespace is None:
            namespace = NAMESPACE_FILE.read_text().strip() if NAMESPACE_FILE.is_file() else "default"
        target = ClusterTarget(
            namespace,
            settings.cluster_worker_selector,
            settings.cluster_worker_deployment,
            settings.cluster_gpu_resource,
        )
        return cls(client.ApiClient(configuration), target)

    async def snapshot(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._snapshot)

    def close(self) -> None:
        self.api.close()

    def _snapshot(self) -> dict[str, Any]:
        from kubernetes.client import ApiException

        t = self.target
        try:
            # The models type every field Optional; the API server fills the ones read here.
            pods: list[Any] = self.core.list_namespaced_pod(
                t.namespace, label_selector=t.worker_selector, _request_timeout=REQUEST_TIMEOUT
            ).items
            node_names = sorted({p.spec.node_name for p in pods if p.spec.node_name})
            nodes = [self.core.read_node(n, _request_timeout=REQUEST_TIMEOUT) for n in node_names]
            deployment = autoscaler = None
            if t.worker_deployment:
                found: Any = self.apps.read_namespaced_deployment(
                    t.worker_deployment, t.namespace, _request_timeout=REQUEST_TIMEOUT
                )
                deployment = {
                    "name": found.metadata.name,
                    "replicas": found.spec.replicas,
                    "ready_replicas": found.status.ready_replicas or 0,
                }
                hpas: list[Any] = self.autoscaling.list_namespaced_horizontal_pod_autoscaler(
                    t.namespace, _request_timeout=REQUEST_TIMEOUT
                ).items
                scaling = [
                    h
                    for h in hpas
                    if h.spec.scale_target_ref.kind == "Deployment"
                    and h.spec.scale_target_ref.name == t.worker_deployment
                ]
                autoscaler = _autoscaler(scaling[0]) if scaling else None
        except ApiException as exc:
            raise ClusterUnavailableError(
                f"the Kubernetes API answered {exc.status} {exc.reason}"
                + (" (does the chart's Role grant it?)" if exc.status == 403 else "")
            ) from None
        except (HTTPError, OSError) as exc:
            raise ClusterUnavailableError(f"the Kubernetes API is unreachable: {exc}") from None
        return {
            "namespace": t.namespace,
            "deployment": deployment,
            "autoscaler": autoscaler,
            "pods": [_pod(p, t.gpu_resource) for p in sorted(pods, key=lambda p: p.metadata.name)],
            "nodes": [_node(n, t.gpu_resource) for n in nodes],
        }
