"""The sharded frame path on a real redis-server (issue 14, item 1): each frame's bytes are written
once, to its stream's frame log, and a reference goes to the queue of the stream's shard; the lease
fences off a stale session's frames; a reference whose frame left the log is counted; a real worker
reads every shard, and a busy shard does not starve another."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from prometheus_client import REGISTRY
from redis.asyncio import Redis as AsyncRedis
from support.frames import Entries, entries, publish
from support.gateway import dropped
from support.waiting import wait_for
from support.worker import all_judged, frame, result_count, result_seqs, running_worker

from flowcloud import keys
from flowcloud.frame_log import logged_frames, publish_blocking
from flowcloud.frame_queue import ensure_group
from flowcloud.frames import Frame
from flowcloud.settings import WorkerSettings
from services.gateway.publisher import UNASSIGNED_SEQ, FramePublisher
from services.worker import backfill
from services.worker.consumer import Worker
from services.worker.recovery import Entry, Recovery, load_entries

SHARDS = 3


def streams_on_shards(shards: int, per_shard: int = 1) -> list[list[str]]:
    """Stream ids, ``per_shard`` of them on each shard (by `keys.shard_of`)."""
    out: list[list[str]] = [[] for _ in range(shards)]
    i = 0
    while any(len(names) < per_shard for names in out):
        name = f"cam-{i}"
        if len(out[keys.shard_of(name, shards)]) < per_shard:
            out[keys.shard_of(name, shards)].append(name)
        i += 1
    return out


def publish_through_gateway(redis_url: str, frames: list[Frame], **options: Any) -> FramePublisher:
    """Frames through the gateway's real publisher (seqs assigned by it); it is closed on return."""

    async def main() -> FramePublisher:
        client = AsyncRedis.from_url(redis_url)
        publisher = FramePublisher(client, 1000, **options)
        publisher.start()
        for f in frames:
            publisher.submit(dataclasses.replace(f, seq=UNASSIGNED_SEQ))
        await publisher.close(30.0)
        await client.aclose()
        return publisher

    return asyncio.run(main())


def every_value(client: redis.Redis) -> list[bytes]:
    """Every field value of every stream entry and hash on the server (SCAN: one node)."""
    values: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"stream":
            for _, fields in cast(Entries, client.xrange(key)):
                values += fields.values()
        elif kind == b"hash":
            values += cast(dict[bytes, bytes], client.hgetall(key)).values()
    return values


def test_each_frames_bytes_are_written_once_and_its_shard_queue_holds_a_reference(redis_url: str) -> None:
    names = [name for shard in streams_on_shards(SHARDS, 2) for name in shard]
    frames = [frame(name, 0, 48, 64) for name in names for _ in range(5)]
    frames = [dataclasses.replace(f, data=f.data + i.to_bytes(4, "big")) for i, f in enumerate(frames)]
    publisher = publish_through_gateway(redis_url, frames, shards=SHARDS)
    assert publisher.published == len(frames)
    client = redis.Redis.from_url(redis_url)
    values = every_value(client)
    for f in frames:
        assert values.count(f.data) == 1, "a frame's bytes are on Redis exactly once"
    for name in names:
        logged = entries(client, keys.stream_frames(name))
        assert [Frame.from_fields(fields).data for _, fields in logged] == [
            f.data for f in frames if f.stream == name
        ]
        queue = keys.frame_shard(keys.shard_of(name, SHARDS))
        refs = [fields for _, fields in entries(client, queue) if fields[b"stream"] == name.encode()]
        assert [ref[keys.F_FRAME_ID.encode()] for ref in refs] == [entry_id for entry_id, _ in logged]
        assert [int(ref[b"seq"]) for ref in refs] == [1, 2, 3, 4, 5]
        assert 0 < client.ttl(keys.stream_frames(name)) <= 3600  # a quiet stream's log goes in time
    # Each shard queue holds the references of its own streams only.
    for shard in range(SHARDS):
        queued = entries(client, keys.frame_shard(shard))
        assert {keys.shard_of(fields[b"stream"].decode(), SHARDS) for _, fields in queued} == {shard}
    client.close()


