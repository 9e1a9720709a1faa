"""`flowcloud COMMAND ...`: dispatch to the module that implements each command.

A command module defines ``configure(parser)`` (adds its arguments) and ``run(args) -> int``.
Modules are imported only when their command runs, so `flowcloud --help` stays fast and the
edge daemon never imports the server stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from flowcloud import __version__
from flowcloud.cli.errors import CommandError

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("flowcloud.cli.infer", "segment an image or a video file on this machine"),
    "synth": ("training.synth_cli", "generate synthetic street scenes with exact ground truth"),
    "train": ("training.train", "fine-tune a zoo model on Cityscapes-layout data"),
    "eval": ("training.evaluate", "pixel accuracy and IoU of a model on Cityscapes-layout data"),
    "export": ("training.export", "export a checkpoint to weights, TorchScript or ONNX"),
    "edge": ("edge.cli", "run the edge daemon: capture, encode, send to a gateway"),
    "gateway": ("services.gateway.cli", "run the ingest gateway"),
    "devices": ("flowcloud.cli.devices", "register, list, revoke and rotate edge devices"),
    "worker": ("services.worker.cli", "run a segmentation worker"),
    "api": ("services.api.cli", "run the query API and dashboard"),
    "apikeys": ("services.api.apikeys_cli", "add, list and revoke API keys"),
    "alerts": ("services.alerts.cli", "evaluate alert rules on new results and deliver webhooks"),
    "up": ("flowcloud.cli.up", "run gateway, worker and API together on this machine"),
    "demo": ("flowcloud.cli.demo", "run the whole pipeline on the synthetic street video"),
    "redis-cluster": (
        "flowcloud.cli.redis_cluster",
        "run a local Redis Cluster (masters, replicas) to try cluster mode",
    ),
    "link": ("flowcloud.cli.link", "emulate a network link (delay, bandwidth, jitter, outages) to a port"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowcloud",
        description="FlowCloud: semantic segmentation of live edge video on GPU machines.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
        + "\n\nRun 'flowcloud COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"flowcloud {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="see below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split "[-v] COMMAND rest...": parse global options up to the command name only.
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    top_args = top.parse_args(argv[: split + 1])
    module_name, text = COMMANDS[top_args.command]
    logging.basicConfig(
        level=logging.DEBUG if top_args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"flowcloud {top_args.command}: unavailable ({exc}); install the matching extra", file=sys.stderr
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"flowcloud {top_args.command}", description=text)
    module.configure(parser)
    args = parser.parse_args(argv[split + 1 :])
    try:
        return int(module.run(args) or 0)
    except CommandError as exc:
        print(f"flowcloud {top_args.command}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the imported module so that `python -m flowcloud.cli.main` and
    # `python -m flowcloud` share one set of classes.
    from flowcloud.cli import main as _cli

    sys.exit(_cli.main())
