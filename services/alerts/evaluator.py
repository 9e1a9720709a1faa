"""Evaluates alert rules on results as they are written: a consumer of every results shard
(``keys.results_shard``) in group ``keys.ALERTS_GROUP``, so evaluators scale out and a dead one's
results are taken over. Each step reads every shard (up to ``batch_size`` entries from each: a
busy shard does not starve the others), one round trip per Redis node.

Each (result, rule) is one Lua script on the rule's state for that stream: it skips a result at or
below the last seq evaluated (a redelivery after a crash, or a late result), advances the run, and
records the firing hash (in the stream's slot) in the same atomic step. A result evaluated twice
therefore never fires twice. The firing's tenant index and delivery queue live in other slots: they
are written next, and the firing hash carries ``alerts.F_UNQUEUED`` until they are, so that a
redelivery after a crash in between finishes the job: a firing is never lost between deciding and
queueing it.
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
from flowcloud.bounded_stream import BoundedStream, parse_trim
from flowcloud.groups import count_trimmed_pending, ensure_group
from flowcloud.replies import text
from flowcloud.scripts import ScriptPipeline

from . import metrics

log = logging.getLogger(__name__)

STATE_TTL = 7 * 24 * 3600  # a rule's state on a stream silent this long is forgotten

IDLE_POLL_MS = 50  # with several shards and nothing to read, each is waited on this long in turn

# KEYS: rule state, firing hash (one stream's slot).
# ARGV: seq, capture_ts, holds (0/1), hold_frames, hold_seconds, cooldown, firing id, status,
# then the firing's (field, value) pairs.
# Returns -1 (late), 0 (no firing), FIRED, or UNQUEUED (late, but its firing is not queued yet).
EVALUATE_SCRIPT = f"""
local st = KEYS[1]
local seq = tonumber(ARGV[1])
local ts = tonumber(ARGV[2])
local last = redis.call('HGET', st, 'last_seq')
if last and seq <= tonumber(last) then
  if redis.call('HEXISTS', KEYS[2], '{alerts.F_UNQUEUED}') == 1 then return 2 end
  return -1
end
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
  '{alerts.F_ATTEMPTS}', 0, '{alerts.F_UNQUEUED}', 1, unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[2], {alerts.FIRING_TTL})