def test_the_gateway_writes_once_through_a_server_that_lost_its_scripts(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.script_flush()  # a promoted replica, or a restarted server: every EVALSHA answers NOSCRIPT
    names = [shard[0] for shard in streams_on_shards(2)]
    frames = [frame(name, 0, 48, 64) for name in names for _ in range(3)]
    publisher = publish_through_gateway(redis_url, frames, shards=2)
    assert publisher.published == len(frames)
    for name in names:
        assert len(logged_frames(client, name)) == 3  # the append ran once, after the script was loaded
        queue = keys.frame_shard(keys.shard_of(name, 2))
        assert client.xlen(queue) == 3
        assert [g["name"] for g in client.xinfo_groups(queue)] == [keys.WORKER_GROUP.encode()]  # trimmed
    client.close()


def test_the_lease_fences_off_frames_of_a_stale_generation(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.stream_meta("cam-1"), keys.M_GENERATION, 5)
    stale = [dataclasses.replace(frame("cam-1", 0, 48, 64), generation=4) for _ in range(3)]
    current = [dataclasses.replace(frame("cam-1", 0, 48, 64), generation=5) for _ in range(2)]
    unfenced = [frame("cam-2", 0, 48, 64)]  # generation 0: a tool's frame, never fenced
    before = dropped("fenced")
    publisher = publish_through_gateway(redis_url, [*stale, *current, *unfenced])
    assert publisher.published == 3 and dropped("fenced") - before == 3
    kept = logged_frames(client, "cam-1")
    assert [f.data for f in kept] == [f.data for f in current]
    assert [f.data for f in logged_frames(client, "cam-2")] == [unfenced[0].data]
    refs = [fields[b"stream"] for _, fields in entries(client, keys.frame_shard(0))]
    assert sorted(refs) == [b"cam-1", b"cam-1", b"cam-2"]
    client.close()


def test_a_reference_whose_frame_left_its_log_is_acknowledged_and_counted(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    queue = keys.frame_shard(0)
    frames = [frame("cam-e", seq, 48, 64) for seq in range(1, 251)]
    publish_blocking(client, frames, maxlen=10)  # the log keeps ~10: whole nodes of 100 go
    kept = client.xlen(keys.stream_frames("cam-e"))
    assert 10 <= kept < 250
    client.xadd(queue, {keys.F_STREAM: "cam-e", keys.F_SEQ: 999})  # names no frame: malformed
    bad_id = client.xadd(keys.stream_frames("cam-x"), {keys.F_STREAM: "cam-x"})  # a malformed frame
    client.xadd(queue, {keys.F_STREAM: "cam-x", keys.F_SEQ: 1, keys.F_FRAME_ID: bad_id})

    def evicted_total() -> float:
        return (
            REGISTRY.get_sample_value("flowcloud_worker_frames_dropped_total", {"reason": "evicted"}) or 0.0
        )

    async def main() -> list[Entry]:
        aclient = AsyncRedis.from_url(redis_url)
        await ensure_group(aclient, queue)
        reply = await aclient.xreadgroup(keys.WORKER_GROUP, "w", {queue: ">"}, count=1000)
        loaded = await load_entries(aclient, queue, cast(list[Any], reply)[0][1])
        await aclient.aclose()
        return loaded

    before = evicted_total()
    loaded = asyncio.run(main())
    good = [e for e in loaded if e.frame is not None]
    assert [e.frame.seq for e in good if e.frame] == list(range(251 - kept, 251))
    assert all(e.frame.data == frames[e.frame.seq - 1].data for e in good if e.frame)
    assert [e.error for e in loaded if e.frame is None] == [
        "frame reference lacks a valid stream or frame id",
        "frame entry lacks field 'seq'",
    ]
    assert evicted_total() - before == 250 - kept
    assert int(client.hget(keys.stream_meta("cam-e"), keys.M_EVICTED) or 0) == 250 - kept
    assert client.xpending(queue, keys.WORKER_GROUP)["pending"] == kept + 2  # the evicted ones acked
    client.close()


def test_a_backfill_reference_trimmed_while_pending_is_counted(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "CLAIM_IDLE_MS", 0)  # reclaim at once: no 30 s wait
    client = redis.Redis.from_url(redis_url)
    lane = keys.backfill_shard(0)
    publish_blocking(
        client, [dataclasses.replace(frame("cam-b", s, 48, 64), backfill=True) for s in range(1, 6)]
    )

    def trimmed_pending() -> float:
        sample = REGISTRY.get_sample_value(
            "flowcloud_worker_frames_dropped_total", {"reason": "trimmed_pending"}
        )
        return sample or 0.0

    async def main() -> tuple[int, int]:
        aclient = AsyncRedis.from_url(redis_url)
        reader = backfill.BackfillLane(aclient, "w-dead")
        first = await reader.read(10)  # read, never acknowledged: the worker died
        client.xtrim(lane, maxlen=0, approximate=False)  # the lane's bound removed them meanwhile
        again = await backfill.BackfillLane(aclient, "w-live").read(10)
        await aclient.aclose()
        return len(first), len(again)

    before = trimmed_pending()
    assert asyncio.run(main()) == (5, 0)
    assert trimmed_pending() - before == 5
    assert client.xpending(lane, keys.WORKER_GROUP)["pending"] == 0
    client.close()


def test_a_worker_acknowledges_frames_of_every_queue_and_forgets_their_failures(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    names = [shard[0] for shard in streams_on_shards(2)]
    publish_blocking(client, [frame(name, 1, 48, 64) for name in names], shards=2)
    publish_blocking(client, [dataclasses.replace(frame(names[0], 2, 48, 64), backfill=True)], shards=2)
    queues = [keys.frame_shard(0), keys.frame_shard(1), keys.backfill_shard(keys.shard_of(names[0], 2))]
    for name, seq in [(names[0], 1), (names[1], 1), (names[0], 2)]:
        client.set(keys.attempts(name, seq), 1)  # each failed once before

    async def main() -> None:
        aclient = AsyncRedis.from_url(redis_url)
        worker = Worker(WorkerSettings(frame_shards=2, name="w"), redis=aclient)
        read: list[Entry] = []
        for queue in queues:
            await ensure_group(aclient, queue)
            reply = await aclient.xreadgroup(keys.WORKER_GROUP, "w", {queue: ">"}, count=10)
            read += await load_entries(aclient, queue, cast(list[Any], reply)[0][1])
        for entry in read:
            entry.deliveries = 2  # reclaimed: its failure counter goes once it succeeds
        await worker._ack(read)
        worker.cpu_pool.shutdown()
        worker.infer_pool.shutdown()
        await aclient.aclose()

    asyncio.run(main())
    assert [client.xpending(queue, keys.WORKER_GROUP)["pending"] for queue in queues] == [0, 0, 0]
    assert not client.exists(
        keys.attempts(names[0], 1), keys.attempts(names[1], 1), keys.attempts(names[0], 2)
    )
    client.close()


def test_dead_letters_are_counted_by_reason(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    queue = keys.frame_shard(0)
    publish_blocking(client, [frame("cam-d", 1, 48, 64)])
    client.xadd(queue, {keys.F_STREAM: "cam-d", keys.F_SEQ: 2})  # names no frame: malformed

    def dead(reason: str) -> float:
        sample = REGISTRY.get_sample_value("flowcloud_worker_frames_dead_lettered_total", {"reason": reason})
        return sample or 0.0

    async def main() -> None:
        aclient = AsyncRedis.from_url(redis_url)
        recovery = Recovery(aclient, "w", max_attempts=2)
        await ensure_group(aclient, queue)
        reply = await aclient.xreadgroup(keys.WORKER_GROUP, "w", {queue: ">"}, count=10)
        good, bad = await load_entries(aclient, queue, cast(list[Any], reply)[0][1])
        assert await recovery.fail(bad, "unused")  # malformed: dead-lettered at once
        assert [e.id for e in await recovery.claim(queue, 0, 10)] == [good.id]  # 2 deliveries: within the max
        assert await recovery.claim(queue, 0, 10) == []  # a third delivery, never acknowledged
        await aclient.aclose()

    before = {reason: dead(reason) for reason in ("malformed", "failed", "redelivered")}
    asyncio.run(main())
    assert {reason: dead(reason) - count for reason, count in before.items()} == {
        "malformed": 1,
        "failed": 0,
        "redelivered": 1,
    }
    assert client.xlen(keys.DEAD_LETTER_STREAM) == 2
    assert client.xpending(queue, keys.WORKER_GROUP)["pending"] == 0
    client.close()


@pytest.mark.slow
def test_a_worker_reads_every_shard_and_a_busy_shard_does_not_starve_another(
    redis_url: str, weights: Path, tmp_path: Path
) -> None:
    (busy,), (quiet_1,), (quiet_2,) = streams_on_shards(SHARDS)
    client = redis.Redis.from_url(redis_url)
    backlog = 60
    publish(client, [frame(busy, seq, 48, 64) for seq in range(1, backlog + 1)], SHARDS)
    args = (
        "--mode",
        "complete",
        "--batch-size",
        "4",
        "--batch-timeout-ms",
        "50",
        "--frame-shards",
        str(SHARDS),
    )
    with running_worker(redis_url, weights, "w-shards", tmp_path, *args) as proc:
        publish(
            client, [frame(name, seq, 48, 64) for name in (quiet_1, quiet_2) for seq in (1, 2, 3)], SHARDS
        )
        quiet_done = lambda: result_count(client, quiet_1) == 3 and result_count(client, quiet_2) == 3  # noqa: E731
        wait_for("the quiet shards' frames segmented", quiet_done, 120, proc)
        busy_done_then = result_count(client, busy)
        assert busy_done_then < backlog, "the quiet shards waited for the busy shard's whole backlog"
        wait_for("every frame segmented", lambda: result_count(client, busy) == backlog, 120, proc)
        wait_for("every reference acknowledged", lambda: all_judged(client, SHARDS), 30, proc)
        assert proc.stop() == 0
    assert result_seqs(client, busy) == list(range(1, backlog + 1))
    client.close()
