"""The device registry against a real redis-server, and the `flowcloud devices` CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from flowcloud import keys
from flowcloud.cli.main import main as cli_main
from flowcloud.registry import (
    BAD_TOKEN,
    MALFORMED,
    REVOKED,
    UNKNOWN_DEVICE,
    DeviceAuthError,
    DeviceEvent,
    DeviceExistsError,
    DeviceNotFoundError,
    DeviceRegistry,
    DeviceRevokedError,
    RegistryError,
    parse_event,
)


def with_registry(redis_url: str, body: Callable[[DeviceRegistry], Awaitable[None]]) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await body(DeviceRegistry(client))
        finally:
            await client.aclose()

    asyncio.run(main())


def test_add_then_verify(redis_url: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        device, token = await registry.add("cam-01", "acme")
        assert device.tenant == "acme" and device.active
        verified = await registry.verify("cam-01", token)
        assert verified.device_id == "cam-01" and verified.tenant == "acme"

    with_registry(redis_url, body)


def test_token_is_stored_only_as_a_salted_hash(redis_url: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        _, token_a = await registry.add("a")
        _, token_b = await registry.add("b")
        assert token_a != token_b and len(token_a) >= 40
        for device_id, token in (("a", token_a), ("b", token_b)):
            stored = await registry.redis.hgetall(keys.device(device_id))
            blob = repr(stored).encode()
            assert token.encode() not in blob
            assert stored[keys.D_TOKEN_HASH.encode()] != stored[keys.D_SALT.encode()]
        salts = {(await registry.redis.hget(keys.device(d), keys.D_SALT)) for d in ("a", "b")}
        assert len(salts) == 2

    with_registry(redis_url, body)


@pytest.mark.parametrize(
    ("device_id", "token", "code"),
    [("nobody", "x" * 43, UNKNOWN_DEVICE), ("cam", "wrong", BAD_TOKEN), ("cam", "", BAD_TOKEN),
     ("cam", "t" * 10_000, BAD_TOKEN), ("bad id!", "x", MALFORMED), ("../cam", "x", MALFORMED)],
)  # fmt: skip
def test_verify_refuses_with_reject_codes(redis_url: str, device_id: str, token: str, code: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        await registry.add("cam")
        with pytest.raises(DeviceAuthError) as info:
            await registry.verify(device_id, token)
        assert info.value.code == code

    with_registry(redis_url, body)


def test_add_twice_and_invalid_ids(redis_url: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        await registry.add("cam")
        with pytest.raises(DeviceExistsError, match="already registered"):
            await registry.add("cam")
        for bad in ("", "a b", "x" * 65, "-lead", "a:b"):
            with pytest.raises(RegistryError, match="invalid device id"):
                await registry.add(bad)
        for bad_tenant in ("", "acme corp", "*", "t" * 65):  # the API-key tenant rule, so they can match
            with pytest.raises(RegistryError, match="invalid tenant"):
                await registry.add("cam-2", bad_tenant)

    with_registry(redis_url, body)


def test_revoke_publishes_and_refuses(redis_url: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        _, token = await registry.add("cam")
        pubsub = registry.redis.pubsub()
        await pubsub.subscribe(keys.DEVICE_EVENTS)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        device = await registry.revoke("cam")
        assert device.revoked is not None and not device.active
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None and parse_event(message["data"]) == DeviceEvent("revoked", "cam")
        await pubsub.aclose()
        with pytest.raises(DeviceAuthError) as info:
            await registry.verify("cam", token)
        assert info.value.code == REVOKED
        with pytest.raises(DeviceRevokedError):
            await registry.rotate("cam")
        with pytest.raises(DeviceExistsError):
            await registry.add("cam")
        with pytest.raises(DeviceNotFoundError):
            await registry.revoke("ghost")

    with_registry(redis_url, body)


def test_rotate_replaces_the_token(redis_url: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        _, old = await registry.add("cam")
        device, new = await registry.rotate("cam")
        assert new != old and device.rotated is not None
        await registry.verify("cam", new)
        with pytest.raises(DeviceAuthError) as info:
            await registry.verify("cam", old)
        assert info.value.code == BAD_TOKEN

    with_registry(redis_url, body)


def test_list_sorted_and_filtered(redis_url: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        await asyncio.gather(registry.add("b", "t1"), registry.add("a", "t2"), registry.add("c", "t1"))
        await registry.revoke("c")
        assert [d.device_id for d in await registry.list()] == ["a", "b", "c"]
        assert [(d.device_id, d.active) for d in await registry.list("t1")] == [("b", True), ("c", False)]

    with_registry(redis_url, body)


def test_parse_event() -> None:
    assert parse_event(b"rotated cam-1") == DeviceEvent("rotated", "cam-1")
    assert parse_event(b"connected cam-1 9f3a") == DeviceEvent("connected", "cam-1", "9f3a")  # older gateways
    assert parse_event(b"connected cam-1 9f3a 17") == DeviceEvent("connected", "cam-1", "9f3a", 17)
    bad_events = ("hello world", b"revoked", b"revoked a b", b"connected cam-1", b"connected cam-1 ", b"")
    for bad in (*bad_events, b"connected cam-1 9f3a -1", b"connected cam-1 9f3a x", b"connected a b 1 2"):
        assert parse_event(bad) is None, bad


def test_announced_sessions_reach_subscribers(redis_url: str) -> None:
    async def body(registry: DeviceRegistry) -> None:
        pubsub = registry.redis.pubsub()
        await pubsub.subscribe(keys.DEVICE_EVENTS)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        await registry.announce_session("cam", "0123abcd", 42)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None
        assert parse_event(message["data"]) == DeviceEvent("connected", "cam", "0123abcd", 42)
        await pubsub.aclose()

    with_registry(redis_url, body)


def test_cli_add_list_rotate_revoke(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["devices", "--redis-url", redis_url]
    assert cli_main([*base, "add", "cam-9", "--tenant", "acme", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["device_id"] == "cam-9" and added["tenant"] == "acme" and added["token"]
    assert cli_main([*base, "add", "cam-9"]) == 1
    assert "already registered" in capsys.readouterr().err
    assert cli_main([*base, "rotate", "cam-9", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["token"] != added["token"]
    client = aioredis.Redis.from_url(redis_url)

    async def check(token: str) -> str:
        try:
            await DeviceRegistry(client).verify("cam-9", token)
            return "ok"
        except DeviceAuthError as exc:
            return exc.code
        finally:
            await client.aclose()

    assert asyncio.run(check(rotated["token"])) == "ok"
    assert cli_main([*base, "revoke", "cam-9"]) == 0
    assert "Revoked device cam-9" in capsys.readouterr().out
    assert cli_main([*base, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["device_id"], d["active"]) for d in listed] == [("cam-9", False)]
    assert cli_main([*base, "list"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert (
        cli_main(["devices", "list", "--json", "--redis-url", redis_url]) == 0
    )  # the option after the action
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert cli_main([*base, "revoke", "nope"]) == 1
    assert "not registered" in capsys.readouterr().err


def test_cli_reports_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    from flowcloud.redis_server import free_port

    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    assert cli_main(["devices", "--redis-url", url, "list"]) == 1
    err = capsys.readouterr().err
    assert "Redis at redis://:***@127.0.0.1" in err and "secret" not in err
