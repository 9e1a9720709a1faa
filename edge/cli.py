"""`flowcloud edge`: capture (or relay) video, encode H.264, send it to a gateway.

Every option can also come from the environment (``FLOWCLOUD_EDGE_GATEWAY``,
``FLOWCLOUD_EDGE_DEVICE_ID``, ``FLOWCLOUD_EDGE_TOKEN``, ``FLOWCLOUD_EDGE_SOURCE``, ...; see
`flowcloud.settings.EdgeSettings`); an option on the command line wins. Prefer the environment
for the token: a command line is visible to every user of the machine.

TLS: ``--tls`` verifies the gateway against the system trust store, ``--tls-ca FILE`` against
that CA; ``--tls-cert``/``--tls-key`` present a client certificate (mutual TLS), and
``--tls-server-name`` is the name to verify when ``--gateway`` is an address the certificate
does not name. Any ``--tls-*`` option turns TLS on. The files are read again for each
connection, so a renewed certificate or CA is used from the next reconnect on. Certificate
failures end the daemon (status 1), like a permanent refusal: see edge.sender.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from pydantic import ValidationError

from edge.daemon import DaemonConfig, EdgeDaemon
from edge.encoder import ENCODERS
from edge.fallback import FallbackError
from edge.frames import StreamShape
from edge.sender import Backoff, FatalRejection
from edge.sources import FileSource, SourceError, open_source
from flowcloud.cli.errors import CommandError, settings_error
from flowcloud.observability import serve_health_and_metrics
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.handshake import validate_device_id
from flowcloud.protocol.tls import ClientTls
from flowcloud.settings import EdgeSettings

log = logging.getLogger(__name__)

# argparse dest = EdgeSettings field
_SETTINGS = (
    "gateway",
    "device_id",
    "token",
    "source",
    "bitrate",
    "keyframe_interval",
    "metrics_port",
    "encoder",
    "mtu",
    "width",
    "height",
    "fps",
    "tls",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_server_name",
    "spool_dir",
    "spool_max_bytes",
    "spool_max_age",
    "spool_backlog",
    "backfill_bitrate",
    "fallback_model",
    "fallback_after",
    "fallback_fps",
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", metavar="HOST:PORT", help="the ingest gateway to dial")
    parser.add_argument("--device-id", metavar="ID", help="this device's registered id")
    parser.add_argument("--token", help="this device's token (better: FLOWCLOUD_EDGE_TOKEN)")
    parser.add_argument(
        "--source",
        metavar="SRC",
        help="synthetic (default), camera:/dev/videoN, gst:PIPELINE, a video file, rtsp://..., "
        "rfc4571://HOST:PORT, or a gateway recording (FILE.rfc4571, replayed at its pace)",
    )
    parser.add_argument("--loop", action="store_true", help="repeat a video file or recording forever")
    parser.add_argument("--frames", type=int, metavar="N", help="stop after N frames")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--bitrate", type=int, metavar="BPS", help="H.264 target bitrate in bits/s")
    parser.add_argument("--keyframe-interval", type=int, metavar="N", help="frames between IDR frames")
    parser.add_argument(
        "--encoder", choices=ENCODERS, help="H.264 encoder (auto: Jetson hardware when present)"
    )
    parser.add_argument("--mtu", type=int, help="largest RTP packet in bytes")
    parser.add_argument("--width", type=int, help="picture width (cameras, synthetic; files: resize)")
    parser.add_argument("--height", type=int, help="picture height")
    parser.add_argument("--fps", type=float, help="frame rate (cameras, synthetic; files: pacing)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = off)")
    parser.add_argument(
        "--tls",
        action="store_true",
        default=None,
        help="connect with TLS, verifying the gateway against the system trust store",
    )
    parser.add_argument(
        "--tls-ca",
        dest="tls_ca_file",
        metavar="FILE",
        help="verify the gateway against this PEM CA (implies --tls)",
    )
    parser.add_argument(
        "--tls-cert",
        dest="tls_cert_file",
        metavar="FILE",
        help="PEM client certificate for mutual TLS (implies --tls)",
    )
    parser.add_argument(
        "--tls-key",
        dest="tls_key_file",
        metavar="FILE",
        help="PEM private key of --tls-cert (default: in the --tls-cert file)",
    )
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name the gateway's certificate must carry (default: the --gateway host; implies --tls)",
    )
    outage = parser.add_argument_group(
        "offline (store and forward)",
        "With --spool DIR, video captured while the gateway is unreachable is kept on disk as whole "
        "GOPs (from an IDR, with capture times; checksummed, so a torn write after a crash or kill -9 "
        "is cut off, never sent). The spool is capped by --spool-max-bytes (default 1 GiB, about an "
        "hour at the default 2 Mbit/s) and --spool-max-age (default 3600 s); the oldest GOPs go first "
        "and are counted. After a reconnect live frames go first and the spool drains beside them on "
        "a second connection at --backfill-bitrate (default 2 Mbit/s) and at most twice the frame "
        "rate; the backfilled frames keep their capture times and are segmented by spare worker "
        "capacity. A link slower than the encoder spools too: while connected, once live video is "
        "late by --spool-backlog seconds (default 0.5; queued on the edge, or on the path as the "
        "gateway's delay reports show), whole GOPs go to the spool instead of being dropped, and "
        "live resumes at an IDR when it has caught up. Without --spool, frames "
        "captured offline are dropped (counted). With "
        "--fallback-model, after --fallback-after seconds (default 10) without the cloud the edge "
        "segments up to --fallback-fps pictures a second (default 1; fewer when its CPU allows "
        "fewer) with an ONNX model (onnxruntime, no torch), keeps the masks in SPOOL/masks and "
        "sends them to the cloud on reconnect, where they are marked producer: edge.",
    )
    outage.add_argument("--spool", dest="spool_dir", metavar="DIR", help="spool directory (one per device)")
    outage.add_argument("--spool-max-bytes", type=int, metavar="N", help="spool cap in bytes")
    outage.add_argument("--spool-max-age", type=float, metavar="S", help="spool cap in seconds of age")
    outage.add_argument(
        "--spool-backlog", type=float, metavar="S", help="live lateness (s) above which GOPs go to the spool"
    )
    outage.add_argument("--backfill-bitrate", type=int, metavar="BPS", help="backfill's share of the link")
    outage.add_argument(
        "--fallback-model",
        nargs="?",
        const="",
        metavar="FILE",
        help="segment on the device while the cloud is away (no FILE: the bundled demo model)",
    )
    outage.add_argument(
        "--fallback-after", type=float, metavar="S", help="seconds offline before the fallback"
    )
    outage.add_argument("--fallback-fps", type=float, metavar="N", help="fallback masks per second at most")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _settings(args: argparse.Namespace) -> EdgeSettings:
    given = {name: getattr(args, name) for name in _SETTINGS if getattr(args, name, None) is not None}
    try:
        return EdgeSettings(**given)
    except ValidationError as exc:
        raise settings_error(exc) from None


def _tls(settings: EdgeSettings) -> ClientTls | None:
    """The TLS files the settings name, read again for each connection (None: plain TCP)."""
    if not settings.tls_enabled:
        return None
    try:
        return ClientTls(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _gateway(value: str | None) -> tuple[str, int]:
    if not value:
        raise CommandError("no gateway: give --gateway HOST:PORT or set FLOWCLOUD_EDGE_GATEWAY")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"--gateway {value!r} is not HOST:PORT")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    host, port = _gateway(settings.gateway)
    if not settings.device_id:
        raise CommandError("no device id: give --device-id or set FLOWCLOUD_EDGE_DEVICE_ID")
    try:
        validate_device_id(settings.device_id)
    except ProtocolError as exc:
        raise CommandError(str(exc)) from None
    if settings.token is None or not settings.token.get_secret_value():
        raise CommandError("no token: set FLOWCLOUD_EDGE_TOKEN (or give --token)")
    if args.frames is not None and args.frames < 1:
        raise CommandError("--frames must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise CommandError("--duration must be positive")
    tls = _tls(settings)
    logging.getLogger().setLevel(settings.log_level.upper())
    log.info("edge settings: %s", settings.describe())
    if tls is None:
        log.warning("TLS is off: the device token and video travel in clear (use --tls or --tls-ca)")
    shape = StreamShape(settings.width, settings.height, settings.fps)
    try:
        source = open_source(settings.source, shape, loop=args.loop)
        if isinstance(source, FileSource) and settings.model_fields_set & {"width", "height", "fps"}:
            native = source.shape
            source.shape = StreamShape(
                settings.width if "width" in settings.model_fields_set else native.width,
                settings.height if "height" in settings.model_fields_set else native.height,
                settings.fps if "fps" in settings.model_fields_set else native.fps,
            )
    except SourceError as exc:
        raise CommandError(str(exc)) from None
    config = DaemonConfig(
        host=host,
        port=port,
        device_id=settings.device_id,
        token=settings.token.get_secret_value(),
        mtu=settings.mtu,
        bitrate=settings.bitrate,
        keyframe_interval=settings.keyframe_interval,
        encoder=settings.encoder,
        frames=args.frames,
        duration=args.duration,
        queue_size=settings.queue_size,
        backoff=Backoff(maximum=settings.reconnect_max_delay),
        tls=tls,
        tls_server_name=settings.tls_server_name,
        spool_dir=settings.spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        spool_max_age=settings.spool_max_age,
        spool_segment_seconds=settings.spool_segment_seconds,
        spool_backlog=settings.spool_backlog,
        backfill_bitrate=settings.backfill_bitrate,
        backfill_speed=settings.backfill_speed,
        fallback_model=settings.fallback_model,
        fallback_after=settings.fallback_after,
        fallback_fps=settings.fallback_fps,
    )
    health = serve_health_and_metrics(settings.metrics_port) if settings.metrics_port else None
    try:
        result = asyncio.run(EdgeDaemon(config, source).run())
    except FatalRejection as exc:
        raise CommandError(str(exc)) from None
    except SourceError as exc:
        raise CommandError(f"source: {exc}") from None
    except FallbackError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if health is not None:
            health.close()
    summary = {"captured": result.captured, "sent": result.sent, "sessions": result.sessions}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"sent {result.sent} of {result.captured} frames in {result.sessions} session(s)")
    return 0
