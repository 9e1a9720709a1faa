"""API keys: bearer tokens with a role (admin or reader) and a tenant, stored hashed in Redis.

A key reads ``fck_<id>.<secret>``: the id names the ``keys.apikey(id)`` hash, so verifying is one
lookup plus a constant-time hash comparison (flowcloud.tokens); Redis never holds the secret. A
revoked key stays listed with its revocation time and never works again.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from redis.asyncio import Redis

from flowcloud import keys, tokens
from flowcloud.replies import field_text, text

Role = Literal["admin", "reader"]
ROLES: tuple[str, ...] = get_args(Role)
ALL_TENANTS = "*"  # the tenant of the bootstrap admin key
TOKEN_PREFIX = "fck_"
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
BOOTSTRAP_ID = "bootstrap"


class ApiKeyError(ValueError):
    """A key operation that cannot be done (the message is fit for a person)."""


class ApiKeyNotFoundError(ApiKeyError, LookupError):
    pass


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    role: Role
    tenant: str
    created: float
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can_see(self, tenant: str | None) -> bool:
        """Admins see every tenant; a reader only its own."""
        return self.is_admin or self.tenant == ALL_TENANTS or (tenant is not None and tenant == self.tenant)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active": self.active}


def validate_role(role: str) -> Role:
    if role not in ROLES:
        raise ApiKeyError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def validate_tenant(tenant: str) -> str:
    if tenant != ALL_TENANTS and not keys.is_identifier(tenant):
        raise ApiKeyError(f"invalid tenant {tenant!r}: use {keys.IDENTIFIER_RULE} (or * for all tenants)")
    return tenant


def split_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None. Bounded before any parsing."""
    if not token or len(token) > tokens.MAX_TOKEN_LENGTH or not token.startswith(TOKEN_PREFIX):
        return None
    key_id, dot, secret = token[len(TOKEN_PREFIX) :].partition(".")
    if not dot or not secret or KEY_ID_PATTERN.fullmatch(key_id) is None:
        return None
    return key_id, secret


def _apikey(key_id: str, fields: Mapping[Any, Any]) -> ApiKey:
    revoked = field_text(fields, keys.A_REVOKED)
    return ApiKey(
        key_id=key_id,
        role=validate_role(field_text(fields, keys.A_ROLE) or "reader"),
        tenant=field_text(fields, keys.A_TENANT) or "",
        created=float(field_text(fields, keys.A_CREATED) or 0.0),
        revoked=float(revoked) if revoked else None,
    )


class ApiKeyStore:
    """API keys on one Redis (a ``redis.asyncio.Redis`` without decode_responses; caller closes it)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def add(self, role: str, tenant: str) -> tuple[ApiKey, str]:
        """Make a key; returns it and its token (the only time the token is seen)."""
        role = validate_role(role)
        tenant = validate_tenant(tenant)
        if tenant == ALL_TENANTS and role != "admin":
            raise ApiKeyError("only an admin key may have tenant *")
        secret = tokens.new_token()
        salt = tokens.new_salt()
        now = time.time()
        while True:
            key_id = secrets.token_hex(6)
            fields = {
                keys.A_ROLE: role,
                keys.A_TENANT: tenant,
                keys.A_SALT: salt,
                keys.A_SECRET_HASH: tokens.hash_token(secret, salt),
                keys.A_CREATED: repr(now),
            }
            # HSETNX on the salt claims the id atomically; a 48-bit id almost never collides.
            if await self.redis.hsetnx(keys.apikey(key_id), keys.A_SALT, salt):
                break
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.apikey(key_id), mapping=fields)  # type: ignore[arg-type]
        pipe.sadd(keys.APIKEYS_INDEX, key_id)
        await pipe.execute()
        return ApiKey(key_id, role, tenant, now), f"{TOKEN_PREFIX}{key_id}.{secret}"

    async def get(self, key_id: str) -> ApiKey | None:
        if KEY_ID_PATTERN.fullmatch(key_id) is None:
            return None
        fields = await self.redis.hgetall(keys.apikey(key_id))
        return _apikey(key_id, fields) if fields else None

    async def list(self) -> list[ApiKey]:
        """All keys (revoked ones too), oldest first."""
        ids = sorted(text(m) for m in await self.redis.smembers(keys.APIKEYS_INDEX))
        pipe = self.redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(keys.apikey(key_id))
        found = [_apikey(i, f) for i, f in zip(ids, await pipe.execute(), strict=True) if f]
        return sorted(found, key=lambda k: (k.created, k.key_id))

    async def revoke(self, key_id: str) -> ApiKey:
        key = await self.get(key_id)
        if key is None:
            raise ApiKeyNotFoundError(f"API key {key_id!r} does not exist")
        if key.revoked is not None:
            return key
        now = time.time()
        await self.redis.hset(keys.apikey(key_id), keys.A_REVOKED, repr(now))
        return ApiKey(key.key_id, key.role, key.tenant, key.created, now)

    async def verify(self, token: str) -> ApiKey | None:
        """The active key ``token`` belongs to, or None (unknown, wrong secret, revoked, malformed)."""
        parts = split_token(token)
        if parts is None:
            return None
        key_id, secret = parts
        fields = await self.redis.hgetall(keys.apikey(key_id))
        if not fields:
            return None
        salt = field_text(fields, keys.A_SALT) or ""
        expected = field_text(fields, keys.A_SECRET_HASH) or ""
        if not expected or not tokens.verify_token(secret, salt, expected):
            return None
        try:
            key = _apikey(key_id, fields)
        except ValueError:
            return None  # a damaged hash authenticates nobody
        return key if key.active else None
