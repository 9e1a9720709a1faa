"""Evaluates alert rules on results as they are written: a consumer of ``keys.RESULTS_STREAM`` in
group ``keys.ALERTS_GROUP``, so evaluators scale out and a dead one's results are taken over.

Each (result, rule) is one Lua script on the rule's state for that stream: it skips a result at or
below the last seq evaluated (a redelivery after a crash, or a late result), advances the run, and
records a firing (hash, tenant index, delivery queue) in the same atomic step. A result evaluated
twice therefore never fires twice, and a firing is never lost between deciding and recording it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from flowcloud import alerts, keys
from flowcloud.alerts import AlertRule, RuleStore
from flowcloud.groups import ensure_group
from flowcloud.replies import text

from . import metrics

log = logging.getLogger(__name__)

STATE_TTL = 7 * 24 * 3600  # a rule's state on a stream silent this long is forgotten

# KEYS: rule state, firing hash, tenant firings, firings stream.
# ARGV: seq, capture_ts, holds (0/1), hold_frames, hold_seconds, cooldown, firing id, status,
# then the firing's (field, value) pairs.
EVALUATE_SCRIPT = f"""
local st = KEYS[1]
local seq = tonumber(ARGV[1])
local ts = tonumber(ARGV[2])
local last = redis.call('HGET', st, 'last_seq')
if last and seq <= tonumber(last) then return -1 end
redis.call('HSET', st, 'last_seq', seq)
redis.call('EXPIRE', st, {STATE_TTL})
if ARGV[3] == '0' then
  redis.call('HSET', st, 'run_frames', 0, 'fired', 0)
  return 0
end
local frames = tonumber(redis.call('HGET', st, 'run_frames') or '0')
local start = ts
if frames > 0 then start = tonumber(redis.call('HGET', st, 'run_start')) end
frames = frames + 1
redis.call('HSET', st, 'run_frames', frames, 'run_start', start)
if redis.call('HGET', st, 'fired') == '1' then return 0 end
if frames < tonumber(ARGV[4]) or ts - start < tonumber(ARGV[5]) then return 0 end
local fired = redis.call('HGET', st, 'last_fired')
if fired and ts - tonumber(fired) < tonumber(ARGV[6]) then return 0 end
redis.call('HSET', st, 'fired', 1, 'last_fired', ts)
redis.call('HSET', KEYS[2], 'run_start', start, 'run_frames', frames, '{alerts.F_STATUS}', ARGV[8],
  '{alerts.F_ATTEMPTS}', 0, unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[2], {alerts.FIRING_TTL})
