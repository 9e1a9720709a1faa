"""The dashboard page and its script and style: static files with no data in them, so no key is
needed to load them; the page asks for a key and sends it with every API call it makes."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

router = APIRouter(tags=["dashboard"])

ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "results.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# Everything from this origin only (no CDN, no third party); the live overlay arrives as data: URLs.
PAGE_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def _static(name: str) -> bytes:
    return resources.files("services.api").joinpath("static", name).read_bytes()


@router.get(
    "/", include_in_schema=True, summary="Redirects to the dashboard", response_class=RedirectResponse
)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=status.HTTP_307_TEMPORARY_REDIRECT)


@router.get(
    "/dashboard", response_class=HTMLResponse, summary="The dashboard page (no key needed to load it)"
)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_static("dashboard.html"), headers=PAGE_HEADERS)


@router.get(
    "/dashboard/{asset}",
    response_class=Response,
    responses={
        200: {"content": {"text/javascript": {}, "text/css": {}}},
        404: {"description": "no such asset"},
    },
    summary="The dashboard's script and style",
)
async def dashboard_asset(
    asset: Annotated[str, Path(description="dashboard.js or dashboard.css")],
) -> Response:
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dashboard asset {asset!r}")
    return Response(_static(asset), media_type=media_type, headers=HEADERS)
