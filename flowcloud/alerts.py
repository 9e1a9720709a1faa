"""Alert rules and firings: what the API manages and the alert evaluators (services/alerts) act on.

A rule watches one class on one stream or on all of a tenant's streams: its share above or below a
threshold, held for at least ``hold_frames`` results and ``hold_seconds`` of capture time, fires
once per such run, and not again within ``cooldown`` seconds of its last firing. Rules live in one
hash per tenant (control plane: never trimmed); firings are hashes named by (rule, stream, seq),
listed per tenant and queued on ``keys.FIRINGS_STREAM`` for webhook delivery.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.replies import text

Op = Literal["above", "below"]
OPS: tuple[Op, ...] = ("above", "below")
MAX_RULES_PER_TENANT = 1000
FIRINGS_KEPT = 10_000  # per tenant, newest first
FIRING_TTL = 30 * 24 * 3600

# Fields of a firing hash.
FIRING_FIELDS = (
    "id",
    "rule",
    "tenant",
    "stream",
    "seq",
    "class_name",
    "share",
    "op",
    "threshold",
    "capture_ts",
    "run_start",
    "run_frames",
    "webhook_url",
)
F_STATUS = "status"  # pending, delivered, dead or recorded (no webhook)
F_ATTEMPTS = "attempts"
F_LAST_ERROR = "last_error"
F_DELIVERED = "delivered_ts"
F_SECRET = "webhook_secret"
F_UNQUEUED = "unqueued"  # "1" from recording a firing until it is indexed and queued for delivery
STATUS_PENDING, STATUS_DELIVERED, STATUS_DEAD, STATUS_RECORDED = "pending", "delivered", "dead", "recorded"


class RuleError(ValueError):
    """A rule that cannot be stored as given."""


@dataclass
class AlertRule:
    id: str
    tenant: str
    class_name: str
    op: Op
    threshold: float
    stream: str | None = None  # None: every stream of the tenant
    hold_frames: int = 1
    hold_seconds: float = 0.0
    cooldown: float = 60.0
    webhook_url: str | None = None
    webhook_secret: str = field(default="", repr=False)
    created: float = 0.0

    def applies_to(self, stream: str) -> bool:
        return self.stream is None or self.stream == stream

    def holds(self, share: float) -> bool:
        return share > self.threshold if self.op == "above" else share < self.threshold

    def public(self) -> dict[str, Any]:
        """Everything but the webhook secret."""
        out = asdict(self)
        del out["webhook_secret"]
        return out

    @classmethod
    def parse(cls, raw: bytes | str) -> AlertRule:
        return cls(**json.loads(raw))


class RuleStore:
    """Rules in Redis, one hash per tenant."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def add(
        self,
        tenant: str,
        class_name: str,
        op: Op,
        threshold: float,
        stream: str | None = None,
        hold_frames: int = 1,
        hold_seconds: float = 0.0,
        cooldown: float = 60.0,
        webhook_url: str | None = None,
    ) -> AlertRule:
        """A new rule; its webhook secret is made here and shown to its creator."""
        if not keys.is_identifier(tenant):
            raise RuleError(f"tenant must be {keys.IDENTIFIER_RULE}")
        if await self.redis.hlen(keys.alert_rules(tenant)) >= MAX_RULES_PER_TENANT:
            raise RuleError(f"tenant {tenant!r} has {MAX_RULES_PER_TENANT} rules already")
        rule = AlertRule(
            id=f"r{secrets.token_hex(6)}",
            tenant=tenant,
            class_name=class_name,
            op=op,
            threshold=threshold,
            stream=stream,
            hold_frames=hold_frames,
            hold_seconds=hold_seconds,
            cooldown=cooldown,
            webhook_url=webhook_url,
            webhook_secret=secrets.token_urlsafe(32),
            created=time.time(),
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.alert_rules(tenant), rule.id, json.dumps(asdict(rule)))
        pipe.sadd(keys.ALERT_TENANTS, tenant)
        await pipe.execute()
        return rule

    async def rules(self, tenant: str) -> list[AlertRule]:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(keys.alert_rules(tenant)))
        return sorted((AlertRule.parse(v) for v in raw.values()), key=lambda r: (r.created, r.id))

    async def tenants(self) -> list[str]:
        found = cast(set[bytes], await self.redis.smembers(keys.ALERT_TENANTS))
        return sorted(text(t) for t in found)

    async def get(self, tenant: str, rule_id: str) -> AlertRule | None:
        raw = await self.redis.hget(keys.alert_rules(tenant), rule_id)
        return AlertRule.parse(raw) if raw is not None else None

    async def delete(self, tenant: str, rule_id: str) -> bool:
        return bool(await self.redis.hdel(keys.alert_rules(tenant), rule_id))


def firing_id(rule_id: str, stream: str, seq: int) -> str:
    """A firing is named by the result that fired it: evaluating that result again names it again."""
    return f"{rule_id}.{stream}.{seq}"


def firing_stream(firing_id: str) -> str:
    """The stream of a firing, from its id (rule ids have no dot; seqs are digits); "" for a
    malformed id, whose firing hash then reads as absent."""
    return firing_id.partition(".")[2].rpartition(".")[0]


def parse_firing(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A firing hash as JSON-ready values (the webhook secret left out)."""
    hidden = (F_SECRET, F_UNQUEUED)
    out: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items() if k.decode() not in hidden}
    for name in ("seq", "run_frames", F_ATTEMPTS):
        if name in out:
            out[name] = int(out[name])
    for name in ("share", "threshold", "capture_ts", "run_start", F_DELIVERED):
        if name in out:
            out[name] = float(out[name])
    out["webhook_url"] = out.get("webhook_url") or None
    return out


async def firings(
    redis: Redis, tenant: str, limit: int = 100, since: float | None = None, stream: str | None = None
) -> list[dict[str, Any]]:
    """A tenant's firings newest first (by capture time), optionally of one stream."""
    low = repr(since) if since is not None else "-inf"
    ids = cast(list[bytes], await redis.zrevrangebyscore(keys.tenant_firings(tenant), "+inf", low))
    out: list[dict[str, Any]] = []
    for start in range(0, len(ids), 256):  # a page of hashes per round trip
        pipe = redis.pipeline(transaction=False)
        for fid in ids[start : start + 256]:
            pipe.hgetall(keys.alert_firing(firing_stream(fid.decode()), fid.decode()))
        for fields in await pipe.execute():
            if fields:
                firing = parse_firing(fields)
                if stream is None or firing["stream"] == stream:
                    out.append(firing)
                    if len(out) >= limit:
                        return out
    return out
