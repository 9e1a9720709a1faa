"""`flowcloud gateway`: run the ingest gateway until SIGTERM/SIGINT.

Settings come from ``FLOWCLOUD_GATEWAY_*`` env vars (and ``FLOWCLOUD_REDIS_URL``); the options
below override them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from flowcloud.cli.errors import CommandError
from flowcloud.cli.options import build_settings
from flowcloud.frames import ENCODINGS
from flowcloud.observability import serve_health_and_metrics
from flowcloud.settings import GatewaySettings

log = logging.getLogger(__name__)

# option -> settings field
OPTIONS: dict[str, str] = {
    "redis_url": "redis_url",
    "host": "host",
    "port": "port",
    "metrics_port": "metrics_port",
    "model_size": "model_size",
    "frame_encoding": "frame_encoding",
    "jpeg_quality": "jpeg_quality",
    "record": "record_dir",
    "max_sessions": "max_sessions",
    "handshake_timeout": "handshake_timeout",
    "tls_cert": "tls_cert_file",
    "tls_key": "tls_key_file",
    "tls_client_ca": "tls_client_ca_file",
    "tls_reload_interval": "tls_reload_interval",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (env FLOWCLOUD_REDIS_URL)")
    parser.add_argument("--host", help="address to listen on (env FLOWCLOUD_GATEWAY_HOST, default 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, help="TCP port for edge devices (env FLOWCLOUD_GATEWAY_PORT, default 7000)"
    )
    parser.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (default 9101)")
    parser.add_argument("--model-size", help="HxW frames are resized to (default 256x512)")
    parser.add_argument(
        "--frame-encoding", choices=ENCODINGS, help="frame bytes on the stream (default jpeg)"
    )
    parser.add_argument("--jpeg-quality", type=int, help="JPEG quality 10-100 (default 90)")
    parser.add_argument("--record", metavar="DIR", help="save each session's raw RFC 4571 bytes in DIR")
    parser.add_argument("--max-sessions", type=int, help="live sessions at most (default 256)")
    parser.add_argument(
        "--handshake-timeout", type=float, help="seconds to complete the handshake (default 5)"
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate chain: the device port speaks TLS (env FLOWCLOUD_GATEWAY_TLS_CERT_FILE)",
    )
    parser.add_argument(
        "--tls-key", metavar="FILE", help="PEM private key of --tls-cert (default: in the --tls-cert file)"
    )
    parser.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA bundle: require edge certificates from it that name the device (mutual TLS)",
    )
    parser.add_argument(
        "--tls-reload-interval",
        type=float,
        metavar="SECONDS",
        help="check the TLS files this often and serve a renewed certificate without a restart; 0 = never "
        "(env FLOWCLOUD_GATEWAY_TLS_RELOAD_INTERVAL, default 30)",
    )


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    return build_settings(
        GatewaySettings, {field: getattr(args, option, None) for option, field in OPTIONS.items()}
    )


async def serve(settings: GatewaySettings) -> None:
    """Serve until SIGTERM/SIGINT, which it honours in every state, start-up included."""
    from services.gateway.server import Gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        gateway = Gateway(settings)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    health = None
    try:
        if settings.metrics_port:
            try:
                health = serve_health_and_metrics(settings.metrics_port, lambda: gateway.serving)
            except OSError as exc:
                raise CommandError(f"cannot serve /metrics on port {settings.metrics_port}: {exc}") from None
        starting = asyncio.create_task(gateway.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            log.info("stopped during start-up")
            return
        try:
            starting.result()
        except OSError as exc:
            raise CommandError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
        await stopping
        log.info("stopping: no new connections; draining sessions (up to %g s)", settings.drain_timeout)
    finally:
        await gateway.close()
        if health is not None:
            health.close()


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    log.info("gateway settings: %s", settings.describe())
    asyncio.run(serve(settings))
    return 0