redis.call('ZADD', KEYS[3], ts, ARGV[7])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -{alerts.FIRINGS_KEPT + 1})
redis.call('XADD', KEYS[4], 'MAXLEN', '~', {alerts.FIRINGS_STREAM_MAXLEN}, '*', '{keys.FI_ID}', ARGV[7])
return 1
"""


@dataclass
class ResultEvent:
    stream: str
    seq: int
    capture_ts: float
    shares: dict[str, float]  # class name -> share

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> ResultEvent:
        return cls(
            stream=fields[keys.R_STREAM.encode()].decode(),
            seq=int(fields[keys.R_SEQ.encode()]),
            capture_ts=float(fields[keys.R_CAPTURE_TS.encode()]),
            shares={str(k): float(v) for k, v in json.loads(fields[keys.R_SHARES.encode()]).items()},
        )


class Evaluator:
    """Reads results in batches, evaluates the rules that apply, acknowledges."""

    def __init__(
        self,
        redis: Redis,
        consumer: str,
        batch_size: int,
        claim_idle_ms: int,
        cache_seconds: float,
        control: Redis | None = None,
    ) -> None:
        self.redis = redis
        self.consumer = consumer
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self.cache_seconds = cache_seconds
        self.rules = RuleStore(control or redis)  # rules live in the control plane
        self._script = redis.register_script(EVALUATE_SCRIPT)
        self._tenants: dict[str, tuple[float, str | None]] = {}
        self._rules: dict[str, tuple[float, list[AlertRule]]] = {}
        self.evaluated = 0  # results read and acknowledged

    async def start(self) -> None:
        # New results only: an evaluator deployed on a store full of results does not fire on the past.
        await ensure_group(self.redis, keys.RESULTS_STREAM, keys.ALERTS_GROUP, "$")

    async def step(self, block_ms: int) -> int:
        """Evaluate one batch: results another evaluator left pending first, then new ones."""
        stream, group, me = keys.RESULTS_STREAM, keys.ALERTS_GROUP, self.consumer
        claimed: Any = await self.redis.xautoclaim(
            stream, group, me, self.claim_idle_ms, "0-0", self.batch_size
        )
        entries = [e for e in claimed[1] if e[1]] if claimed else []
        if not entries:
            read: Any = await self.redis.xreadgroup(group, me, {stream: ">"}, self.batch_size, block_ms)
            entries = read[0][1] if read else []
        if not entries:
            return 0
        started = time.perf_counter()
        await self.evaluate(entries)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return len(entries)

    async def evaluate(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        events: list[ResultEvent] = []
        for _entry_id, fields in entries:
            try:
                events.append(ResultEvent.parse(fields))
            except (KeyError, ValueError) as exc:
                metrics.RESULTS.labels("malformed").inc()
                log.warning("results entry %s is malformed: %s", _entry_id, exc)
        events.sort(key=lambda e: (e.stream, e.seq))  # a batch evaluates each stream in seq order
        pipe = self.redis.pipeline(transaction=False)
        calls = []
        for event in events:
            tenant = await self._tenant(event.stream)
            rules = [r for r in await self._rules_of(tenant) if r.applies_to(event.stream)] if tenant else []
            if not rules:
                metrics.RESULTS.labels("no_rules").inc()
            for rule in rules:
                script_keys, args = self._call(rule, event)
                await self._script(keys=script_keys, args=args, client=pipe)
                calls.append(event)
        replies = await pipe.execute() if calls else []
        late = {(e.stream, e.seq) for e, reply in zip(calls, replies, strict=True) if int(reply) < 0}
        evaluated = {(e.stream, e.seq) for e in calls} - late
        fired = sum(1 for reply in replies if int(reply) == 1)
        metrics.RESULTS.labels("late").inc(len(late - evaluated))
        metrics.RESULTS.labels("evaluated").inc(len(evaluated))
        metrics.EVALUATIONS.inc(len(calls))
        metrics.FIRINGS.inc(fired)
        if fired:
            log.info("%d alert firing(s) recorded", fired)
        await self.redis.xack(keys.RESULTS_STREAM, keys.ALERTS_GROUP, *(entry_id for entry_id, _ in entries))
        self.evaluated += len(entries)

    def _call(self, rule: AlertRule, event: ResultEvent) -> tuple[list[str], list[Any]]:
        share = event.shares.get(rule.class_name, 0.0)
        fid = alerts.firing_id(rule.id, event.stream, event.seq)
        firing = {
            "id": fid,
            "rule": rule.id,
            "tenant": rule.tenant,
            "stream": event.stream,
            "seq": event.seq,
            "class_name": rule.class_name,
            "share": repr(share),
            "op": rule.op,
            "threshold": repr(rule.threshold),
            "capture_ts": repr(event.capture_ts),
            "webhook_url": rule.webhook_url or "",
            alerts.F_SECRET: rule.webhook_secret,
        }
        status = alerts.STATUS_PENDING if rule.webhook_url else alerts.STATUS_RECORDED
        args: list[Any] = [
            event.seq,
            repr(event.capture_ts),
            int(rule.holds(share)),
            rule.hold_frames,
            repr(rule.hold_seconds),
            repr(rule.cooldown),
            fid,
            status,
        ]
        for name, value in firing.items():
            args += [name, value]
        script_keys = [
            keys.alert_state(rule.id, event.stream),
            keys.alert_firing(fid),
            keys.tenant_firings(rule.tenant),
            keys.FIRINGS_STREAM,
        ]
        return script_keys, args

    async def _tenant(self, stream: str) -> str | None:
        now = time.monotonic()
        cached = self._tenants.get(stream)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await self.redis.hget(keys.stream_meta(stream), keys.M_TENANT)
        tenant = text(raw) if raw is not None else None
        self._tenants[stream] = (now + self.cache_seconds, tenant)
        return tenant

    async def _rules_of(self, tenant: str) -> list[AlertRule]:
        now = time.monotonic()
        cached = self._rules.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        rules = await self.rules.rules(tenant)
        self._rules[tenant] = (now + self.cache_seconds, rules)
        return rules

    async def lag(self) -> int:
        groups = cast(list[dict[str, Any]], await self.redis.xinfo_groups(keys.RESULTS_STREAM))
        for group in groups:
            if group["name"] in (keys.ALERTS_GROUP, keys.ALERTS_GROUP.encode()):
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return 0
