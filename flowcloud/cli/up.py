"""`flowcloud up`: gateway, worker and API together on this machine, until Ctrl-C.

Without FLOWCLOUD_REDIS_URL an embedded redis-server is started with its data in
``--data-dir``. Ctrl-C (or SIGTERM) shuts everything down in order, Redis last, with no orphan
process. Each port comes from its option, else its service's ``FLOWCLOUD_*`` variable, else the
service's default; 0 picks a free port.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from types import FrameType

from flowcloud.cli.errors import CommandError
from flowcloud.settings import ApiSettings, GatewaySettings, WorkerSettings
from flowcloud.stack import Stack, StackConfig

# option -> (environment variable, default): the services' own settings and defaults
PORTS: dict[str, tuple[str, int]] = {
    "gateway_port": ("FLOWCLOUD_GATEWAY_PORT", GatewaySettings.model_fields["port"].default),
    "api_port": ("FLOWCLOUD_API_PORT", ApiSettings.model_fields["port"].default),
    "gateway_metrics_port": (
        "FLOWCLOUD_GATEWAY_METRICS_PORT",
        GatewaySettings.model_fields["metrics_port"].default,
    ),
    "worker_metrics_port": (
        "FLOWCLOUD_WORKER_METRICS_PORT",
        WorkerSettings.model_fields["metrics_port"].default,
    ),
}
PORT_HELP = {
    "gateway_port": "TCP port for edge devices",
    "api_port": "HTTP port of the API and dashboard",
    "gateway_metrics_port": "the gateway's /metrics and /readyz",
    "worker_metrics_port": "the first worker's /metrics and /readyz (worker i: this + i)",
}


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".flowcloud"), help="logs and embedded Redis data"
    )
    for name, (variable, default) in PORTS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            metavar="PORT",
            help=f"{PORT_HELP[name]} (env {variable}, default {default}; 0 = any free port)",
        )
    parser.add_argument("--workers", type=int, default=1, help="segmentation worker processes")
    parser.add_argument("--host", default="127.0.0.1", help="address the gateway and API listen on")


def _port(args: argparse.Namespace, name: str) -> int:
    variable, default = PORTS[name]
    given = getattr(args, name, None)
    if given is not None:
        return int(given)
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"{variable}={text!r} is not a port number") from None


def stack_config(args: argparse.Namespace, **extra: object) -> StackConfig:
    if args.workers < 1:
        raise CommandError("--workers must be at least 1")
    try:
        return StackConfig(
            data_dir=args.data_dir,
            redis_url=os.environ.get("FLOWCLOUD_REDIS_URL"),
            gateway_port=_port(args, "gateway_port"),
            api_port=_port(args, "api_port"),
            gateway_metrics_port=_port(args, "gateway_metrics_port"),
            worker_metrics_port=_port(args, "worker_metrics_port"),
            workers=args.workers,
            host=args.host,
            **extra,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None


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
