"""/devices: the device registry (flowcloud.registry) over HTTP, for admin keys only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status

from flowcloud.registry import DeviceExistsError, DeviceNotFoundError, DeviceRevokedError, RegistryError
from services.api.deps import STREAM_ID_PATTERN, AdminKey, Context
from services.api.schemas import DeviceBody, DeviceCreate, DeviceList, DeviceWithToken, ErrorBody

router = APIRouter(prefix="/devices", tags=["devices"])

DeviceId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="the device id")]
ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorBody, "description": "not an admin key"},
    404: {"model": ErrorBody, "description": "no such device"},
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceWithToken,
    responses={**ERRORS, 409: {"model": ErrorBody, "description": "the id is taken"}},
    summary="Register a device; the answer holds its token, shown only this once",
)
async def add_device(body: DeviceCreate, context: Context, _admin: AdminKey) -> dict[str, Any]:
    try:
        device, token = await context.registry.add(body.device_id, body.tenant)
    except DeviceExistsError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except RegistryError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return {**device.to_dict(), "token": token}


@router.get("", response_model=DeviceList, responses=ERRORS, summary="All devices, revoked ones included")
async def list_devices(context: Context, _admin: AdminKey) -> dict[str, Any]:
    return {"items": [d.to_dict() for d in await context.registry.list()]}


@router.delete(
    "/{device_id}",
    response_model=DeviceBody,
    responses=ERRORS,
    summary="Revoke a device: its live session is closed and its token never works again",
)
async def revoke_device(device_id: DeviceId, context: Context, _admin: AdminKey) -> dict[str, Any]:
    try:
        device = await context.registry.revoke(device_id)
    except DeviceNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return device.to_dict()


@router.post(
    "/{device_id}/rotate",
    response_model=DeviceWithToken,
    responses={**ERRORS, 409: {"model": ErrorBody, "description": "the device is revoked"}},
    summary="A new token for a device; the old one stops working",
)
async def rotate_device(device_id: DeviceId, context: Context, _admin: AdminKey) -> dict[str, Any]:
    try:
        device, token = await context.registry.rotate(device_id)
    except DeviceNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except DeviceRevokedError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return {**device.to_dict(), "token": token}
