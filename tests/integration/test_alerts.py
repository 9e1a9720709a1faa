"""Alerts end to end: rules made through the API, results written through the real MaskStore, a
real `flowcloud alerts` process, a real webhook receiver on loopback that checks signatures.

The expected firings come from a plain restatement of the rule semantics over the same results."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis
from support.alerts import running_alerts, webhook_receiver
from support.api import describe_stream, make_key, running_api, share_result
from support.waiting import wait_for

from flowcloud import alerts, keys
from flowcloud.redis_server import EmbeddedRedis, free_port
from flowcloud.results import MaskResult, MaskStore
from flowcloud.settings import ApiSettings

START = 1_700_000_000.0
PERIOD = 0.1
FAST = ("--poll-ms", "50", "--rules-cache-seconds", "0", "--claim-idle-ms", "500")


@dataclass
class Api:
    client: httpx.Client
    redis_url: str
    admin: str


@pytest.fixture
def api(redis_url: str) -> Iterator[Api]:
    admin = make_key(redis_url, "admin", "ops")
    with (
        running_api(ApiSettings(redis_url=redis_url)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        yield Api(client, redis_url, admin)


def add_rule(api: Api, **body: Any) -> dict[str, Any]:
    reply = api.client.post("/alerts/rules", json=body, headers={"Authorization": f"Bearer {api.admin}"})
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


def person_runs(stream: str, count: int, seed: int) -> list[MaskResult]:
    """Results whose person share comes in runs of 1..6 frames above 0.1, with gaps below."""
    rng = random.Random(seed)
    out: list[MaskResult] = []
    while len(out) < count:
        for _ in range(rng.randint(1, 6)):
            out.append(share_result(stream, len(out), START + len(out) * PERIOD, rng.choice((0.15, 0.3))))
        for _ in range(rng.randint(1, 4)):
            out.append(share_result(stream, len(out), START + len(out) * PERIOD, rng.choice((0.0, 0.05))))
    return out[:count]


def expected_firings(rule: dict[str, Any], results: list[MaskResult], tenants: dict[str, str]) -> set[str]:
    """The rule's firings over results (every stream's in seq order), by the documented semantics."""
    fired_ids: set[str] = set()
    by_stream: dict[str, list[MaskResult]] = {}
    for r in results:
        by_stream.setdefault(r.stream, []).append(r)
    for stream, items in by_stream.items():
        if rule["stream"] not in (None, stream) or tenants[stream] != rule["tenant"]:
            continue
        frames, start, fired, last_fired = 0, 0.0, False, None
        for r in sorted(items, key=lambda r: r.seq):
            share = r.shares.get(11, 0.0)  # trainId 11: person
            holds = share > rule["threshold"] if rule["op"] == "above" else share < rule["threshold"]
            if not holds:
                frames, fired = 0, False
                continue
            start = r.capture_ts if frames == 0 else start
            frames += 1
            if fired or frames < rule["hold_frames"] or r.capture_ts - start < rule["hold_seconds"]:
                continue
            if last_fired is not None and r.capture_ts - last_fired < rule["cooldown"]:
                continue
            fired, last_fired = True, r.capture_ts
            fired_ids.add(alerts.firing_id(rule["id"], stream, r.seq))
    return fired_ids


def write(redis_url: str, results: list[MaskResult], batch: int = 20, pause: float = 0.0) -> None:
    async def run() -> None:
        client = Redis.from_url(redis_url)
        store = MaskStore(client)
        for i in range(0, len(results), batch):
            await store.put_many(results[i : i + batch])
            if pause:
                await asyncio.sleep(pause)
        await client.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(run())


def describe(redis_url: str, streams: dict[str, str]) -> None:
    async def run() -> None:
        client = Redis.from_url(redis_url)
        for stream, tenant in streams.items():
            await describe_stream(client, stream, tenant, START)
        await client.aclose()  # type: ignore[attr-defined,unused-ignore]

    asyncio.run(run())


def delivered_all(redis_url: str) -> bool:
    """No firing waits for delivery and every result was evaluated."""
    client = redis.Redis.from_url(redis_url)
    try:
        pending = int(client.xpending(keys.FIRINGS_STREAM, keys.WEBHOOK_GROUP)["pending"])
        groups = {g["name"]: g for g in client.xinfo_groups(keys.results_shard(0))}
        group = groups[keys.ALERTS_GROUP.encode()]
        return pending == 0 and int(group["pending"]) == 0 and int(group["lag"] or 0) == 0
    finally:
        client.close()


def metric(text: str, name: str) -> float:
    for row in text.splitlines():
        if row.startswith(name + " ") or row.startswith(name + "{"):
            return float(row.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_each_firing_reaches_the_webhook_once_signed_and_is_listed(api: Api, tmp_path: Path) -> None:
    tenants = {"cam-a": "acme", "cam-b": "acme", "cam-z": "globex"}
    describe(api.redis_url, tenants)
    with webhook_receiver() as receiver, running_alerts(api.redis_url, "alerts-1", tmp_path, *FAST) as proc:
        people = add_rule(
            api, tenant="acme", class_name="person", op="above", threshold=0.1, hold_frames=3, cooldown=0,
            webhook_url=receiver.url,
        )  # fmt: skip
        quiet = add_rule(
            api, tenant="acme", stream="cam-a", class_name="person", op="below", threshold=0.01,
            hold_seconds=0.15, cooldown=2.0,
        )  # fmt: skip
        receiver.secrets[people["id"]] = people["webhook_secret"]
        results = person_runs("cam-a", 300, 1) + person_runs("cam-b", 300, 2) + person_runs("cam-z", 300, 3)
        write(api.redis_url, results)
        expected = expected_firings(people, results, tenants)
        assert len(expected) >= 20
        wait_for("every firing delivered", lambda: len(receiver.ids()) >= len(expected), 60, proc)
        wait_for("the queues to drain", lambda: delivered_all(api.redis_url), 30, proc)
        assert sorted(receiver.ids()) == sorted(expected)  # each once
        assert all(r.signed for r in receiver.received)
        recorded = expected_firings(quiet, results, tenants)
        assert recorded
        reader = make_key(api.redis_url, "reader", "acme")
        listed = api.client.get(
            "/alerts/firings", params={"limit": 1000}, headers={"Authorization": f"Bearer {reader}"}
        ).json()["items"]
        assert {f["id"] for f in listed} == expected | recorded
        assert {f["status"] for f in listed if f["rule"] == people["id"]} == {"delivered"}
        assert {f["status"] for f in listed if f["rule"] == quiet["id"]} == {"recorded"}
        other = make_key(api.redis_url, "reader", "globex")
        assert api.client.get("/alerts/firings", headers={"Authorization": f"Bearer {other}"}).json() == {
            "items": []
        }
        text = proc.metrics()
        assert metric(text, "flowcloud_alerts_firings_total") == len(expected) + len(recorded)
        assert metric(text, 'flowcloud_alerts_webhook_deliveries_total{outcome="ok"}') == len(expected)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # stops at once, even while blocked on a read
    # Readers cannot manage rules.
    reply = api.client.get("/alerts/rules", headers={"Authorization": f"Bearer {reader}"})
    assert reply.status_code == 403
    rules = api.client.get("/alerts/rules", headers={"Authorization": f"Bearer {api.admin}"}).json()["items"]
    assert {r["id"] for r in rules} == {people["id"], quiet["id"]} and "webhook_secret" not in rules[0]


def test_a_receiver_that_is_down_gets_the_retries_and_a_dead_one_a_dead_letter(
    api: Api, tmp_path: Path
) -> None:
    tenants = {"cam-a": "acme"}
    describe(api.redis_url, tenants)
    extra = (*FAST, "--webhook-backoff", "0.2", "--webhook-backoff-max", "1", "--webhook-attempts", "4")
    with webhook_receiver() as receiver, running_alerts(api.redis_url, "alerts-2", tmp_path, *extra):
        receiver.down = True
        rule = add_rule(
            api, tenant="acme", class_name="person", op="above", threshold=0.1, hold_frames=2, cooldown=0,
            webhook_url=receiver.url,
        )  # fmt: skip
        nowhere = add_rule(
            api, tenant="acme", class_name="person", op="above", threshold=0.2, cooldown=0,
            webhook_url=f"http://127.0.0.1:{free_port()}/hook",
        )  # fmt: skip
        receiver.secrets[rule["id"]] = rule["webhook_secret"]
        results = person_runs("cam-a", 40, 4)
        write(api.redis_url, results)
        expected = expected_firings(rule, results, tenants)
        assert expected
        wait_for("two refused tries per firing", lambda: receiver.refused >= 2 * len(expected), 30)
        receiver.down = False
        wait_for("the retries to arrive", lambda: len(receiver.ids()) >= len(expected), 30)
        wait_for("the queues to drain", lambda: delivered_all(api.redis_url), 30)
        assert sorted(receiver.ids()) == sorted(expected) and all(r.signed for r in receiver.received)
    headers = {"Authorization": f"Bearer {api.admin}"}
    listed = api.client.get("/alerts/firings", params={"limit": 1000}, headers=headers).json()["items"]
    mine = [f for f in listed if f["rule"] == rule["id"]]
    assert {f["status"] for f in mine} == {"delivered"} and min(f["attempts"] for f in mine) >= 2
    dead = [f for f in listed if f["rule"] == nowhere["id"]]
    assert dead and {f["status"] for f in dead} == {"dead"} and {f["attempts"] for f in dead} == {4}
    letters: Any = redis.Redis.from_url(api.redis_url, decode_responses=True).xrange(keys.WEBHOOK_DEAD_LETTER)
    assert sorted(fields["id"] for _id, fields in letters) == sorted(f["id"] for f in dead)


def test_a_killed_evaluator_loses_no_firing_and_fires_none_twice(api: Api, tmp_path: Path) -> None:
    tenants = {"cam-a": "acme", "cam-b": "acme", "cam-c": "acme"}
    describe(api.redis_url, tenants)
    client = redis.Redis.from_url(api.redis_url)
    with webhook_receiver() as receiver:
        results = person_runs("cam-a", 600, 5) + person_runs("cam-b", 600, 6) + person_runs("cam-c", 600, 7)
        results.sort(key=lambda r: (r.seq, r.stream))  # the streams arrive interleaved, as live
        with running_alerts(api.redis_url, "alerts-a", tmp_path, *FAST, "--batch-size", "8") as first:
            rule = add_rule(
                api, tenant="acme", class_name="person", op="above", threshold=0.1, hold_frames=2, cooldown=0,
                webhook_url=receiver.url,
            )  # fmt: skip
            receiver.secrets[rule["id"]] = rule["webhook_secret"]
            writer = threading.Thread(target=write, args=(api.redis_url, results, 12, 0.02))
            writer.start()
            wait_for("some firings", lambda: int(client.zcard(keys.tenant_firings("acme"))) >= 10, 60, first)
            first.kill()  # SIGKILL, mid-stream: whatever it held stays pending
            first.wait(10)
        killed_at = int(client.zcard(keys.tenant_firings("acme")))
        with running_alerts(api.redis_url, "alerts-b", tmp_path, *FAST) as second:
            writer.join(120)
            expected = expected_firings(rule, results, tenants)
            assert killed_at < len(expected)  # the kill came before the end
            wait_for("every firing delivered", lambda: len(receiver.ids()) >= len(expected), 90, second)
            wait_for("the queues to drain", lambda: delivered_all(api.redis_url), 30, second)
            time.sleep(1.0)  # a late repeat would arrive now
        ids = receiver.ids()
        assert set(ids) == expected and all(r.signed for r in receiver.received)
        # Each result fired at most once: one firing record, one delivery-queue entry per firing.
        assert int(client.zcard(keys.tenant_firings("acme"))) == len(expected)
        assert int(client.xlen(keys.FIRINGS_STREAM)) == len(expected)
        # Delivery is at least once: a POST is repeated only for a firing whose delivery the kill cut
        # between the receiver's 2xx and its record (at most the deliveries in flight), and the
        # repeat carries the same X-FlowCloud-Firing id for the receiver to drop.
        assert len(ids) - len(set(ids)) <= 16
    client.close()


def test_rules_are_checked_and_managed_by_admin_keys_only(api: Api) -> None:
    admin = {"Authorization": f"Bearer {api.admin}"}
    reader = {"Authorization": f"Bearer {make_key(api.redis_url, 'reader', 'acme')}"}
    body = {"tenant": "acme", "class_name": "person", "op": "above", "threshold": 0.2}
    assert api.client.post("/alerts/rules", json=body, headers=reader).status_code == 403
    for bad in ({"class_name": "nobody"}, {"webhook_url": "ftp://x"}, {"threshold": 2}, {"op": "near"}):
        assert api.client.post("/alerts/rules", json={**body, **bad}, headers=admin).status_code == 422, bad
    rule = api.client.post("/alerts/rules", json=body, headers=admin).json()
    assert rule["stream"] is None and rule["hold_frames"] == 1 and len(rule["webhook_secret"]) >= 32
    gone = api.client.delete(f"/alerts/rules/{rule['id']}", params={"tenant": "acme"}, headers=admin)
    assert gone.status_code == 204
    again = api.client.delete(f"/alerts/rules/{rule['id']}", params={"tenant": "acme"}, headers=admin)
    assert again.status_code == 404


def test_rules_live_in_the_control_plane(redis_url: str, tmp_path: Path) -> None:
    """With a control-plane Redis of its own, rules are kept there (and survive the data plane),
    while results, firings and deliveries stay in the data plane."""
    with EmbeddedRedis(tmp_path / "control", appendonly=False) as control:
        admin = make_key(control.url, "admin", "ops")
        settings = ApiSettings(redis_url=redis_url, control_redis_url=control.url)
        with (
            running_api(settings) as base,
            httpx.Client(base_url=base, timeout=10) as client,
            webhook_receiver() as receiver,
            running_alerts(redis_url, "alerts-c", tmp_path, *FAST, control_url=control.url),
        ):
            api = Api(client, redis_url, admin)
            describe(redis_url, {"cam-a": "acme"})
            rule = add_rule(
                api, tenant="acme", class_name="person", op="above", threshold=0.1, webhook_url=receiver.url
            )
            receiver.secrets[rule["id"]] = rule["webhook_secret"]
            assert redis.Redis.from_url(control.url).hexists(keys.alert_rules("acme"), rule["id"])
            assert not redis.Redis.from_url(redis_url).exists(keys.alert_rules("acme"))
            results = person_runs("cam-a", 60, 8)
            write(redis_url, results)
            expected = expected_firings(rule, results, {"cam-a": "acme"})
            wait_for("every firing delivered", lambda: len(receiver.ids()) >= len(expected), 30)
            assert sorted(receiver.ids()) == sorted(expected)
