"""The device registry: which edge devices may stream, under which tenant, with which token.

Devices live in Redis (``keys.device(id)`` hashes plus the ``keys.DEVICES_INDEX`` set). A token
is shown once, when it is made (`add`, `rotate`); Redis keeps only a salted hash of it, and
`verify` compares in constant time (flowcloud.tokens). `revoke` and `rotate` publish an event on
``keys.DEVICE_EVENTS`` ("revoked <id>" / "rotated <id>") so that a gateway closes the device's
live session at once. A gateway that opens a session announces it there too (`announce_session`,
"connected <id> <session> <generation>"), so that a gateway replica still holding a session of
the device with an older lease generation (a half-open connection the edge has given up on)
closes it: one live session per device across all replicas. The generation (the session's lease,
services.gateway.lease) makes a late announcement harmless: it closes only older sessions, never
the newer one that overtook it. A revoked device stays listed (with its revocation time) and cannot stream
again: register it under a new id.

Used by the CLI (`flowcloud devices`), the gateway (`verify`) and the API (`/devices`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from flowcloud import keys, tokens
from flowcloud.protocol.handshake import (
    REJECT_BAD_TOKEN,
    REJECT_MALFORMED,
    REJECT_REVOKED,
    REJECT_UNKNOWN_DEVICE,
)
from flowcloud.replies import field_text, text

DEFAULT_TENANT = "default"
EVENT_REVOKED = "revoked"
EVENT_ROTATED = "rotated"
EVENT_CONNECTED = "connected"

# DeviceAuthError codes are the handshake's REJECT codes (one owner: flowcloud.protocol.handshake).
UNKNOWN_DEVICE = REJECT_UNKNOWN_DEVICE
BAD_TOKEN = REJECT_BAD_TOKEN
REVOKED = REJECT_REVOKED
MALFORMED = REJECT_MALFORMED


class RegistryError(Exception):
    """A registry operation that cannot be done (the message is fit for a person)."""


class DeviceExistsError(RegistryError):
    pass


class DeviceNotFoundError(RegistryError, LookupError):
    pass


class DeviceRevokedError(RegistryError):
    pass


class DeviceAuthError(Exception):
    """A device that may not stream; ``code`` is one of the handshake's REJECT codes."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Device:
    device_id: str
    tenant: str
    created: float
    rotated: float | None = None
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active": self.active}


def validate_device_id(device_id: str) -> str:
    """``device_id`` itself, or a RegistryError saying what a device id may contain."""
    if not keys.is_identifier(device_id):
        raise RegistryError(f"invalid device id {device_id!r}: use {keys.IDENTIFIER_RULE}")
    return device_id


@dataclass(frozen=True)
class DeviceEvent:
    kind: str  # EVENT_REVOKED, EVENT_ROTATED or EVENT_CONNECTED
    device_id: str
    session_id: str | None = None  # EVENT_CONNECTED: the new session
    generation: int = 0  # EVENT_CONNECTED: its lease generation (0: an older gateway's, without one)


def parse_event(message: bytes | str) -> DeviceEvent | None:
    """A DEVICE_EVENTS message, or None when it is not one."""
    kind, *words = text(message).split(" ")
    if kind in (EVENT_REVOKED, EVENT_ROTATED) and len(words) == 1 and words[0]:
        return DeviceEvent(kind, words[0])
    if kind == EVENT_CONNECTED and len(words) in (2, 3) and all(words):
        generation = words[2] if len(words) == 3 else "0"
        if not generation.isascii() or not generation.isdigit() or len(generation) > 20:
            return None
        return DeviceEvent(kind, words[0], words[1], int(generation))
    return None


def _device(device_id: str, fields: dict[Any, Any]) -> Device:
    rotated = field_text(fields, keys.D_ROTATED)
    revoked = field_text(fields, keys.D_REVOKED)
    return Device(
        device_id=device_id,
        tenant=field_text(fields, keys.D_TENANT) or DEFAULT_TENANT,
        created=float(field_text(fields, keys.D_CREATED) or 0.0),
        rotated=float(rotated) if rotated else None,
        revoked=float(revoked) if revoked else None,
    )


