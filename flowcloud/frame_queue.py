"""A shard queue of frame references: its consumer group, its bound, and how much is left to read.

Gateways append a reference to each frame (flowcloud.frame_log) to the queue of its stream's
shard, ``keys.frame_shard(i)``; workers read every shard through the consumer group
``keys.WORKER_GROUP``. Each queue is bounded, so trimming can remove references no worker has read.
Redis's own MAXLEN trimming does that silently, and on Redis 7.0 it also corrupts the group's
lag: the group's read counter never learns of the skipped entries, so XINFO GROUPS reports them
as unread for good (the worker's lag gauge and KEDA's scaler then see a backlog that is not there).

So the gateway trims with `FrameQueue.trim`, one Lua script that runs atomically with respect
to every worker's XREADGROUP:

- it creates the group (at id 0) if it is missing, so that every frame is accounted from the first;
- it counts the entries not yet delivered to the group (`unread`: the lag, kept exact by this
  script, bounded by the stream's length, and 0 when the group has read the newest entry);
- while they fit in ``maxlen`` it trims only delivered entries (``MAXLEN ~``, cheap);
- when they do not, it trims exactly to ``maxlen``, returns the (stream, seq) of each unread entry
  it removed so that the caller counts and logs them, and moves the group past them with their
  read count (``XGROUP SETID ... ENTRIESREAD``), so the lag stays true.

`FrameQueue.unread` runs the same script without trimming: the one definition of a worker's lag
(summed over the shards). The script touches one queue and its group: one slot of a cluster. The
backfill lanes, ``keys.backfill_shard(i)`` (same group name), are bounded the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from flowcloud import groups, keys
from flowcloud.scripts import ScriptPipeline

log = logging.getLogger(__name__)

# KEYS[1]: the stream. ARGV: group, maxlen (negative: only count), stream field, seq field.
# Returns {unread after the trim, stream_1, seq_1, stream_2, seq_2, ...} (the unread entries removed).
_TRIM = """
local stream, group, maxlen = KEYS[1], ARGV[1], tonumber(ARGV[2])
local function fields_of(flat)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end
local length = redis.call('XLEN', stream)
local info = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local f = fields_of(g)
  if f['name'] == group then info = f end
end
if info == nil then
  if maxlen < 0 then return {length} end
  redis.call('XGROUP', 'CREATE', stream, group, '0')
  info = {['last-delivered-id'] = '0-0', ['entries-read'] = false, ['lag'] = length}
end
local last_id = info['last-delivered-id']
local unread = info['lag']
if length == 0 then
  unread = 0
elseif last_id == '0-0' then
  unread = length
else
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1][1]
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1]
  local function before(a, b)
    local am, as = string.match(a, '(%d+)-(%d+)')
    local bm, bs = string.match(b, '(%d+)-(%d+)')
    am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
    return am < bm or (am == bm and as < bs)
  end
  if not before(last_id, newest) then
    unread = 0
  elseif before(last_id, first) then
    unread = length
  elseif not unread then  -- Redis cannot tell (entries deleted mid-stream): count them
    unread = #redis.call('XRANGE', stream, '(' .. last_id, '+')
  end
  unread = math.min(unread, length)
end
if maxlen < 0 or length <= maxlen then return {unread} end
if unread <= maxlen then
  redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen)
  return {unread}
end
local lost = redis.call('XRANGE', stream, '(' .. last_id, '+', 'COUNT', unread - maxlen)
local added = fields_of(redis.call('XINFO', 'STREAM', stream))['entries-added']
redis.call('XTRIM', stream, 'MAXLEN', maxlen)
redis.call('XGROUP', 'SETID', stream, group, lost[#lost][1], 'ENTRIESREAD', added - maxlen)
local out = {maxlen}
for _, entry in ipairs(lost) do
  local f = fields_of(entry[2])
  table.insert(out, f[ARGV[3]] or '')
  table.insert(out, f[ARGV[4]] or '0')
end
return out
"""


@dataclass(frozen=True)
class Trim:
    """What one trim found: entries still unread after it, and the unread ones it removed."""

    unread: int
    lost: list[tuple[str, int]]  # (stream, seq) of each entry trimmed before the group read it


def parse_trim(reply: object) -> Trim:
    values = cast(list[bytes | int], reply)
    lost = [(_text(values[i]), int(values[i + 1])) for i in range(1, len(values) - 1, 2)]
    return Trim(int(values[0]), lost)


def _text(value: bytes | int) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def live_queues(shards: int) -> list[str]:
    """The live shard queues of ``shards`` shards."""
    return [keys.frame_shard(shard) for shard in range(shards)]


def backfill_queues(shards: int) -> list[str]:
    """The backfill lanes of ``shards`` shards."""
    return [keys.backfill_shard(shard) for shard in range(shards)]


async def ensure_group(redis: Redis, queue: str) -> None:
    """Create the workers' consumer group (and the queue) unless it exists."""
    if await groups.ensure_group(redis, queue, keys.WORKER_GROUP, "0"):
        log.info("created consumer group %s on %s", keys.WORKER_GROUP, queue)


async def ensure_groups(redis: Redis, shards: int) -> None:
    """The workers' group on every live shard queue (one command each: each its own slot)."""
    for queue in live_queues(shards):
        await ensure_group(redis, queue)


class FrameQueue:
    """A shard queue and its workers' group (see the module's docstring)."""

    def __init__(self, redis: Redis, stream: str) -> None:
        self.redis = redis
        self.stream = stream
        self._script = redis.register_script(_TRIM)

    def _args(self, maxlen: int) -> list[str | int]:
        return [keys.WORKER_GROUP, maxlen, keys.F_STREAM, keys.F_SEQ]

    def trim_in(self, pipe: ScriptPipeline, maxlen: int) -> None:
        """Queue a trim to ``maxlen`` in ``pipe``; its reply goes through `parse_trim`."""
        pipe.call(self._script, [self.stream], self._args(maxlen))

    async def trim(self, maxlen: int) -> Trim:
        """Trim the stream to ``maxlen`` entries, removing unread ones only when they do not fit."""
        return parse_trim(await self._script(keys=[self.stream], args=self._args(maxlen)))

    async def unread(self) -> int:
        """Entries of the stream the group has not been given yet (its true lag)."""
        try:
            reply = await self._script(keys=[self.stream], args=self._args(-1))
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        return parse_trim(reply).unread
