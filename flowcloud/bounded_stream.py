"""A Redis stream bounded in length that never loses what its consumer group has not read silently.

Redis's own MAXLEN trimming removes the oldest entries whether the group has read them or not, and
on Redis 7.0 it also corrupts the group's lag: the group's read counter never learns of the skipped
entries, so XINFO GROUPS reports them as unread for good. So the writers of a bounded stream read
by a consumer group (the shard queues of frames, flowcloud.frame_queue; the results shards the alert
evaluators read, flowcloud.results) trim with `BoundedStream.trim`, one Lua script that runs
atomically with respect to every consumer's XREADGROUP:

- it creates the group (at id 0) if it is missing and the stream says so (``create_group``), so
  that every entry is accounted from the first; otherwise a stream without the group is trimmed
  plainly (``MAXLEN ~``): nobody is owed its entries;
- it counts the entries not yet delivered to the group (`unread`: the lag, kept exact by this
  script, bounded by the stream's length, and 0 when the group has read the newest entry);
- while they fit in ``maxlen`` it trims only delivered entries (``MAXLEN ~``, cheap);
- when they do not, it trims exactly to ``maxlen``, returns the (stream, seq) fields of each unread
  entry it removed so that the caller counts and logs them, and moves the group past them with their
  read count (``XGROUP SETID ... ENTRIESREAD``), so the lag stays true.

`BoundedStream.unread` runs the same script without trimming. The script touches one stream and
its group: one slot of a cluster. This module imports no redis at run time (the edge imports
flowcloud.results without the redis package).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from flowcloud.scripts import ScriptPipeline

if TYPE_CHECKING:
    from redis.asyncio import Redis

# KEYS[1]: the stream. ARGV: group, maxlen (negative: only count), stream field, seq field,
# create the missing group ('1') or trim plainly without it ('0').
# Returns {unread after the trim, stream_1, seq_1, stream_2, seq_2, ...} (the unread entries removed).
TRIM_SCRIPT = """
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
  if ARGV[5] ~= '1' then
    if maxlen >= 0 and length > maxlen then redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen) end
    return {0}
  end
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

    def by_stream(self) -> dict[str, list[int]]:
        """The seqs lost, by stream."""
        out: dict[str, list[int]] = {}
        for stream, seq in self.lost:
            out.setdefault(stream, []).append(seq)
        return out

    def describe(self) -> str:
        """The entries lost, for a log line: ``cam-a seqs 1-3, 7; cam-b seqs 4``."""
        return "; ".join(f"{stream} seqs {seq_ranges(seqs)}" for stream, seqs in self.by_stream().items())


def parse_trim(reply: object) -> Trim:
    values = cast(list[bytes | int], reply)
    lost = [(_text(values[i]), int(values[i + 1])) for i in range(1, len(values) - 1, 2)]
    return Trim(int(values[0]), lost)


def _text(value: bytes | int) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def seq_ranges(seqs: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    out: list[str] = []
    start = previous = seqs[0]
    for seq in [*seqs[1:], None]:
        if seq is not None and seq == previous + 1:
            previous = seq
            continue
        out.append(str(start) if start == previous else f"{start}-{previous}")
        if seq is not None:
            start = previous = seq
    return ", ".join(out)


class BoundedStream:
    """A stream and the consumer group it is bounded for (see the module's docstring). ``fields``
    names the stream and seq fields of an entry, reported for each unread entry trimmed."""

    def __init__(
        self, redis: Redis, stream: str, group: str, fields: Sequence[str], create_group: bool
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.fields = list(fields)
        self.create_group = create_group
        self._script = redis.register_script(TRIM_SCRIPT)

    def _args(self, maxlen: int) -> list[str | int]:
        return [self.group, maxlen, *self.fields, int(self.create_group)]

    def trim_in(self, pipe: ScriptPipeline, maxlen: int) -> None:
        """Queue a trim to ``maxlen`` in ``pipe``; its reply goes through `parse_trim`."""
        pipe.call(self._script, [self.stream], self._args(maxlen))

    async def trim(self, maxlen: int) -> Trim:
        """Trim the stream to ``maxlen`` entries, removing unread ones only when they do not fit."""
        return parse_trim(await self._script(keys=[self.stream], args=self._args(maxlen)))

    async def unread(self) -> int:
        """Entries of the stream the group has not been given yet (its true lag)."""
        from redis.exceptions import ResponseError

        try:
            reply = await self._script(keys=[self.stream], args=self._args(-1))
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        return parse_trim(reply).unread
