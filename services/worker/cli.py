"""`flowcloud worker`: consume frames, segment them in batches, persist masks (at least once).

Every option has a ``FLOWCLOUD_WORKER_*`` environment variable (``--batch-size`` is
``FLOWCLOUD_WORKER_BATCH_SIZE``); an option given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from flowcloud.cli.errors import CommandError
from flowcloud.cli.options import field_option, settings_from_options
from flowcloud.inference import COMPILE_MODES, PRECISIONS
from flowcloud.labels import LABEL_SETS
from flowcloud.observability import serve_health_and_metrics
from flowcloud.settings import WorkerSettings
from flowcloud.zoo import MODEL_NAMES, WeightsError

from .policy import MODES

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    fields = WorkerSettings.model_fields

    option = field_option(parser, WorkerSettings)
    option("--redis-url", metavar="URL", help="Redis URL (env FLOWCLOUD_REDIS_URL)")
    option("--name", help="consumer name in the group (default: hostname-pid)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODEL_NAMES, default=None, help=fields["model"].description)
    model.add_argument("--weights", default=None, help=fields["weights"].description)
    model.add_argument(
        "--random-weights", action="store_true", default=None, help=fields["random_weights"].description
    )
    model.add_argument(
        "--label-set", choices=sorted(LABEL_SETS), default=None, help=fields["label_set"].description
    )
    model.add_argument("--device", default=None, help=fields["device"].description)
    model.add_argument("--precision", choices=PRECISIONS, default=None, help=fields["precision"].description)
    model.add_argument("--input-size", metavar="HxW", default=None, help=fields["input_size"].description)
    model.add_argument("--warmup-size", metavar="HxW", default=None, help=fields["warmup_size"].description)
    model.add_argument("--threads", type=int, default=None, help=fields["threads"].description)
    model.add_argument("--decode-threads", type=int, default=None, help=fields["decode_threads"].description)
    model.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        default=None,
        help="NCHW memory format",
    )
    model.add_argument("--compile", action="store_true", default=None, help=fields["compile"].description)
    model.add_argument(
        "--compile-mode", choices=COMPILE_MODES, default=None, help=fields["compile_mode"].description
    )
    option("--batch-size", type=int)
    option("--batch-timeout-ms", type=int)
    option("--mode", choices=MODES)
    option("--max-frame-age", type=float, metavar="SECONDS")
    option("--max-queued-frames", type=int)
    option("--claim-idle-ms", type=int)
    option("--max-attempts", type=int)
    option("--drain-timeout", type=float, metavar="SECONDS")
    option("--results-max-per-stream", type=int)
    option("--results-ttl", type=int, metavar="SECONDS")
    option("--results-tenant-max-bytes", type=int, metavar="BYTES")
    option("--results-events-maxlen", type=int)
    option("--dead-letter-maxlen", type=int)
    option("--heartbeat-interval", type=float, metavar="SECONDS")
    option("--poll-ms", type=int)
    option("--frame-shards", type=int)
    option("--metrics-port", type=int)


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    """Environment settings overridden by the options given on the command line."""
    return settings_from_options(WorkerSettings, args)


def run(args: argparse.Namespace) -> int:
    from .consumer import Worker

    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    log.info("worker settings: %s", settings.describe())
    worker = Worker(settings)
    try:
        health = (
            serve_health_and_metrics(settings.metrics_port, ready=lambda: worker.ready)
            if settings.metrics_port
            else None
        )
    except OSError as exc:
        raise CommandError(f"cannot serve /metrics on port {settings.metrics_port}: {exc}") from None
    try:
        return asyncio.run(worker.run())
    except (WeightsError, RuntimeError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        if health is not None:
            health.close()
