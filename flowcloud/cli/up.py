"""`flowcloud up`: gateway, worker and API together on this machine, until Ctrl-C.

Without FLOWCLOUD_REDIS_URL an embedded redis-server is started with its data in
``--data-dir``. Ctrl-C (or SIGTERM) shuts everything down in order, with no orphan process.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from types import FrameType

from flowcloud.cli.errors import CommandError
from flowcloud.stack import Stack, StackConfig


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".flowcloud"), help="logs and embedded Redis data"
    )
    parser.add_argument("--gateway-port", type=int, default=7000, help="TCP port for edge devices")
    parser.add_argument("--api-port", type=int, default=8000, help="HTTP port of the API and dashboard")
    parser.add_argument("--workers", type=int, default=1, help="segmentation worker processes")
    parser.add_argument("--host", default="127.0.0.1", help="address the gateway and API listen on")


def stack_config(args: argparse.Namespace, **extra: object) -> StackConfig:
    if args.workers < 1:
        raise CommandError("--workers must be at least 1")
    return StackConfig(
        data_dir=args.data_dir,
        redis_url=os.environ.get("FLOWCLOUD_REDIS_URL"),
        gateway_port=args.gateway_port,
        api_port=args.api_port,
        workers=args.workers,
        host=args.host,
        **extra,  # type: ignore[arg-type]
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def start_stack(config: StackConfig) -> Stack:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return Stack(config).start()
    except (RuntimeError, TimeoutError, FileNotFoundError, OSError) as exc:
        raise CommandError(str(exc)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    add_stack_arguments(parser)


def run(args: argparse.Namespace) -> int:
    stack = start_stack(stack_config(args))
    try:
        print(f"gateway  {stack.gateway_address}   (edge devices connect here)")
        print(f"api      {stack.api_url}/   (dashboard; OpenAPI at /openapi.json with a key)")
        print(f"redis    {stack.redis_url}")
        print("Ctrl-C stops everything.")
        while True:
            stack.check()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping ...")
    finally:
        codes = stack.stop()
    print("stopped: " + ", ".join(f"{name}={code}" for name, code in codes.items()))
    return 0
