"""/search and /streams/{id}/aggregates: mask results by what they contain, across the streams a
key may see, and per-class share aggregates over a window (services.api.search)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status

from flowcloud import share_index
from services.api.deps import Context, CurrentKey, VisibleStream
from services.api.routes.streams import _unix as unix
from services.api.schemas import AggregateBody, ErrorBody, MaskPage
from services.api.search import QueryError, Resolution, ShareSearch, visible_streams

router = APIRouter(tags=["search"])

MAX_PAGE = 100
THRESHOLDS = ", ".join(map(str, share_index.LEVELS[1:]))
DEFAULT_WINDOW = 3600.0  # seconds an aggregate covers when no since is given

ClassName = Annotated[
    str, Query(alias="class", description="a class name of the label set, e.g. person, car, road")
]
MinShare = Annotated[
    float, Query(ge=0.0, le=1.0, description="fraction of the pixels the class covers at least (0: present)")
]
Since = Annotated[
    datetime | None, Query(description="only results captured at or after (ISO 8601 or unix seconds)")
]
Until = Annotated[
    datetime | None, Query(description="only results captured before (ISO 8601 or unix seconds)")
]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="results per page")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page: older results")]
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such stream"},
    422: {"model": ErrorBody, "description": "an unknown class, a bad cursor or a window too long"},
}


def searcher(context: Context) -> ShareSearch:
    return ShareSearch(context.redis, context.store)


@router.get(
    "/search",
    response_model=MaskPage,
    responses=ERRORS,
    summary="Results whose share of a class is at least min_share, across the streams the key may see",
)
async def search(
    context: Context,
    key: CurrentKey,
    class_name: ClassName,
    min_share: MinShare = 0.0,
    since: Since = None,
    until: Until = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> dict[str, Any]:
    streams = await visible_streams(context.redis, key)
    try:
        return await searcher(context).page(
            streams, class_name, min_share, limit, unix(since), unix(until), cursor
        )
    except QueryError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


@router.get(
    "/streams/{stream_id}/aggregates",
    response_model=AggregateBody,
    responses=ERRORS,
    summary="Per-class mean and max share, and time above a threshold, per minute or hour",
)
async def aggregates(
    stream_id: VisibleStream,
    context: Context,
    since: Since = None,
    until: Until = None,
    resolution: Annotated[Resolution, Query(description="minute or hour")] = "minute",
    threshold: Annotated[
        float,
        Query(
            description=f"share that counts as 'above'; one of {', '.join(map(str, share_index.LEVELS[1:]))}"
        ),
    ] = 0.05,
) -> dict[str, Any]:
    if threshold not in share_index.LEVELS[1:]:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"threshold {threshold} is not indexed; choose one of {THRESHOLDS}",
        )
    end = unix(until)
    if end is None:
        end = await context.queries._now()
    start = unix(since)
    if start is None:
        start = end - DEFAULT_WINDOW
    try:
        buckets = await searcher(context).aggregates(
            stream_id, start, end, resolution, share_index.LEVELS.index(threshold)
        )
    except QueryError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return {
        "stream": stream_id,
        "since": start,
        "until": end,
        "resolution": resolution,
        "threshold": threshold,
        "buckets": buckets,
    }
