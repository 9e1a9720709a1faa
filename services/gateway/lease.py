"""A device's live session is owned through a lease in Redis: the newest connection wins, everywhere.

The lease lives in the stream's metadata hash (``keys.stream_meta``: ``keys.M_GENERATION``,
``keys.M_OWNER``, ``keys.M_LEASE_UNTIL``), one key and so one slot, so each step is one Lua
script on that key (Redis Cluster safe):

- `StreamLease.acquire` (a new live session, after the device is verified, before its ACCEPT)
  raises the generation atomically, whoever holds it: the newest connection always wins, so an
  edge whose old link went half-open reconnects at once. The new generation is the old one plus
  one, or Redis's clock in milliseconds when that is larger, so that it still rises after the hash
  was lost (a Redis restarted without persistence, a failover that lost the last write) while an
  older session lives on; otherwise a newcomer could draw a number an older session holds.
- `renew` (every ``renew_interval`` seconds while the session lives) moves ``lease_until`` to
  now + ``ttl`` on Redis's clock (`flowcloud.clock.RedisClock`) while the hash names this
  generation, writes it back when the hash lost it or holds an older one (the lost write above),
  and reports a newer generation: the session has been taken over and closes itself. With the
  "connected" event (`flowcloud.registry`, which carries the generation) this is the fallback
  that bounds how late a replica learns of a takeover: ``renew_interval`` plus a round trip.
- `release` (the session ends) clears owner and expiry if the lease is still this generation's;
  the generation stays, so it only ever rises.

Fencing: every frame a session hands the publisher carries its generation (`Frame.generation`),
and the publisher's per-stream script writes nothing for a frame whose generation is not the one
in the hash (counted ``reason="fenced"``). So nothing an old session sends after a takeover is
published, however late it learns of it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from redis.asyncio import Redis

from flowcloud import keys
from flowcloud.clock import RedisClock
from flowcloud.replies import text

DEFAULT_TTL = 3.0  # seconds a lease lasts without renewal
DEFAULT_RENEW_INTERVAL = 0.5  # seconds between renewals (and the fallback check for a takeover)

# KEYS[1] = stream meta; ARGV = owner, lease_until. Returns {generation, previous owner, previous
# lease_until}, the previous ones "" when there were none.
_ACQUIRE = f"""
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current = tonumber(redis.call('HGET', KEYS[1], '{keys.M_GENERATION}') or '0') or 0
local owner = redis.call('HGET', KEYS[1], '{keys.M_OWNER}') or ''
local held = redis.call('HGET', KEYS[1], '{keys.M_LEASE_UNTIL}') or ''
local generation = current + 1
if floor > generation then generation = floor end
generation = string.format('%d', generation)
redis.call('HSET', KEYS[1], '{keys.M_GENERATION}', generation, '{keys.M_OWNER}', ARGV[1],
           '{keys.M_LEASE_UNTIL}', ARGV[2])
return {{generation, owner, held}}
"""

# KEYS[1] = stream meta; ARGV = generation, owner, lease_until. Returns 0 while the lease is this
# generation's (renewed, or written back after the hash lost it), else the newer generation.
_RENEW = f"""
local current = tonumber(redis.call('HGET', KEYS[1], '{keys.M_GENERATION}') or '0') or 0
if current > tonumber(ARGV[1]) then return redis.call('HGET', KEYS[1], '{keys.M_GENERATION}') end
redis.call('HSET', KEYS[1], '{keys.M_GENERATION}', ARGV[1], '{keys.M_OWNER}', ARGV[2],
           '{keys.M_LEASE_UNTIL}', ARGV[3])
return 0
"""

# KEYS[1] = stream meta; ARGV = generation. Clears owner and expiry when the lease is still ours.
_RELEASE = f"""
if redis.call('HGET', KEYS[1], '{keys.M_GENERATION}') == ARGV[1] then
  redis.call('HDEL', KEYS[1], '{keys.M_OWNER}', '{keys.M_LEASE_UNTIL}')
  return 1
end
return 0
"""


def replica_name() -> str:
    """This gateway process as a lease owner names it (the pod's host name in Kubernetes)."""
    return f"{socket.gethostname()}/{os.getpid()}"


@dataclass(frozen=True)
class Acquired:
    generation: int
    previous_owner: str  # "" when the stream had no owner
    previous_until: float  # the previous owner's lease_until (0: none)

    def took_over(self, now: float) -> bool:
        """Another session still held a live lease: this acquisition is a takeover."""
        return bool(self.previous_owner) and self.previous_until > now


class StreamLease:
    """The lease of one stream's live session (one per session; the caller runs the renewals)."""

    def __init__(
        self,
        redis: Redis,
        clock: RedisClock,
        stream: str,
        session_id: str,
        ttl: float = DEFAULT_TTL,
        replica: str | None = None,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.stream = stream
        self.key = keys.stream_meta(stream)
        self.owner = f"{replica or replica_name()} {session_id}"
        self.ttl = ttl
        self.generation = 0  # 0 until acquired
        self.newer = 0  # the generation that took over (0: none seen)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def _until(self) -> str:
        return repr(self.clock.now() + self.ttl)

    async def acquire(self) -> Acquired:
        """Take the stream over with a new, higher generation (RedisError when Redis is away)."""
        reply = await self._acquire(keys=[self.key], args=[self.owner, self._until()])
        generation, owner, held = (text(v) for v in reply)
        self.generation = int(generation)
        return Acquired(self.generation, owner, float(held) if held else 0.0)

    async def renew(self) -> bool:
        """Extend the lease; False (and `newer` set) when a newer generation has taken over."""
        assert self.generation, "acquire first"
        reply = await self._renew(keys=[self.key], args=[self.generation, self.owner, self._until()])
        newer = int(text(reply))
        if newer:
            self.newer = max(self.newer, newer)
        return not newer

    def superseded_by(self, generation: int) -> bool:
        """Whether ``generation`` (from a "connected" event) is newer than this lease's."""
        if generation > self.generation:
            self.newer = max(self.newer, generation)
            return True
        return False

    async def release(self) -> bool:
        """Clear owner and expiry if the lease is still this generation's; True when it was."""
        if not self.generation:
            return False
        return bool(await self._release(keys=[self.key], args=[self.generation]))
