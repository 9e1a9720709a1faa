"""`flowcloud devices add|list|revoke|rotate`: manage the edge devices allowed to stream.

flowcloud devices add cam-01 --tenant acme     # prints the new token once
flowcloud devices list --json
flowcloud devices rotate cam-01                # prints a new token; the old one stops working
flowcloud devices revoke cam-01                # its live session is closed within a second
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from flowcloud.cli.errors import CommandError
from flowcloud.cli.options import control_url
from flowcloud.registry import DEFAULT_TENANT, Device, DeviceRegistry, RegistryError
from flowcloud.settings import DEFAULT_REDIS_URL, redact_url

REDIS_URL_HELP = (
    "the control-plane Redis, where devices live (default: $FLOWCLOUD_CONTROL_REDIS_URL, "
    f"else $FLOWCLOUD_REDIS_URL, else {DEFAULT_REDIS_URL})"
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help=REDIS_URL_HELP)
    # --redis-url is accepted after the action too (SUPPRESS keeps the value given before it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=argparse.SUPPRESS, help=REDIS_URL_HELP)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser(
        "add", parents=[common], help="register a device and print its token (shown only once)"
    )
    add.add_argument("device_id", metavar="ID")
    add.add_argument(
        "--tenant", default=DEFAULT_TENANT, help="tenant the device belongs to (default: %(default)s)"
    )
    add.add_argument("--json", action="store_true", help="print JSON for scripts")
    lst = sub.add_parser("list", parents=[common], help="list registered devices")
    lst.add_argument("--tenant", default=None, help="only this tenant's devices")
    lst.add_argument("--json", action="store_true", help="print JSON for scripts")
    rev = sub.add_parser(
        "revoke", parents=[common], help="revoke a device for good (closes its live session)"
    )
    rev.add_argument("device_id", metavar="ID")
    rev.add_argument("--json", action="store_true", help="print JSON for scripts")
    rot = sub.add_parser(
        "rotate", parents=[common], help="issue a new token (the old one stops working at once)"
    )
    rot.add_argument("device_id", metavar="ID")
    rot.add_argument("--json", action="store_true", help="print JSON for scripts")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _print_token(device: Device, token: str, as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps({**device.to_dict(), "token": token}))
        return
    print(f"{verb} device {device.device_id} (tenant {device.tenant}).")
    print(f"token: {token}")
    print("Store this token on the device now: it is not shown again.")


async def _act(args: argparse.Namespace, registry: DeviceRegistry) -> int:
    if args.action == "add":
        device, token = await registry.add(args.device_id, args.tenant)
        _print_token(device, token, args.json, "Registered")
    elif args.action == "rotate":
        device, token = await registry.rotate(args.device_id)
        _print_token(device, token, args.json, "Rotated the token of")
    elif args.action == "revoke":
        device = await registry.revoke(args.device_id)
        if args.json:
            print(json.dumps(device.to_dict()))
        else:
            print(f"Revoked device {device.device_id} at {_when(device.revoked)}.")
    else:
        devices = await registry.list(args.tenant)
        if args.json:
            print(json.dumps([d.to_dict() for d in devices]))
        elif not devices:
            print("No devices registered.")
        else:
            print(f"{'ID':<24} {'TENANT':<16} {'STATUS':<8} {'CREATED':<20} REVOKED")
            for d in devices:
                status = "active" if d.active else "revoked"
                print(
                    f"{d.device_id:<24} {d.tenant:<16} {status:<8} {_when(d.created):<20} {_when(d.revoked)}"
                )
    return 0


async def _with_registry(url: str, action: Callable[[DeviceRegistry], Awaitable[int]]) -> int:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        return await action(DeviceRegistry(client))
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    url = control_url(args.redis_url)
    try:
        return asyncio.run(_with_registry(url, lambda registry: _act(args, registry)))
    except RegistryError as exc:
        raise CommandError(str(exc)) from None
    except RedisError as exc:
        raise CommandError(f"Redis at {redact_url(url)}: {exc}") from None
