"""`flowcloud link`: an emulated network link (delay, rate cap, jitter, outages) in front of a port.

    flowcloud link --to 127.0.0.1:7000 --listen 127.0.0.1:7350 --profile far-gpu
    flowcloud edge --gateway 127.0.0.1:7350 ...

The edge then reaches the gateway as over the far GPU server's link. Runs until Ctrl-C, then
prints what it carried. See `flowcloud.linkemu`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from flowcloud.cli.errors import CommandError
from flowcloud.linkemu import PROFILES, LinkEmulator, LinkProfile, Outage


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _outage(text: str) -> Outage:
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "reset"):
            raise ValueError
        return Outage(float(parts[0]), float(parts[1]), reset=len(parts) == 3)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:SECONDS or START:SECONDS:reset, got {text!r}"
        ) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", type=_address, required=True, help="HOST:PORT the link leads to (a gateway)")
    parser.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 0),
        help="HOST:PORT to accept on (default: a free port)",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="loopback",
        help="; ".join(f"{p.name}: {p.description}" for p in PROFILES.values()),
    )
    parser.add_argument("--delay-ms", type=float, help="one-way delay (overrides the profile's)")
    parser.add_argument("--rate-mbit", type=float, help="bandwidth cap per direction, 0 = none (overrides)")
    parser.add_argument("--jitter-ms", type=float, help="extra delay of up to this much per segment")
    parser.add_argument(
        "--outage",
        type=_outage,
        action="append",
        default=[],
        metavar="START:SECONDS[:reset]",
        help="no delivery from START for SECONDS after the link starts (reset: connections are cut)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter")


def profile_of(args: argparse.Namespace) -> LinkProfile:
    """The named profile, with whatever the options override."""
    base = PROFILES[args.profile]
    delay = base.delay if args.delay_ms is None else args.delay_ms / 1000
    rate = base.rate if args.rate_mbit is None else args.rate_mbit * 1e6
    jitter = base.jitter if args.jitter_ms is None else args.jitter_ms / 1000
    if (delay, rate, jitter) == (base.delay, base.rate, base.jitter):
        return base
    return LinkProfile(f"{base.name}*", delay, rate, jitter, f"{base.name} with options")


async def _serve(args: argparse.Namespace, link: LinkEmulator) -> None:
    host, port = args.listen
    try:
        await link.start(port)
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc}") from None
    to = f"{args.to[0]}:{args.to[1]}"
    print(f"link {link.profile.name} listening on {host}:{link.port} -> {to}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await link.close()


def run(args: argparse.Namespace) -> int:
    try:
        to_host, to_port = args.to
        link = LinkEmulator(
            to_host, to_port, profile_of(args), tuple(args.outage), seed=args.seed, host=args.listen[0]
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args, link))
    up, down = link.up.delivered, link.down.delivered
    print(f"carried {up} bytes up, {down} down, over {link.connections} connections")
    return 0
