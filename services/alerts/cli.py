"""`flowcloud alerts`: evaluate alert rules on results as they are written, deliver webhooks.

Every option has a ``FLOWCLOUD_ALERTS_*`` environment variable (``--batch-size`` is
``FLOWCLOUD_ALERTS_BATCH_SIZE``); an option given on the command line wins over the environment.
Run as many as the result rate needs: they share consumer groups.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from flowcloud.cli.errors import CommandError
from flowcloud.cli.options import field_option, settings_from_options
from flowcloud.observability import serve_health_and_metrics
from flowcloud.settings import AlertsSettings

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    option = field_option(parser, AlertsSettings)
    option("--redis-url", metavar="URL", help="Redis URL (env FLOWCLOUD_REDIS_URL)")
    option("--name")
    option("--batch-size", type=int)
    option("--poll-ms", type=int)
    option("--claim-idle-ms", type=int)
    option("--rules-cache-seconds", type=float, metavar="SECONDS")
    option("--webhook-timeout", type=float, metavar="SECONDS")
    option("--webhook-attempts", type=int)
    option("--webhook-backoff", type=float, metavar="SECONDS")
    option("--webhook-backoff-max", type=float, metavar="SECONDS")
    option("--deliveries-in-flight", type=int)
    option("--dead-letter-maxlen", type=int)
    option("--metrics-port", type=int)


def settings_from(args: argparse.Namespace) -> AlertsSettings:
    """Environment settings overridden by the options given on the command line."""
    return settings_from_options(AlertsSettings, args)


def run(args: argparse.Namespace) -> int:
    from .service import AlertService

    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per webhook POST is too many
    log.info("alerts settings: %s", settings.describe())
    service = AlertService(settings)
    try:
        health = (
            serve_health_and_metrics(settings.metrics_port, ready=lambda: service.ready)
            if settings.metrics_port
            else None
        )
    except OSError as exc:
        raise CommandError(f"cannot serve /metrics on port {settings.metrics_port}: {exc}") from None
    try:
        return asyncio.run(service.run())
    finally:
        if health is not None:
            health.close()
