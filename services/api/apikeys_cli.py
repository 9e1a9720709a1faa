"""`flowcloud apikeys add|list|revoke`: manage the query API's keys in the control-plane Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flowcloud.cli.errors import CommandError
from flowcloud.cli.options import control_url
from flowcloud.settings import redact_url
from services.api.apikeys import ROLES, ApiKey, ApiKeyError, ApiKeyStore

T = TypeVar("T")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        help="the control-plane Redis, where API keys live "
        "(default: FLOWCLOUD_CONTROL_REDIS_URL, else FLOWCLOUD_REDIS_URL)",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="make a key; its token is printed once")
    add.add_argument("--role", required=True, choices=ROLES, help="admin (everything) or reader (read only)")
    add.add_argument("--tenant", required=True, help="whose streams a reader sees (admins: * for all)")
    add.add_argument("--json", action="store_true", help="print JSON for scripts")
    lst = sub.add_parser("list", help="list keys (never their tokens)")
    lst.add_argument("--json", action="store_true", help="print JSON for scripts")
    rev = sub.add_parser("revoke", help="revoke a key for good")
    rev.add_argument("key_id", metavar="ID", help="the key's id (the 12 hex digits after fck_)")
    rev.add_argument("--json", action="store_true", help="print JSON for scripts")


async def _with_store(redis_url: str, action: Callable[[ApiKeyStore], Awaitable[T]]) -> T:
    redis = Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        return await action(ApiKeyStore(redis))
    finally:
        await redis.aclose()  # type: ignore[attr-defined,unused-ignore]  # types-redis predates aclose


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _table(items: list[ApiKey]) -> str:
    rows = [("ID", "ROLE", "TENANT", "CREATED", "REVOKED")]
    rows += [(k.key_id, k.role, k.tenant, _when(k.created), _when(k.revoked)) for k in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    redis_url = control_url(args.redis_url)
    try:
        if args.action == "add":
            key, token = asyncio.run(_with_store(redis_url, lambda s: s.add(args.role, args.tenant)))
            if args.json:
                print(json.dumps({**key.to_dict(), "token": token}))
            else:
                print(f"API key {key.key_id} ({key.role}, tenant {key.tenant}); its token, shown only now:")
                print(token)
        elif args.action == "list":
            items = asyncio.run(_with_store(redis_url, lambda s: s.list()))
            print(json.dumps([k.to_dict() for k in items]) if args.json else _table(items))
        else:
            key = asyncio.run(_with_store(redis_url, lambda s: s.revoke(args.key_id)))
            print(json.dumps(key.to_dict()) if args.json else f"API key {key.key_id} revoked")
    except ApiKeyError as exc:
        raise CommandError(str(exc)) from None
    except (RedisError, OSError) as exc:
        raise CommandError(f"cannot reach Redis at {redact_url(redis_url)}: {exc}") from None
    return 0
