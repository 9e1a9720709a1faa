"""Seqs reserved for spooled frames survive a reconnect in the middle of a backfill: the gateway's
reservation scripts on a real redis-server, in the order a gateway runs them."""

from __future__ import annotations

import asyncio
from collections import Counter

from redis.asyncio import Redis

from flowcloud import keys, redis_client
from flowcloud.streams import StreamMeta
from services.gateway.backfill import reserve_backfill_seqs, take_backfill_seqs


async def live(redis: Redis, count: int) -> list[int]:
    """Seqs of ``count`` live frames, handed out as the publisher does (HINCRBY last_seq)."""
    last = int(await redis.hincrby(keys.stream_meta("cam-1"), keys.M_LAST_SEQ, count))
    return list(range(last - count + 1, last + 1))


async def backfill(redis: Redis, count: int, batch: int = 7) -> list[int]:
    """Seqs of ``count`` backfill frames, taken in publisher-sized batches."""
    out: list[int] = []
    while len(out) < count:
        n = min(batch, count - len(out))
        out += (await take_backfill_seqs(redis, Counter({"cam-1": n})))["cam-1"]
    return out


def test_a_reconnect_mid_backfill_carries_the_unsent_frames_reservation_over(redis_url: str) -> None:
    async def run() -> None:
        redis = Redis.from_url(redis_url)
        before = await live(redis, 10)
        # Outage 1 spools A (100 frames); session 1 announces them with a GOP of margin.
        await reserve_backfill_seqs(redis, "cam-1", 100 + 30)
        a_sent = await backfill(redis, 50)
        live_1 = await live(redis, 20)
        # Session 1 is lost in the middle of the backfill; outage 2 spools B (40 frames). Session 2
        # announces the 50 unsent frames of A as carried, and B with a margin.
        assert await reserve_backfill_seqs(redis, "cam-1", 50 + 40 + 30, carried=50) == (50, 161, 230)
        a_rest = await backfill(redis, 50)
        b = await backfill(redis, 40)
        live_2 = await live(redis, 5)
        # Capture order: before, A, live 1, B, live 2; seqs sort the same way, each used once.
        timeline = [before, a_sent + a_rest, live_1, b, live_2]
        flat = [seq for part in timeline for seq in part]
        assert flat == sorted(flat) and len(set(flat)) == len(flat)
        assert max(a_rest) < min(live_1) and max(live_1) < min(b) < max(b) < min(live_2)
        meta = StreamMeta.from_fields(await redis.hgetall(keys.stream_meta("cam-1")))
        assert (meta.backfill_last_seq, meta.backfill_end_seq) == (max(b), 230)
        # A third session with nothing carried: the unused seqs of the margin become gaps.
        await reserve_backfill_seqs(redis, "cam-1", 3)
        assert await backfill(redis, 3) == [236, 237, 238]
        # Beyond a reservation, backfill frames take new seqs.
        assert await backfill(redis, 2) == [239, 240]
        await redis.aclose()

    asyncio.run(run())


def test_backfill_seqs_are_taken_for_several_streams_on_a_redis_cluster(redis_cluster_url: str) -> None:
    """One publisher batch with backfill frames of streams on different masters: the take script
    runs on each stream's own slot (a cluster pipeline refuses redis-py's pipelined script calls)."""

    async def run() -> None:
        redis = redis_client.connect_async(redis_cluster_url, True)
        await reserve_backfill_seqs(redis, "cam-1", 5)
        await reserve_backfill_seqs(redis, "cam-3", 2)
        taken = await take_backfill_seqs(redis, Counter({"cam-1": 3, "cam-3": 3}))
        assert taken == {"cam-1": [1, 2, 3], "cam-3": [1, 2, 3]}  # cam-3's third beyond its reservation
        assert await take_backfill_seqs(redis, Counter({"cam-1": 2})) == {"cam-1": [4, 5]}
        await redis.aclose()

    asyncio.run(run())