return 1
"""
FIRED, UNQUEUED = 1, 2

# KEYS: a firing hash. ARGV: the error. A firing trimmed from the delivery queue unread is never
# delivered: one still pending is marked dead with why (one recorded without a webhook stays so).
TRIMMED_SCRIPT = f"""
if redis.call('HGET', KEYS[1], '{alerts.F_STATUS}') ~= '{alerts.STATUS_PENDING}' then return 0 end
redis.call('HSET', KEYS[1], '{alerts.F_STATUS}', '{alerts.STATUS_DEAD}', '{alerts.F_LAST_ERROR}', ARGV[1])
return 1
"""
TRIMMED_ERROR = "trimmed from the delivery queue before a webhook deliverer read it"


ShardEntry = tuple[str, bytes, dict[bytes, bytes]]  # (results shard, entry id, fields)


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
    """Reads results in batches from every shard, evaluates the rules that apply, acknowledges."""

    def __init__(
        self,
        redis: Redis,
        consumer: str,
        batch_size: int,
        claim_idle_ms: int,
        cache_seconds: float,
        control: Redis | None = None,
        shards: int = 1,
        firings_maxlen: int = keys.FIRINGS_STREAM_MAXLEN,
    ) -> None:
        self.redis = redis
        self.consumer = consumer
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self.cache_seconds = cache_seconds
        self.shards = [keys.results_shard(i) for i in range(shards)]  # the workers' frame_shards
        self.rules = RuleStore(control or redis)  # rules live in the control plane
        self._script = redis.register_script(EVALUATE_SCRIPT)
        self.firings_maxlen = firings_maxlen
        self._trimmed = redis.register_script(TRIMMED_SCRIPT)
        # The delivery queue, bounded for the deliverers' group. Its entries carry a firing id and
        # no seq (reported as 0). Where no deliverer ever ran, nobody is owed the firings: plain
        # trimming, no group made (the deliverer creates its group from the first entry).
        self.firings = BoundedStream(redis, keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP, (keys.FI_ID, ""), False)
        self._tenants: dict[str, tuple[float, str | None]] = {}
        self._rules: dict[str, tuple[float, list[AlertRule]]] = {}
        self._turn = 0  # the shard waited on next when every shard is empty
        self.evaluated = 0  # results read and acknowledged

    async def start(self) -> None:
        # New results only: an evaluator deployed on a store full of results does not fire on the past.
        for shard in self.shards:
            await ensure_group(self.redis, shard, keys.ALERTS_GROUP, "$")

    async def step(self, block_ms: int) -> int:
        """Evaluate one batch: from every shard, results another evaluator left pending, then new
        ones; when there is none, wait for some (on one shard at a time: a blocking read of several
        shards would be one command over several slots)."""
        group, me = keys.ALERTS_GROUP, self.consumer
        pipe = self.redis.pipeline(transaction=False)
        for shard in self.shards:
            pipe.xautoclaim(shard, group, me, self.claim_idle_ms, "0-0", self.batch_size)
            pipe.xreadgroup(group, me, {shard: ">"}, self.batch_size)
        replies: list[Any] = await pipe.execute()
        entries: list[ShardEntry] = []
        for shard, claimed, read in zip(self.shards, replies[0::2], replies[1::2], strict=True):
            count_trimmed_pending(claimed, metrics.RESULTS, "trimmed_pending", "result events", shard)
            entries += [
                (shard, entry_id, fields) for entry_id, fields in (claimed[1] if claimed else []) if fields
            ]
            entries += [(shard, entry_id, fields) for _name, got in read or [] for entry_id, fields in got]
        if not entries:
            shard = self.shards[self._turn % len(self.shards)]
            self._turn += 1
            wait = block_ms if len(self.shards) == 1 else min(block_ms, IDLE_POLL_MS)
            waited: Any = await self.redis.xreadgroup(group, me, {shard: ">"}, self.batch_size, wait)
            entries = [(shard, entry_id, fields) for _name, got in waited or [] for entry_id, fields in got]
        if not entries:
            return 0
        started = time.perf_counter()
        await self.evaluate(entries)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return len(entries)

    async def evaluate(self, entries: list[ShardEntry]) -> None:
        events: list[ResultEvent] = []
        for shard, entry_id, fields in entries:
            try:
                events.append(ResultEvent.parse(fields))
            except (KeyError, ValueError) as exc:
                metrics.RESULTS.labels("malformed").inc()
                log.warning("results entry %s of %s is malformed: %s", entry_id, shard, exc)
        events.sort(key=lambda e: (e.stream, e.seq))  # a batch evaluates each stream in seq order
        pipe = ScriptPipeline(self.redis)
        calls: list[tuple[ResultEvent, AlertRule]] = []
        for event in events:
            tenant = await self._tenant(event.stream)
            rules = [r for r in await self._rules_of(tenant) if r.applies_to(event.stream)] if tenant else []
            if not rules:
                metrics.RESULTS.labels("no_rules").inc()
            for rule in rules:
                script_keys, args = self._call(rule, event)
                pipe.call(self._script, script_keys, args)
                calls.append((event, rule))
        replies = [int(r) for r in await pipe.execute()] if calls else []
        await self._queue(
            [call for call, reply in zip(calls, replies, strict=True) if reply in (FIRED, UNQUEUED)]
        )
        late = {(e.stream, e.seq) for (e, _), reply in zip(calls, replies, strict=True) if reply < 0}
        evaluated = {(e.stream, e.seq) for e, _ in calls} - late
        fired = sum(1 for reply in replies if reply == FIRED)
        metrics.RESULTS.labels("late").inc(len(late - evaluated))
        metrics.RESULTS.labels("evaluated").inc(len(evaluated))
        metrics.EVALUATIONS.inc(len(calls))
        metrics.FIRINGS.inc(fired)
        if fired:
            log.info("%d alert firing(s) recorded", fired)
        acks = self.redis.pipeline(transaction=False)
        for shard in sorted({shard for shard, _, _ in entries}):
            acks.xack(shard, keys.ALERTS_GROUP, *(entry_id for s, entry_id, _ in entries if s == shard))
        await acks.execute()
        self.evaluated += len(entries)

    async def _queue(self, firings: list[tuple[ResultEvent, AlertRule]]) -> None:
        """Index recorded firings for their tenant and queue them for delivery, the queue then
        trimmed to its bound in the same round trip (the firings no deliverer had read that it
        removed are counted, and marked dead if pending), then mark them queued (each command and
        script on one key: they live in other slots than the firing)."""
        if not firings:
            return
        pipe = ScriptPipeline(self.redis)
        for event, rule in firings:
            fid = alerts.firing_id(rule.id, event.stream, event.seq)
            pipe.pipe.zadd(keys.tenant_firings(rule.tenant), {fid: event.capture_ts})
            pipe.pipe.zremrangebyrank(keys.tenant_firings(rule.tenant), 0, -(alerts.FIRINGS_KEPT + 1))
            pipe.pipe.xadd(keys.FIRINGS_STREAM, {keys.FI_ID: fid})
        self.firings.trim_in(pipe, self.firings_maxlen)  # same round trip; one key, one slot
        trim = parse_trim((await pipe.execute())[-1])
        if trim.lost:
            ids = [fid for fid, _seq in trim.lost]
            metrics.FIRINGS_DROPPED.labels("trimmed_unread").inc(len(ids))
            log.warning(
                "%s over its bound of %d undelivered firings: trimmed %d no webhook deliverer had read, "
                "never delivered (firings %s to %s)",
                keys.FIRINGS_STREAM,
                self.firings_maxlen,
                len(ids),
                ids[0],
                ids[-1],
            )
            marks = ScriptPipeline(self.redis)
            for fid in ids:
                marks.call(
                    self._trimmed, [keys.alert_firing(alerts.firing_stream(fid), fid)], [TRIMMED_ERROR]
                )
            await marks.execute()
        done = self.redis.pipeline(transaction=False)
        for event, rule in firings:
            done.hdel(
                keys.alert_firing(event.stream, alerts.firing_id(rule.id, event.stream, event.seq)),
                alerts.F_UNQUEUED,
            )
        await done.execute()

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
            keys.alert_firing(event.stream, fid),
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
        """Results not yet evaluated, over every shard: unread and pending."""
        total = 0
        for shard in self.shards:
            groups = cast(list[dict[str, Any]], await self.redis.xinfo_groups(shard))
            for group in groups:
                if group["name"] in (keys.ALERTS_GROUP, keys.ALERTS_GROUP.encode()):
                    total += int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return total
