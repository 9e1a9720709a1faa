"""/cluster (admins): the workers as Kubernetes runs them (services.api.cluster)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from services.api.cluster import ClusterUnavailableError
from services.api.deps import AdminKey, Context
from services.api.schemas import ClusterBody, ErrorBody

router = APIRouter(tags=["cluster"])


@router.get(
    "/cluster",
    response_model=ClusterBody,
    responses={
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        404: {"model": ErrorBody, "description": "the cluster view is off (not in a cluster)"},
        503: {"model": ErrorBody, "description": "the Kubernetes API is unreachable or refused"},
    },
    summary="The workers' pods, nodes, GPU model, restarts and autoscaler replicas (admin; in Kubernetes)",
)
async def cluster(context: Context, _key: AdminKey) -> dict[str, Any]:
    if context.cluster is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the cluster view is off: FLOWCLOUD_API_CLUSTER_VIEW")
    try:
        return await context.cluster.snapshot()
    except ClusterUnavailableError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
