"""Each stream's frame log, and the references to it that the shard queues carry.

A frame's bytes cross into Redis once: the gateway appends the whole frame (`Frame.to_fields`) to
its stream's frame log, ``keys.stream_frames(stream)`` (spooled frames: ``keys.backfill_frames``),
a stream bounded by ``MAXLEN ~`` that lives in the stream's slot (``{<stream id>}``). The work
queue of the stream's shard, ``keys.frame_shard(keys.shard_of(stream, shards))``, gets a reference:
the same fields without ``data``, plus ``keys.F_FRAME_ID``, the id of the frame's entry in the log.
A worker reads references from the shard queues and fetches each frame's bytes from its log
(`fetch`, one pipelined XRANGE per frame). A reference whose frame has left the log (the stream
sent more than its log keeps before any worker got to it) is acknowledged and counted as evicted.

The append is one Lua script per stream and batch (`APPEND_SCRIPT`, its arguments from
`append_call`; flowcloud.scripts queues it on a pipeline), on the stream's slot: it checks the
session's lease (fencing: a frame of generation > 0 is written only while the stream's metadata
names that generation; otherwise nothing is written and the script says so), appends the frames
and stamps the stream's ``last_seen``. The log expires a while (``stream_frames_ttl``) after its
last append, so a stream that went quiet does not hold its frames' memory for good. The script
touches the stream's metadata and log only: one hash tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis
from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.replies import text, text_keys
from flowcloud.streams import StreamMeta

# KEYS[1]: the stream's metadata hash, KEYS[2]: its frame log.
# ARGV: generation (0: unfenced), maxlen, last_seen ('': leave it), the metadata's generation and
# last-seen field names, the log's TTL in seconds (0: none), then per frame: the number n of its
# field/value items, then those n items. Returns {1, id_1, id_2, ...}, or {0} when fenced.
APPEND_SCRIPT = """
local meta, log = KEYS[1], KEYS[2]
local generation, maxlen, last_seen = tonumber(ARGV[1]), ARGV[2], ARGV[3]
if generation > 0 and tonumber(redis.call('HGET', meta, ARGV[4]) or '0') ~= generation then
  return {0}
end
local out = {1}
local i = 7
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  table.insert(out, redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, i + 1, i + n)))
  i = i + n + 1
end
if last_seen ~= '' then redis.call('HSET', meta, ARGV[5], last_seen) end
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', log, ARGV[6]) end
return out
"""


Fields = dict[str, str | int | float | bytes]  # a frame-log entry's fields (`Frame.to_fields`)


def log_key(stream: str, backfill: bool) -> str:
    """The frame log a frame of ``stream`` goes to: its live log, or its backfill log."""
    return keys.backfill_frames(stream) if backfill else keys.stream_frames(stream)


def append_call(
    stream: str,
    backfill: bool,
    entries: Sequence[Fields],
    maxlen: int,
    generation: int = 0,
    last_seen: float | None = None,
    ttl: int = 0,
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of `APPEND_SCRIPT` appending ``entries`` (`Frame.to_fields` of frames
    all of ``stream``, one lane, one generation) to their frame log (which expires ``ttl`` seconds
    after its last append, 0: never); its reply goes through `parse_append`."""
    stamp = "" if last_seen is None else StreamMeta(last_seen=last_seen).to_fields()[keys.M_LAST_SEEN]
    args: list[Any] = [generation, maxlen, stamp, keys.M_GENERATION, keys.M_LAST_SEEN, ttl]
    for fields in entries:
        args.append(2 * len(fields))
        for name, value in fields.items():
            args += (name, value)
    return [keys.stream_meta(stream), log_key(stream, backfill)], args


def parse_append(reply: object) -> list[str] | None:
    """The log ids of the appended frames, in order; None when the lease fenced them off."""
    values = cast(list[Any], reply)
    if not int(values[0]):
        return None
    return [text(value) for value in values[1:]]


def ref_fields(entry: Fields, frame_id: str) -> Fields:
    """A shard-queue entry: the frame's log entry (`Frame.to_fields`) without its bytes, and where
    it is."""
    fields = {name: value for name, value in entry.items() if name != keys.F_DATA}
    fields[keys.F_FRAME_ID] = frame_id
    return fields


def ref_location(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """The frame log and entry id a shard-queue entry points to (None: it names none)."""
    f = text_keys(fields)
    stream, frame_id = f.get(keys.F_STREAM), f.get(keys.F_FRAME_ID)
    if stream is None or frame_id is None:
        return None
    name = text(stream)
    if not keys.is_identifier(name):
        return None
    return log_key(name, f.get(keys.F_BACKFILL) == b"1"), text(frame_id)


async def fetch(redis: Redis, locations: Sequence[tuple[str, str]]) -> list[dict[bytes, bytes] | None]:
    """The frame-log entries at ``locations`` ((log, id) pairs), one pipelined round trip (a cluster
    client splits it by node); None for an entry no longer in its log."""
    if not locations:
        return []
    pipe = redis.pipeline(transaction=False)
    for log, frame_id in locations:
        pipe.xrange(log, frame_id, frame_id, count=1)
    out: list[dict[bytes, bytes] | None] = []
    for found in await pipe.execute():
        out.append(found[0][1] if found else None)
    return out


def publish_blocking(
    client: redis.Redis, frames: Sequence[Frame], shards: int = 1, maxlen: int = 10_000, atomic: bool = False
) -> list[str]:
    """Write ``frames`` as a gateway does (each to its stream's frame log, unfenced, and a reference
    to its shard's queue) with a blocking client, for tools, benches and tests that publish without
    a gateway; the references' ids. Seqs are the frames' own. ``atomic``: the references in one
    MULTI, so that one read sees them all (one Redis, or all of them in one shard)."""
    lanes: dict[tuple[str, bool], list[Frame]] = {}
    for frame in frames:
        lanes.setdefault((frame.stream, frame.backfill), []).append(frame)
    logged = {lane: [frame.to_fields() for frame in lane_frames] for lane, lane_frames in lanes.items()}
    pipe = client.pipeline(transaction=False)
    for (stream, backfill), entries in logged.items():
        script_keys, args = append_call(stream, backfill, entries, maxlen)
        pipe.eval(APPEND_SCRIPT, len(script_keys), *script_keys, *args)  # a tool's few calls: plain EVAL
    refs = client.pipeline(transaction=atomic)
    for (stream, backfill), reply in zip(lanes, pipe.execute(), strict=True):
        shard = keys.shard_of(stream, shards)
        queue = keys.backfill_shard(shard) if backfill else keys.frame_shard(shard)
        for entry, frame_id in zip(logged[stream, backfill], parse_append(reply) or [], strict=True):
            refs.xadd(queue, ref_fields(entry, frame_id))  # type: ignore[arg-type]
    return [text(ref_id) for ref_id in refs.execute()]


def logged_frames(client: redis.Redis, stream: str, backfill: bool = False) -> list[Frame]:
    """The frames ``stream``'s frame log (or backfill log) holds, oldest first."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(log_key(stream, backfill)))
    return [Frame.from_fields(fields) for _, fields in entries]
