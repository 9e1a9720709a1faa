"""The query API: ``create_app(settings)`` builds the FastAPI app; ``build_server`` and ``serve`` run it.

In-process use (``flowcloud up``)::

    server = build_server(ApiSettings(port=0))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve())
        ...
        server.should_exit = True   # drains and returns
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowcloud import __version__
from flowcloud.alerts import RuleStore
from flowcloud.redis_client import connect_async
from flowcloud.registry import DeviceRegistry
from flowcloud.results import MaskStore
from flowcloud.settings import ApiSettings
from services.api.apikeys import ApiKeyStore
from services.api.auth import Authenticator
from services.api.cluster import ClusterUnavailableError, ClusterView
from services.api.deps import ApiContext, CurrentKey
from services.api.metrics import REDIS_ERRORS, RequestMetrics
from services.api.queries import StreamQueries
from services.api.routes import alerts, cluster, dashboard, devices, health, search, streams

log = logging.getLogger(__name__)

MAX_REDIS_CONNECTIONS = 64
GRACEFUL_SHUTDOWN_SECONDS = 5  # open /live responses are cut after this on shutdown


def redis_client(settings: ApiSettings, url: str, cluster: bool = False) -> Redis:
    """A bounded pool: a burst of requests waits up to ``redis_timeout`` for a connection. On a
    Redis Cluster the bound is per node, and a burst beyond it is answered 503 at once."""
    if cluster:
        return connect_async(
            url,
            cluster=True,
            max_connections=MAX_REDIS_CONNECTIONS,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
        )
    pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_REDIS_CONNECTIONS,
        timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
    )
    return Redis(connection_pool=pool)


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    REDIS_ERRORS.inc()
    log.warning("%s %s: Redis is unavailable: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "Redis is unavailable; try again shortly", "error": "redis_unavailable"}, status_code=503
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error", "error": "internal"}, status_code=500)


def cluster_view(settings: ApiSettings) -> ClusterView | None:
    """The cluster view when it is on and a Kubernetes API is there; off (None) outside a cluster."""
    if not settings.cluster_view:
        return None
    try:
        return ClusterView.from_settings(settings)
    except ClusterUnavailableError as exc:
        log.warning("cluster view off: %s", exc)
        return None


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_client(settings, settings.redis_url, settings.redis_cluster)
        # Keys, devices and rules live in the control-plane Redis (the same client on one machine):
        # one plain Redis, never a cluster (flowcloud.settings).
        control = (
            redis_client(settings, settings.control_url)
            if settings.control_url != settings.redis_url
            else redis
        )
        store = MaskStore(redis, results_shards=settings.frame_shards)
        apikeys = ApiKeyStore(control)
        admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        app.state.context = ApiContext(
            settings=settings,
            redis=redis,
            store=store,
            queries=StreamQueries(
                redis,
                store,
                settings.live_window,
                tenant_ttl=settings.tenant_cache_seconds,
                latest_ttl=settings.latest_cache_ms / 1000.0,
            ),
            apikeys=apikeys,
            auth=Authenticator(apikeys, admin, settings.auth_cache_seconds),
            registry=DeviceRegistry(control),
            rules=RuleStore(control),
            cluster=cluster_view(settings),
        )
        log.info("query API starting: %s", settings.describe())
        if admin is None:
            log.info("no FLOWCLOUD_API_ADMIN_KEY: only keys made with 'flowcloud apikeys add' work")
        try:
            yield
        finally:
            if app.state.context.cluster is not None:
                app.state.context.cluster.close()
            for client in {id(c): c for c in (redis, control)}.values():
                await client.aclose()  # type: ignore[attr-defined,unused-ignore]  # types-redis predates aclose
                if isinstance(client, Redis):  # a cluster client closed every node's connections
                    await client.connection_pool.disconnect()

    app = FastAPI(
        title="FlowCloud query API",
        version=__version__,
        description="Streams, segmentation results, live overlays and the device registry. "
        "Every route but /healthz, /readyz and the dashboard page needs `Authorization: Bearer <API key>`, "
        "and so does this document (/openapi.json).",
        lifespan=lifespan,
        # No Swagger UI or ReDoc: they load scripts from a CDN (the dashboard's policy allows none)
        # and a browser page cannot send the key that the document needs.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_key: CurrentKey) -> dict[str, Any]:
        return app.openapi()

    app.add_middleware(RequestMetrics)
    app.add_exception_handler(RedisConnectionError, _redis_unavailable)
    app.add_exception_handler(RedisTimeoutError, _redis_unavailable)
    app.add_exception_handler(RedisError, _internal_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(streams.router)
    app.include_router(search.router)
    app.include_router(alerts.router)
    app.include_router(health.router)
    app.include_router(devices.router)
    app.include_router(dashboard.router)
    app.include_router(cluster.router)
    return app


def build_server(settings: ApiSettings | None = None, app: FastAPI | None = None) -> uvicorn.Server:
    """A uvicorn server for the app, one worker; ``await server.serve()`` runs it in this loop."""
    settings = settings or ApiSettings()
    config = uvicorn.Config(
        app or create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )
    return uvicorn.Server(config)


def serve(settings: ApiSettings | None = None) -> None:
    """Run the API until SIGINT/SIGTERM (uvicorn drains open requests, then returns)."""
    build_server(settings).run()  # picks uvloop and httptools when installed
