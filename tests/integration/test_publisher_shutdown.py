"""The gateway's publisher at shutdown with a Redis that does not answer (a real redis-server,
stopped with SIGSTOP): every frame it was given is published or counted as dropped, the batch
whose write was cut short included."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

from redis.asyncio import Redis as AsyncRedis
from support.gateway import all_drops
from support.waiting import eventually
from support.worker import frame

from flowcloud.redis_server import EmbeddedRedis
from services.gateway.publisher import UNASSIGNED_SEQ, FramePublisher


def test_a_batch_cut_short_at_shutdown_is_counted(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        assert server.process is not None
        pid = server.process.pid

        async def main() -> tuple[int, int]:
            client = AsyncRedis.from_url(server.url)
            publisher = FramePublisher(client, 1000)
            publisher.start()
            submitted = 0
            for _ in range(10):
                publisher.submit(dataclasses.replace(frame("cam-1", 0, 48, 64), seq=UNASSIGNED_SEQ))
                submitted += 1
            assert await eventually(lambda: publisher.published == 10, 10)
            os.kill(pid, signal.SIGSTOP)  # Redis takes the next write and never answers it
            try:
                for _ in range(30):
                    publisher.submit(dataclasses.replace(frame("cam-1", 0, 48, 64), seq=UNASSIGNED_SEQ))
                    submitted += 1
                    await asyncio.sleep(0.01)
                await publisher.close(timeout=0.5)
            finally:
                os.kill(pid, signal.SIGCONT)
            await client.aclose()
            return submitted, publisher.published

        before = all_drops()
        submitted, published = asyncio.run(main())
        assert published == 10
        assert published + all_drops() - before == submitted  # none lost without a count
