"""/alerts: alert rules (admin keys manage them) and their firings (every key sees its tenant's).

Rules and firings are flowcloud.alerts; the `flowcloud alerts` service evaluates the rules."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status

from flowcloud import alerts, keys
from flowcloud.alerts import RuleError
from services.api.apikeys import ALL_TENANTS, ApiKey
from services.api.deps import STREAM_ID_PATTERN, AdminKey, Context, CurrentKey
from services.api.schemas import (
    AlertRuleCreate,
    AlertRuleList,
    AlertRuleWithSecret,
    ErrorBody,
    FiringList,
)
from services.api.search import QueryError, check_class

router = APIRouter(prefix="/alerts", tags=["alerts"])

TenantQuery = Annotated[
    str | None,
    Query(pattern=STREAM_ID_PATTERN, description="a tenant (admin keys; default: all)"),
]
ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorBody, "description": "not an admin key"},
    404: {"model": ErrorBody, "description": "no such rule"},
    422: {"model": ErrorBody, "description": "an unknown class or tenant"},
}


def _tenants_of(key: ApiKey, tenant: str | None) -> list[str] | None:
    """The tenants a key asks about: None means every tenant (admins only)."""
    if key.is_admin or key.tenant == ALL_TENANTS:
        return [tenant] if tenant else None
    return [key.tenant]


@router.post(
    "/rules",
    status_code=status.HTTP_201_CREATED,
    response_model=AlertRuleWithSecret,
    responses=ERRORS,
    summary="Add an alert rule; the answer holds its webhook secret, shown only this once",
)
async def add_rule(body: AlertRuleCreate, context: Context, admin: AdminKey) -> dict[str, Any]:
    try:
        check_class(body.class_name)
    except QueryError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if body.stream is not None and not keys.is_identifier(body.stream):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"stream must be {keys.IDENTIFIER_RULE}")
    try:
        rule = await context.rules.add(
            tenant=body.tenant or admin.tenant,
            class_name=body.class_name,
            op=body.op,
            threshold=body.threshold,
            stream=body.stream,
            hold_frames=body.hold_frames,
            hold_seconds=body.hold_seconds,
            cooldown=body.cooldown,
            webhook_url=body.webhook_url,
        )
    except RuleError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return {**rule.public(), "webhook_secret": rule.webhook_secret}


@router.get("/rules", response_model=AlertRuleList, responses=ERRORS, summary="Alert rules (admin keys)")
async def list_rules(context: Context, admin: AdminKey, tenant: TenantQuery = None) -> dict[str, Any]:
    tenants = [tenant] if tenant else await context.rules.tenants()
    return {"items": [r.public() for t in tenants for r in await context.rules.rules(t)]}


@router.delete(
    "/rules/{rule_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=ERRORS,
    summary="Delete an alert rule (its firings stay)",
)
async def delete_rule(
    rule_id: str,
    context: Context,
    admin: AdminKey,
    tenant: Annotated[str, Query(pattern=STREAM_ID_PATTERN, description="the rule's tenant")],
) -> None:
    if not await context.rules.delete(tenant, rule_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rule {rule_id!r} in tenant {tenant!r}")


@router.get(
    "/firings", response_model=FiringList, summary="Alert firings newest first (a reader sees its tenant's)"
)
async def list_firings(
    context: Context,
    key: CurrentKey,
    tenant: TenantQuery = None,
    stream: Annotated[str | None, Query(pattern=STREAM_ID_PATTERN, description="only this stream's")] = None,
    since: Annotated[float | None, Query(description="only firings of results captured at or after")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="firings at most")] = 100,
) -> dict[str, Any]:
    tenants = _tenants_of(key, tenant)
    if tenants is None:
        tenants = await context.rules.tenants()
    items: list[dict[str, Any]] = []
    for one in tenants:
        items += await alerts.firings(context.redis, one, limit, since, stream)
    items.sort(key=lambda f: f["capture_ts"], reverse=True)
    return {"items": items[:limit]}
