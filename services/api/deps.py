"""FastAPI dependencies as ``Annotated`` aliases: the shared context, the caller's key, roles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.alerts import RuleStore
from flowcloud.registry import DeviceRegistry
from flowcloud.results import MaskStore
from flowcloud.settings import ApiSettings
from services.api.apikeys import ApiKey, ApiKeyStore
from services.api.auth import Authenticator
from services.api.metrics import AUTH_FAILURES
from services.api.queries import StreamQueries
from services.api.render import RenderCache

if TYPE_CHECKING:
    from services.api.cluster import ClusterView

STREAM_ID_PATTERN = f"^{keys.IDENTIFIER.pattern}$"  # stream ids are device ids


@dataclass
class ApiContext:
    """What the routes share, built by the app's lifespan."""

    settings: ApiSettings
    redis: Redis
    store: MaskStore
    queries: StreamQueries
    apikeys: ApiKeyStore
    auth: Authenticator
    registry: DeviceRegistry
    rules: RuleStore  # alert rules, in the control plane
    cluster: ClusterView | None = None  # None: the cluster view is off
    renders: RenderCache = field(default_factory=RenderCache)
    live_clients: int = 0


def app_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


async def get_context(request: Request) -> ApiContext:
    # async on purpose: FastAPI runs a plain-def dependency in a worker thread (costly per request).
    return app_context(request)


Context = Annotated[ApiContext, Depends(get_context)]

bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer fck_<id>.<secret>`")


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
    if credentials is None:
        AUTH_FAILURES.labels("missing").inc()
        raise unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    key = await app_context(request).auth.authenticate(credentials.credentials)
    if key is None:
        AUTH_FAILURES.labels("invalid").inc()
        raise unauthorized("the API key is unknown, revoked or malformed")
    return key


async def current_key(request: Request, credentials: Credentials) -> ApiKey:
    return await authenticate(request, credentials)


CurrentKey = Annotated[ApiKey, Depends(current_key)]


async def admin_key(key: CurrentKey) -> ApiKey:
    if not key.is_admin:
        AUTH_FAILURES.labels("forbidden").inc()
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this route needs an admin key")
    return key


AdminKey = Annotated[ApiKey, Depends(admin_key)]

StreamId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="stream id (the device id)")]


async def _stream_key(
    request: Request, stream_id: str, credentials: HTTPAuthorizationCredentials | None
) -> ApiKey:
    """The caller's key when the stream exists and the key may see it; 404 otherwise (another
    tenant's stream answers exactly like a stream that does not exist)."""
    key = await authenticate(request, credentials)
    exists, tenant = await app_context(request).queries.stream_tenant(stream_id)
    if not exists or not key.can_see(tenant):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stream {stream_id!r}")
    return key


async def visible_stream(request: Request, stream_id: StreamId, credentials: Credentials) -> str:
    """The stream id when the caller may see it. One dependency that calls the key check itself
    rather than a chain of them: each dependency costs on the hottest routes."""
    await _stream_key(request, stream_id, credentials)
    return stream_id


VisibleStream = Annotated[str, Depends(visible_stream)]


@dataclass(frozen=True)
class StreamViewer:
    """A visible stream and the key that sees it (a live view checks the key again while it runs)."""

    stream_id: str
    key: ApiKey


async def stream_viewer(request: Request, stream_id: StreamId, credentials: Credentials) -> StreamViewer:
    return StreamViewer(stream_id, await _stream_key(request, stream_id, credentials))


VisibleStreamViewer = Annotated[StreamViewer, Depends(stream_viewer)]
