"""`flowcloud api`: run the query API and dashboard (uvicorn, one worker)."""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

from flowcloud.cli.options import build_settings
from flowcloud.settings import ApiSettings

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the query API and dashboard. Settings come from FLOWCLOUD_API_* env vars "
        "(FLOWCLOUD_API_ADMIN_KEY: a bootstrap admin key) and FLOWCLOUD_REDIS_URL; options override them."
    )
    parser.add_argument("--host", help="address to listen on (FLOWCLOUD_API_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="HTTP port (FLOWCLOUD_API_PORT, default 8000)")
    parser.add_argument("--redis-url", help="Redis URL (FLOWCLOUD_REDIS_URL)")


def settings_from(args: argparse.Namespace) -> ApiSettings:
    return build_settings(ApiSettings, {"host": args.host, "port": args.port, "redis_url": args.redis_url})


def run(args: argparse.Namespace) -> int:
    from services.api.main import serve

    settings = settings_from(args)
    log.info("dashboard at http://%s:%d/dashboard", settings.host, settings.port)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that
    # a clean exit (status 0) rather than death by signal (and a stop before uvicorn starts one too).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    serve(settings)
    return 0


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
