"""The backfill lane: spooled video an edge sends after an outage, beside its live session.

An edge that comes back with frames in its spool says how many in its live HELLO (``spooled``) and
opens a second connection whose HELLO says ``backfill``. The live session reserves seqs for them
before publishing any live frame (`reserve_backfill_seqs`), and the backfill session's frames take
them in capture order (`take_backfill_seqs`), so the stream's results, ordered by seq, are in
capture order too. The reserved seqs not handed out yet are a list of ranges in the stream's
metadata (``backfill_ranges``): a HELLO that reconnects in the middle of a backfill says how many
of its spooled frames an earlier HELLO announced (``carried``, the oldest ones), and those keep
the oldest unused seqs, which sort before the live frames published since; the rest of the
earlier ranges become gaps, and new seqs are reserved for the other spooled frames. Frames beyond
the reservation take ordinary seqs (counted). Each range change is one Lua script on the stream's
metadata hash (one key: safe on Redis Cluster).

An edge resends a GOP whose backfill connection broke in its middle whole (the gateway can only
decode it from its IDR), so its first frames may come twice: a backfill session drops (and
counts) each frame not captured after the newest backfill frame of the stream published before
(`BackfillDedup`: edge capture times, kept in the stream's metadata with the frames).

Backfill frames go to their stream's backfill log and the shard's backfill lane
(`keys.backfill_shard`), which workers read only with spare batch room; the lane has its own rate
limits, so it cannot starve the live session of its budget.
"""

from __future__ import annotations

from collections import Counter

from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.replies import text
from flowcloud.scripts import ScriptPipeline
from services.gateway import metrics

BACKFILL_LIMITS_SUFFIX = "/backfill"
SAME_CAPTURE_US = 10  # capture times this close are one frame's (float rounding of clock offsets)

# KEYS: the stream's metadata. ARGV: spooled, carried. Keeps the first ``carried`` unused reserved
# seqs (in order), reserves new ones for the rest of ``spooled``. Returns {kept, first new, last new}.
RESERVE_SCRIPT = f"""
local out, keep = {{}}, tonumber(ARGV[2])
local raw = redis.call('HGET', KEYS[1], '{keys.M_BACKFILL_RANGES}') or ''
for a, b in string.gmatch(raw, '(%d+)-(%d+)') do
  a, b = tonumber(a), tonumber(b)
  if keep > 0 then
    local n = math.min(keep, b - a + 1)
    table.insert(out, string.format('%d-%d', a, a + n - 1))
    keep = keep - n
  end
end
local kept = tonumber(ARGV[2]) - keep
local new = tonumber(ARGV[1]) - kept
local last = redis.call('HINCRBY', KEYS[1], '{keys.M_LAST_SEQ}', new)
if new > 0 then table.insert(out, string.format('%d-%d', last - new + 1, last)) end
redis.call('HSET', KEYS[1], '{keys.M_BACKFILL_RANGES}', table.concat(out, ' '),
  '{keys.M_BACKFILL_END_SEQ}', last)
return {{kept, last - new + 1, last}}
"""

# KEYS: the stream's metadata. ARGV: count. Hands out ``count`` seqs in order: reserved ones while
# they last, then new ones. Returns {{how many were new, seqs...}}.
TAKE_SCRIPT = f"""
local need, seqs, rest = tonumber(ARGV[1]), {{}}, {{}}
local raw = redis.call('HGET', KEYS[1], '{keys.M_BACKFILL_RANGES}') or ''
for a, b in string.gmatch(raw, '(%d+)-(%d+)') do
  a, b = tonumber(a), tonumber(b)
  while need > 0 and a <= b do
    table.insert(seqs, a)
    a, need = a + 1, need - 1
  end
  if a <= b then table.insert(rest, string.format('%d-%d', a, b)) end
end
if #seqs > 0 then
  redis.call('HSET', KEYS[1], '{keys.M_BACKFILL_RANGES}', table.concat(rest, ' '),
    '{keys.M_BACKFILL_LAST_SEQ}', seqs[#seqs])
end
local beyond = need
if need > 0 then
  local last = redis.call('HINCRBY', KEYS[1], '{keys.M_LAST_SEQ}', need)
  for s = last - need + 1, last do table.insert(seqs, s) end
end
table.insert(seqs, 1, beyond)
return seqs
"""


def backfill_key(device_id: str, backfill: bool) -> str:
    """The key of a lane's rate limits: the backfill lane has its own buckets."""
    return device_id + BACKFILL_LIMITS_SUFFIX if backfill else device_id


async def reserve_backfill_seqs(
    redis: Redis, stream: str, spooled: int, carried: int = 0
) -> tuple[int, int, int]:
    """Reserve seqs of ``stream`` for its ``spooled`` frames, ``carried`` of them (the oldest)
    announced before: they keep up to that many unused seqs of earlier reservations; the other
    unused ones become gaps. Returns (seqs kept, first and last new seq reserved)."""
    kept, first, last = await redis.register_script(RESERVE_SCRIPT)(
        keys=[keys.stream_meta(stream)], args=[spooled, carried]
    )
    return int(kept), int(first), int(last)


async def take_backfill_seqs(redis: Redis, counts: Counter[str]) -> dict[str, list[int]]:
    """Seqs for ``counts[stream]`` backfill frames of each stream, in order: from the stream's
    reservation while it lasts, then new ones (one round trip)."""
    take = redis.register_script(TAKE_SCRIPT)
    pipe = ScriptPipeline(redis)  # (a cluster's own pipeline refuses script calls)
    streams = list(counts)
    for stream in streams:
        pipe.call(take, [keys.stream_meta(stream)], [counts[stream]])
    out: dict[str, list[int]] = {}
    beyond = 0
    for stream, (new, *seqs) in zip(streams, await pipe.execute(), strict=True):
        out[stream] = [int(s) for s in seqs]
        beyond += int(new)
    if beyond:
        metrics.BACKFILL_UNRESERVED.inc(beyond)
    return out


class BackfillDedup:
    """Which frames of a backfill session are new: those captured after the stream's newest backfill
    frame published before (edge clock, µs; the spool sends in capture order)."""

    def __init__(self, stream: str, last: int = 0) -> None:
        self.stream = stream
        self.last = last

    @classmethod
    async def load(cls, redis: Redis, stream: str) -> BackfillDedup:
        raw = await redis.hget(keys.stream_meta(stream), keys.M_BACKFILL_LAST_CAPTURE)
        return cls(stream, int(text(raw)) if raw is not None else 0)

    def admit(self, edge_capture: float) -> bool:
        """True for a new frame (then remembered); False (counted) for one published already."""
        micros = round(edge_capture * 1_000_000)
        if micros <= self.last + SAME_CAPTURE_US:
            metrics.drop(metrics.DROP_BACKFILL_DUPLICATE)
            return False
        self.last = micros
        return True

    def fields(self) -> dict[str, str]:
        """The stream metadata to write with the admitted frames."""
        return {keys.M_BACKFILL_LAST_CAPTURE: str(self.last)}