class DeviceRegistry:
    """Devices on one Redis (a ``redis.asyncio.Redis``; the caller owns and closes it)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def add(self, device_id: str, tenant: str = DEFAULT_TENANT) -> tuple[Device, str]:
        """Register a device; returns it and its token (the only time the token is seen)."""
        validate_device_id(device_id)
        if not keys.is_identifier(tenant):  # the same rule as API key tenants, so they can match
            raise RegistryError(f"invalid tenant {tenant!r}: use {keys.IDENTIFIER_RULE}")
        token = tokens.new_token()
        salt = tokens.new_salt()
        now = time.time()
        key = keys.device(device_id)

        async def register(pipe: Pipeline) -> None:
            if await pipe.exists(key):
                raise DeviceExistsError(f"device {device_id!r} is already registered")
            pipe.multi()
            pipe.hset(
                key,
                mapping={
                    keys.D_TENANT: tenant,
                    keys.D_SALT: salt,
                    keys.D_TOKEN_HASH: tokens.hash_token(token, salt),
                    keys.D_CREATED: repr(now),
                },
            )
            pipe.sadd(keys.DEVICES_INDEX, device_id)

        await self.redis.transaction(register, key)
        return Device(device_id, tenant, now), token

    async def get(self, device_id: str) -> Device | None:
        if not keys.is_identifier(device_id):
            return None
        fields = await self.redis.hgetall(keys.device(device_id))
        return _device(device_id, fields) if fields else None

    async def list(self, tenant: str | None = None) -> list[Device]:
        """All registered devices (revoked ones too), sorted by id."""
        ids = sorted(text(m) for m in await self.redis.smembers(keys.DEVICES_INDEX))
        pipe = self.redis.pipeline(transaction=False)
        for device_id in ids:
            pipe.hgetall(keys.device(device_id))
        out = [_device(i, f) for i, f in zip(ids, await pipe.execute(), strict=True) if f]
        return [d for d in out if tenant is None or d.tenant == tenant]

    async def announce_session(self, device_id: str, session_id: str, generation: int) -> None:
        """Tell every gateway that ``session_id``, of lease ``generation``, is the device's live session."""
        message = f"{EVENT_CONNECTED} {device_id} {session_id} {generation}"
        await self.redis.publish(keys.DEVICE_EVENTS, message)

    async def revoke(self, device_id: str) -> Device:
        """Revoke a device for good; its live session is closed (event on DEVICE_EVENTS)."""
        device = await self._existing(device_id)
        if device.revoked is not None:
            return device
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.device(device_id), keys.D_REVOKED, repr(now))
        pipe.publish(keys.DEVICE_EVENTS, f"{EVENT_REVOKED} {device_id}")
        await pipe.execute()
        return Device(device.device_id, device.tenant, device.created, device.rotated, now)

    async def rotate(self, device_id: str) -> tuple[Device, str]:
        """A new token for a device; the old one stops working and its live session is closed."""
        device = await self._existing(device_id)
        if device.revoked is not None:
            raise DeviceRevokedError(f"device {device_id!r} is revoked; register it under a new id")
        token = tokens.new_token()
        salt = tokens.new_salt()
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            keys.device(device_id),
            mapping={
                keys.D_SALT: salt,
                keys.D_TOKEN_HASH: tokens.hash_token(token, salt),
                keys.D_ROTATED: repr(now),
            },
        )
        pipe.publish(keys.DEVICE_EVENTS, f"{EVENT_ROTATED} {device_id}")
        await pipe.execute()
        return Device(device.device_id, device.tenant, device.created, now, None), token

    async def verify(self, device_id: str, token: str) -> Device:
        """The device when ``token`` is its current token; else DeviceAuthError with a REJECT code."""
        if not keys.is_identifier(device_id):
            raise DeviceAuthError(MALFORMED, "device id is not a valid id")
        if not isinstance(token, str) or not token or len(token) > tokens.MAX_TOKEN_LENGTH:
            raise DeviceAuthError(BAD_TOKEN, "token is missing or too long")
        fields = await self.redis.hgetall(keys.device(device_id))
        if not fields:
            raise DeviceAuthError(UNKNOWN_DEVICE, f"device {device_id!r} is not registered")
        device = _device(device_id, fields)
        if device.revoked is not None:
            raise DeviceAuthError(REVOKED, f"device {device_id!r} is revoked")
        salt = field_text(fields, keys.D_SALT) or ""
        expected = field_text(fields, keys.D_TOKEN_HASH) or ""
        if not expected or not tokens.verify_token(token, salt, expected):
            raise DeviceAuthError(BAD_TOKEN, f"wrong token for device {device_id!r}")
        return device

    async def _existing(self, device_id: str) -> Device:
        validate_device_id(device_id)
        device = await self.get(device_id)
        if device is None:
            raise DeviceNotFoundError(f"device {device_id!r} is not registered")
        return device
