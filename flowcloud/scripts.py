"""Lua scripts queued on a pipeline, on one Redis and on a Redis Cluster alike.

A cluster's pipeline neither queues ``evalsha`` by name nor loads scripts, and a replica promoted to
master starts with an empty script cache. Script calls therefore go on the pipeline as plain
EVALSHA commands (routed by their first key); the calls answered NOSCRIPT run again, in one more
round trip, once the script is loaded (on every master of a cluster). A NOSCRIPT answer means the
script never ran, so running it again is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # flowcloud.results imports this module on edges without the redis package
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

Call = tuple["AsyncScript", Sequence[Any], Sequence[Any]]


class ScriptPipeline:
    """A non-transactional pipeline (one round trip per node) that may hold script calls; plain
    commands go on ``pipe``. Each command touches one slot (flowcloud.keys)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.pipe = redis.pipeline(transaction=False)
        self._calls: dict[int, Call] = {}

    def __len__(self) -> int:
        return len(self.pipe)

    def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue ``script`` on the pipeline."""
        self._calls[len(self.pipe)] = (script, keys, args)
        self.pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def execute(self) -> list[Any]:
        """Every reply, in order; the first error (other than a NOSCRIPT retried) is raised."""
        from redis.exceptions import NoScriptError

        replies = list(await self.pipe.execute(raise_on_error=False))
        missing = [
            i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError) and i in self._calls
        ]
        if missing:
            for script in {id(self._calls[i][0]): self._calls[i][0] for i in missing}.values():
                script.sha = await self.redis.script_load(script.script)
            again = ScriptPipeline(self.redis)
            for i in missing:
                again.call(*self._calls[i])
            for i, reply in zip(missing, await again.execute(), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
