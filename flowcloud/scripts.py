"""Lua scripts queued on a pipeline, on one Redis and on a Redis Cluster alike.

A plain pipeline loads the scripts it runs before executing; a cluster's pipeline does not, and a
replica promoted to master starts with an empty script cache. A script call answered NOSCRIPT is
therefore run again by itself, through the script object, which loads it (on every master of a
cluster) and calls it once more. Script calls queued here must be safe to run again after a
NOSCRIPT answer: the script never ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # flowcloud.results imports this module on edges without the redis package
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript


class ScriptPipeline:
    """A non-transactional pipeline (one round trip per node) that may hold script calls; plain
    commands go on ``pipe``. Each command touches one slot (flowcloud.keys)."""

    def __init__(self, redis: Redis) -> None:
        self.pipe = redis.pipeline(transaction=False)
        self._calls: dict[int, tuple[AsyncScript, Sequence[Any], Sequence[Any]]] = {}

    def __len__(self) -> int:
        return len(self.pipe)

    async def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue ``script`` on the pipeline."""
        self._calls[len(self.pipe)] = (script, keys, args)
        await script(keys=keys, args=args, client=self.pipe)  # a pipeline: queued

    async def execute(self) -> list[Any]:
        """Every reply, in order; the first error (other than a NOSCRIPT retried) is raised."""
        from redis.exceptions import NoScriptError

        replies = list(await self.pipe.execute(raise_on_error=False))
        for index, reply in enumerate(replies):
            if isinstance(reply, NoScriptError) and index in self._calls:
                script, keys, args = self._calls[index]
                replies[index] = await script(keys=keys, args=args)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
