"""/healthz (the process answers), /readyz (Redis answers; how many workers are ready), /workers
(admin: each worker's heartbeat), /metrics (Prometheus).

The public probes say only what a probe needs (ok or not, Redis reachable, a count of ready
workers); worker names, models and counters are for admins (`/workers`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from flowcloud import keys
from services.api.deps import AdminKey, Context, Credentials, current_key
from services.api.schemas import ErrorBody, HealthBody, ReadyBody, WorkerList

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthBody, summary="Liveness: the process answers (no key needed)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyBody,
    responses={
        503: {"model": ReadyBody, "description": "Redis unreachable (or no ready worker, if required)"}
    },
    summary="Readiness: Redis reachable, and how many workers are ready (no key needed)",
)
async def readyz(context: Context) -> Any:
    settings = context.settings
    try:
        async with asyncio.timeout(settings.redis_timeout):
            await context.redis.ping()
            if context.apikeys.redis is not context.redis:  # no key can be checked without it
                await context.apikeys.redis.ping()
            workers = await context.queries.workers(settings.worker_stale_seconds)
    except (RedisError, TimeoutError, OSError) as exc:
        log.warning("not ready: Redis is unreachable: %s", exc)
        body = {
            "status": "not ready",
            "redis": False,
            "workers_ready": 0,
            "detail": "Redis is unreachable",
        }  # either one
        return JSONResponse(body, status_code=503)
    ready = sum(1 for w in workers if w.get(keys.W_STATE) == keys.WORKER_READY)
    body = {"status": "ready", "redis": True, "workers_ready": ready, "detail": None}
    if settings.require_worker and ready == 0:
        body.update(status="not ready", detail="no worker is ready")
        return JSONResponse(body, status_code=503)
    return body


@router.get(
    "/workers",
    response_model=WorkerList,
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
    summary="The workers heard from recently: name, state, model and counters of each heartbeat (admin)",
)
async def workers(context: Context, _key: AdminKey) -> dict[str, Any]:
    return {"items": await context.queries.workers(context.settings.worker_stale_seconds)}


async def metrics_access(request: Request, context: Context, credentials: Credentials) -> None:
    """Any valid key, unless FLOWCLOUD_API_METRICS_PUBLIC=true opens /metrics to plain scrapers."""
    if not context.settings.metrics_public:
        await current_key(request, credentials)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        401: {"model": ErrorBody},
    },
    dependencies=[Depends(metrics_access)],
    summary="Prometheus metrics (any API key, or none with FLOWCLOUD_API_METRICS_PUBLIC=true)",
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
