"""/streams: the streams a caller may see, their mask results, images, class shares and live view."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from flowcloud import mask_formats
from flowcloud.labels import LABEL_SETS
from flowcloud.results import MaskResult
from services.api import render, search
from services.api.deps import (
    ApiContext,
    Context,
    CurrentKey,
    StreamViewer,
    VisibleStream,
    VisibleStreamViewer,
    app_context,
)
from services.api.metrics import LIVE_REVOKED, LIVE_VIEWERS
from services.api.queries import stage_summary
from services.api.schemas import ErrorBody, MaskBody, MaskPage, StatsBody, StreamBody, StreamList

log = logging.getLogger(__name__)

router = APIRouter(prefix="/streams", tags=["streams"])

MAX_PAGE = 100
KEEPALIVE_SECONDS = 15.0
MJPEG_BOUNDARY = "flowcloudframe"
TOO_MANY_VIEWERS = "too many live viewers; try again later"

Format = Literal["json", "labels", "color", "overlay", "coco-rle", "polygons"]
FormatQuery = Annotated[
    Format,
    Query(
        description="json: metadata; labels: the lossless palette PNG of class ids; "
        "color: an RGB PNG in the label set's colours; overlay: a JPEG of the mask on its frame; "
        "coco-rle: one COCO RLE per class present (JSON); polygons: outlines per class (JSON)"
    ),
]
ToleranceQuery = Annotated[
    float,
    Query(ge=0.0, le=mask_formats.MAX_TOLERANCE, description="polygons: simplification tolerance, pixels"),
]
EXPORTS = ("coco-rle", "polygons")
Since = Annotated[
    datetime | None, Query(description="only results captured at or after (ISO 8601 or unix seconds)")
]
Until = Annotated[
    datetime | None, Query(description="only results captured before (ISO 8601 or unix seconds)")
]

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such stream or result"}
}
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": MaskBody,
        "description": "metadata (json), or the mask as an image",
        "content": {"image/png": {}, "image/jpeg": {}},
    },
    404: {"model": ErrorBody, "description": "no such stream or result"},
    410: {"model": ErrorBody, "description": "overlay: the frame has left the recent-frames window"},
}


def _unix(when: datetime | None) -> float | None:
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _seq_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isdigit():
        raise search.QueryError(f"malformed cursor {cursor!r}: pass the next_cursor of the previous page")
    return int(cursor)


async def _render(context: ApiContext, result: MaskResult, fmt: Format, tolerance: float = 0.0) -> Response:
    if fmt == "labels":
        return Response(result.labels_png, media_type=render.PNG)
    if fmt in EXPORTS:
        key = (result.stream, result.seq, f"{fmt}:{tolerance!r}")
        body = context.renders.get(key)
        if body is None:
            body = await asyncio.to_thread(render.export_json, result, fmt, tolerance)
            context.renders.put(key, body)
        return Response(body, media_type="application/json")
    cache_key = (result.stream, result.seq, fmt)
    cached = context.renders.get(cache_key)
    if cached is None:
        if fmt == "color":
            cached = await asyncio.to_thread(render.color_png, result)
        else:
            frame, window = await context.queries.recent_frame(result.stream, result.seq)
            if frame is None:
                held = f"it holds frames {window[0]}..{window[1]}" if window else "it is empty"
                raise HTTPException(
                    status.HTTP_410_GONE,
                    f"frame {result.seq} of stream {result.stream!r} is no longer in the recent-frames "
                    f"window ({held}); ask for format=color or format=labels",
                )
            cached = await asyncio.to_thread(render.overlay_jpeg, result, frame)
        context.renders.put(cache_key, cached)
    return Response(cached, media_type=render.PNG if fmt == "color" else render.JPEG)


async def _mask(
    context: ApiContext, result: MaskResult | None, fmt: Format, missing: str, tolerance: float = 0.0
) -> Response:
    if result is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, missing)
    if fmt != "json":
        return await _render(context, result, fmt, tolerance)
    # Encoded once per result and kept, not by FastAPI's generic encoder: this is the hottest route.
    body = context.renders.get((result.stream, result.seq, fmt))
    if body is None:
        body = json.dumps(result.metadata()).encode()
        context.renders.put((result.stream, result.seq, fmt), body)
    return Response(body, media_type="application/json")


# Registered first: routes are tried in order, and this is the one clients poll.
@router.get(
    "/{stream_id}/masks/latest",
    responses=IMAGE_RESPONSES,
    summary="The newest mask result: metadata, or an image (?format=)",
)
async def latest_mask(
    stream_id: VisibleStream, request: Request, format: FormatQuery = "json", tolerance: ToleranceQuery = 0.0
) -> Response:
    context = app_context(request)
    result = await context.queries.latest(stream_id)
    return await _mask(context, result, format, f"stream {stream_id!r} has no result yet", tolerance)


@router.get("", response_model=StreamList, summary="The streams the caller may see, newest activity first")
async def list_streams(context: Context, key: CurrentKey) -> dict[str, Any]:
    ids = await search.visible_streams(context.redis, key)  # a reader's tenant index only
    infos = await context.queries.streams(ids)
    return {"items": [i.to_dict() for i in infos if key.can_see(i.tenant)]}


@router.get("/{stream_id}", response_model=StreamBody, responses=NOT_FOUND, summary="One stream")
async def get_stream(stream_id: VisibleStream, context: Context) -> dict[str, Any]:
    infos = await context.queries.streams([stream_id])
    if not infos:  # its description expired since the visibility check
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stream {stream_id!r}")
    return infos[0].to_dict()


@router.get(
    "/{stream_id}/masks", response_model=MaskPage, responses=NOT_FOUND, summary="Mask results, newest first"
)
async def list_masks(
    stream_id: VisibleStream,
    context: Context,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="results per page")] = 50,
    cursor: Annotated[
        str | None, Query(description="next_cursor of the previous page: results older than it")
    ] = None,
    since: Since = None,
    until: Until = None,
    class_name: Annotated[
        str | None, Query(alias="class", description="only results with this class (see min_share)")
    ] = None,
    min_share: Annotated[
        float, Query(ge=0.0, le=1.0, description="with class: the share it covers at least (0: present)")
    ] = 0.0,
) -> dict[str, Any]:
    try:
        if class_name is not None:  # through the class-share index
            return await search.ShareSearch(context.redis, context.store).page(
                [stream_id], class_name, min_share, limit, _unix(since), _unix(until), cursor
            )
        before = _seq_cursor(cursor)
    except search.QueryError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    items, next_seq = await context.queries.page(
        stream_id, limit, before=before, since=_unix(since), until=_unix(until)
    )
    return {
        "items": [r.metadata() for r in items],
        "next_cursor": str(next_seq) if next_seq is not None else None,
    }


@router.get(
    "/{stream_id}/edge-masks",
    response_model=MaskPage,
    responses=NOT_FOUND,
    summary="Masks the edge made itself while the cloud was unreachable (producer edge), newest first",
)
async def list_edge_masks(
    stream_id: VisibleStream,
    context: Context,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="results")] = 50,
) -> dict[str, Any]:
    items = await context.queries.store.edge_masks(stream_id, limit)
    return {"items": [r.metadata() for r in items], "next_cursor": None}


@router.get(
    "/{stream_id}/masks/{frame}",
    responses=IMAGE_RESPONSES,
    summary="The mask result of one frame: metadata, or an image (?format=)",
)
async def frame_mask(
    stream_id: VisibleStream,
    frame: Annotated[int, Path(ge=0, description="the frame's seq")],
    context: Context,
    format: FormatQuery = "json",
    tolerance: ToleranceQuery = 0.0,
) -> Response:
    result = await context.store.get(stream_id, frame)
    missing = f"stream {stream_id!r} has no result for frame {frame}"
    return await _mask(context, result, format, missing, tolerance)


@router.get(
    "/{stream_id}/stats",
    response_model=StatsBody,
    responses=NOT_FOUND,
    summary="Per-class pixel shares and per-stage times over time, sampled evenly over the window",
)
async def stream_stats(
    stream_id: VisibleStream,
    context: Context,
    points: Annotated[int, Query(ge=1, le=500, description="samples at most")] = 120,
    since: Since = None,
    until: Until = None,
) -> dict[str, Any]:
    results = await context.queries.sampled(stream_id, points, since=_unix(since), until=_unix(until))
    present = sorted({cls for r in results for cls in r.shares})
    label_set_name = results[-1].label_set if results else None
    classes: list[dict[str, Any]] = []
    if label_set_name in LABEL_SETS:
        label_set = LABEL_SETS[label_set_name]
        classes = [
            {"id": c, "name": label_set.class_names[c], "color": tuple(int(v) for v in label_set.palette[c])}
            for c in present
            if c < label_set.num_classes
        ]
    n = len(results) or 1
    live = [r for r in results if not r.backfill]  # a backfilled frame waited out an outage: minutes
    return {
        "stream": stream_id,
        "label_set": label_set_name,
        "classes": classes,
        "mean": {str(c): sum(r.shares.get(c, 0.0) for r in results) / n for c in present},
        "series": [
            {
                "seq": r.seq,
                "capture_ts": r.capture_ts,
                "latency": r.latency,
                "shares": {str(k): v for k, v in r.shares.items()},
                "stages": r.stages(),
                "backfill": r.backfill,
            }
            for r in results
        ],
        "stages": stage_summary(live),
        "backfill_stages": stage_summary([r for r in results if r.backfill]),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _mjpeg_part(image: bytes, seq: int) -> bytes:
    head = f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n"
    return (head + f"X-Frame-Seq: {seq}\r\n\r\n").encode() + image + b"\r\n"


async def _live_image(context: ApiContext, result: MaskResult) -> tuple[bytes, bool]:
    """The overlay JPEG when the frame is still held, else the colour mask as JPEG."""
    cache_key = (result.stream, result.seq, "live")
    cached = context.renders.get(cache_key)
    if cached is not None:
        return cached[1:], cached[0] == 1
    frame, _window = await context.queries.recent_frame(result.stream, result.seq)
    if frame is not None:
        data = await asyncio.to_thread(render.overlay_jpeg, result, frame)
    else:
        data = await asyncio.to_thread(lambda: render.jpeg(render.color_mask(result)))
    context.renders.put(cache_key, bytes([frame is not None]) + data)
    return data, frame is not None


async def _live_events(
    request: Request, context: ApiContext, viewer: StreamViewer, fps: float, mjpeg: bool
) -> AsyncIterator[bytes]:
    stream_id = viewer.stream_id
    interval = 1.0 / min(fps, context.settings.live_max_fps)
    check_every = context.settings.live_key_check_seconds
    deadline = time.monotonic() + context.settings.live_max_seconds
    last_seq: int | None = None
    last_sent = next_frame = next_check = time.monotonic()
    previous_capture: float | None = None
    try:
        if not mjpeg:
            yield f"retry: 2000\n: live overlay of {stream_id}\n\n".encode()
        # Starlette also cancels this iterator when the client leaves (ASGI < 2.4 servers such as
        # uvicorn); the check ends an idle stream on servers that report it only on a failed send.
        while time.monotonic() < deadline and not await request.is_disconnected():
            if time.monotonic() >= next_check:
                # The key was checked when the view began; a revocation must also end the view.
                if not await context.auth.still_valid(viewer.key):
                    LIVE_REVOKED.inc()
                    log.info("live view of %s ends: API key %s was revoked", stream_id, viewer.key.key_id)
                    if not mjpeg:
                        yield _sse("error", {"detail": "the API key was revoked", "error": "key_revoked"})
                    return
                next_check = time.monotonic() + check_every
            if time.monotonic() >= next_frame:
                next_frame = time.monotonic() + interval
                # Through the shared latest cache: viewers of one stream cost one read per cache period.
                result = await context.queries.latest(stream_id)
                if result is not None and result.seq != last_seq:
                    last_seq = result.seq
                    image, blended = await _live_image(context, result)
                    if mjpeg:
                        yield _mjpeg_part(image, result.seq)
                    else:
                        gap = result.capture_ts - previous_capture if previous_capture is not None else None
                        yield _sse(
                            "mask",
                            {
                                "seq": result.seq,
                                "capture_ts": result.capture_ts,
                                "latency": result.latency,
                                "stages": result.stages(),
                                "fps": 1.0 / gap if gap else None,
                                "overlay": blended,
                                "width": result.width,
                                "height": result.height,
                                "shares": {str(k): v for k, v in result.shares.items()},
                                "model": f"{result.model} {result.model_version}",
                                "producer": result.producer,
                                "backfill": result.backfill,
                                "jpeg": base64.b64encode(image).decode(),
                            },
                        )
                    previous_capture = result.capture_ts
                    last_sent = time.monotonic()
                elif not mjpeg and time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                    yield b": keepalive\n\n"
                    last_sent = time.monotonic()
            await asyncio.sleep(max(0.0, min(next_frame, next_check) - time.monotonic()))
    except RedisError as exc:
        log.warning("live view of %s ends: Redis failed: %s", stream_id, exc)
        if not mjpeg:
            yield _sse("error", {"detail": "Redis is unavailable", "error": "redis_unavailable"})


class LiveResponse(StreamingResponse):
    """A live view that holds one of the ``live_max_clients`` places for exactly as long as it runs.

    The place is taken when the server starts the response (no await between the check and the
    count, so concurrent requests cannot both take the last place) and given back in the same
    frame's ``finally``: once, whether the stream ends, the client leaves, or the task is
    cancelled. A response the server never starts never counted. A request that lost the race
    for the last place after the route's early check gets the same 503.
    """

    def __init__(self, context: ApiContext, content: AsyncIterator[bytes], media_type: str) -> None:
        super().__init__(
            content, media_type=media_type, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.context.live_clients >= self.context.settings.live_max_clients:
            await JSONResponse({"detail": TOO_MANY_VIEWERS}, status.HTTP_503_SERVICE_UNAVAILABLE)(
                scope, receive, send
            )
            return
        self.context.live_clients += 1
        LIVE_VIEWERS.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.context.live_clients -= 1
            LIVE_VIEWERS.dec()


@router.get(
    "/{stream_id}/live",
    responses={
        200: {
            "description": "sse: server-sent events ('mask' events: JSON with a base64 JPEG 'jpeg' field, "
            "latency and fps); mjpeg: multipart/x-mixed-replace JPEG frames",
            "content": {"text/event-stream": {}, f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}": {}},
        },
        404: {"model": ErrorBody, "description": "no such stream"},
        503: {"model": ErrorBody, "description": "too many live viewers"},
    },
    summary="A live overlay of the stream's newest masks (SSE or MJPEG); it ends when its key is revoked",
)
async def live(
    request: Request,
    viewer: VisibleStreamViewer,
    context: Context,
    format: Annotated[Literal["sse", "mjpeg"], Query(description="sse or mjpeg")] = "sse",
    fps: Annotated[float, Query(gt=0, le=60, description="images per second at most")] = 5.0,
) -> StreamingResponse:
    if context.live_clients >= context.settings.live_max_clients:  # early; LiveResponse decides
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, TOO_MANY_VIEWERS)
    await context.redis.ping()  # Redis down: a 503 now, not a 200 stream that ends at once
    mjpeg = format == "mjpeg"
    media_type = f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}" if mjpeg else "text/event-stream"
    return LiveResponse(context, _live_events(request, context, viewer, fps, mjpeg), media_type)
