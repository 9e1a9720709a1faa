"""The ingest gateway's TCP server: admission, sessions, revocation events, orderly shutdown.

    async with Gateway(settings).listen(port=0) as gateway:   # tests: a real server on loopback
        ... gateway.port ...

A connection is first counted against its address (``max_connections_per_ip``; above it the
gateway answers REJECT ``limit`` before reading a byte), then handed to a `Session`. The
gateway reads devices from the control-plane Redis (``control_url``) and subscribes there to
``keys.DEVICE_EVENTS``: "revoked <id>" / "rotated <id>" closes that
device's live session at once, and "connected <id> <session> <generation>" closes a live session
of the device whose lease generation is older (the edge reconnected, perhaps through another
gateway replica: the newest session wins across replicas as it does within one gateway; a late
announcement of an older generation closes nothing; services.gateway.lease); after a lost
subscription (Redis restarted) every live session is re-verified, so a revocation missed
meanwhile still takes effect.

`close()` (SIGTERM) stops accepting and sends every live session's edge a GOAWAY. The edges end
their streams at an access unit boundary and half-close; their sessions decode and flush what
arrived (within ``drain_timeout``; a session whose edge does not leave by then is ended), the
publisher writes every frame (within ``drain_timeout``), and only then are the connections
closed, so an edge reconnects (through the load balancer, to another replica) once nothing of
its old session can be fenced. Then the spare decoders stop.

With ``tls_cert_file`` the device port speaks TLS only (`flowcloud.protocol.tls`). The TLS handshake
starts after the per-address admission (an address over its limit is closed before any TLS work)
and has the same deadline as the FlowCloud handshake; a client that fails it (plaintext, garbage,
an untrusted client certificate, silence) is closed, logged and counted (outcome ``tls_failed``).
With ``tls_client_ca_file`` (mutual TLS) each session authenticates through a
`CertificateBoundRegistry`: the certificate must name the device of the HELLO, and a connection
without one gets REJECT ``certificate`` (the TLS layer asks for a certificate but lets the
handshake finish without one, so that the edge learns why instead of seeing a closed socket).
A renewed certificate is served to new connections without a restart (`tls_reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from flowcloud import keys
from flowcloud import redis_client as redis_client_factory
from flowcloud.protocol.framing import write_frame
from flowcloud.protocol.handshake import REJECT_LIMIT, Reject
from flowcloud.registry import EVENT_CONNECTED, EVENT_REVOKED, DeviceRegistry, parse_event
from flowcloud.settings import GatewaySettings
from flowcloud.sizes import parse_size
from services.gateway import metrics
from services.gateway.certificates import CertificateBoundRegistry
from services.gateway.decoder import DecoderConfig, DecoderPool
from services.gateway.limits import ConnectionLimiter
from services.gateway.publisher import FramePublisher
from services.gateway.session import (
    END_REPLACED,
    END_REVOKED,
    END_ROTATED,
    END_SHUTDOWN,
    NOTICED_EVENT,
    Refused,
    Session,
    SessionServices,
)
from services.gateway.tls_reload import TlsReloader

log = logging.getLogger(__name__)

EVENTS_BACKOFF_MAX = 2.0
CLOCK_SYNC_TIMEOUT = 2.0  # seconds start() waits for Redis's clock; a Redis that is down must not stop it

# Outcome label of flowcloud_gateway_connections_total (besides accepted and the REJECT codes).
OUTCOME_TLS_FAILED = "tls_failed"


def tls_reloader(settings: GatewaySettings) -> TlsReloader | None:
    """The device port's TLS context, reloaded on renewal (None: plain TCP); ValueError: cannot work."""
    if settings.tls_cert_file is None:
        for name in ("tls_key_file", "tls_client_ca_file"):
            if getattr(settings, name) is not None:
                raise ValueError(f"{name} needs tls_cert_file (the gateway's certificate chain)")
        return None
    return TlsReloader(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
        settings.tls_reload_interval,
    )


def redis_client(url: str, cluster: bool = False) -> aioredis.Redis:
    """A client that fails fast (no long retries) so that the gateway notices an outage at once."""
    return redis_client_factory.connect_async(
        url,
        cluster,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=5,
    )


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        height, width = parse_size(settings.model_size)
        self.certificates = tls_reloader(settings)
        self.redis = redis_client(settings.redis_url, settings.redis_cluster)
        # Devices and their events live in the control-plane Redis (the same client on one machine).
        self.control = (
            redis_client(settings.control_url) if settings.control_url != settings.redis_url else self.redis
        )
        self.publisher = FramePublisher(
            self.redis,
            settings.frames_maxlen,
            settings.publish_queue,
            stream_frames_maxlen=settings.stream_frames_maxlen,
            stream_frames_ttl=settings.stream_frames_ttl,
            backfill_maxlen=settings.backfill_maxlen,
            shards=settings.frame_shards,
        )
        config = DecoderConfig(
            out_width=width,
            out_height=height,
            encoding=settings.frame_encoding,
            jpeg_quality=settings.jpeg_quality,
            max_width=settings.max_width,
            max_height=settings.max_height,
            memory_limit_mb=settings.decoder_memory_mb,
        )
        self.services = SessionServices(
            settings,
            DeviceRegistry(self.control),
            self.publisher,
            DecoderPool(config, settings.decoder_spares),
        )
        self.connections = ConnectionLimiter(settings.max_connections_per_ip)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._events_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self.serving = False

    @property
    def sessions(self) -> dict[str, Session]:
        """Live sessions by device id."""
        return self.services.live

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context for a new connection (None: plain TCP); live ones keep theirs."""
        return None if self.certificates is None else self.certificates.context

    @property
    def mutual_tls(self) -> bool:
        return self.tls is not None and self.settings.tls_client_ca_file is not None

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str | None = None, port: int | None = None) -> Gateway:
        host = self.settings.host if host is None else host
        port = self.settings.port if port is None else port
        try:  # sessions stamp their start on Redis's clock: measure it before the first one
            async with asyncio.timeout(CLOCK_SYNC_TIMEOUT):
                await self.publisher.clock.sync(self.redis)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("cannot read Redis's clock yet (the first publish will): %s", exc)
        self.publisher.start()
        self.services.decoders.start()
        self._events_task = asyncio.create_task(self._watch_device_events(), name="device-events")
        self._server = await asyncio.start_server(self._on_connection, host, port, limit=1 << 16)
        self.serving = True
        if self.certificates is not None:
            self.certificates.start()
        if self.tls is None:
            log.warning(
                "TLS is off: device tokens and video travel in clear (set FLOWCLOUD_GATEWAY_TLS_CERT_FILE)"
            )
        transport = "plain TCP" if self.tls is None else "mutual TLS" if self.mutual_tls else "TLS"
        log.info("gateway listening on %s:%d (%s)", host, self.port, transport)
        return self

    @contextlib.asynccontextmanager
    async def listen(self, port: int = 0, host: str = "127.0.0.1") -> AsyncIterator[Gateway]:
        await self.start(host, port)
        try:
            yield self
        finally:
            await self.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Stop accepting, send edges away, end sessions (frames in flight are still published),
        stop everything."""
        if self._closed.is_set():
            return
        self.serving = False
        if self._server is not None:
            self._server.close()
        leaving = await self._send_edges_away()
        try:
            async with asyncio.timeout(self.settings.drain_timeout):
                staying = [*self.sessions.values(), *self.services.backfill.values()]
                await asyncio.gather(*(s.close(END_SHUTDOWN) for s in staying))
        except TimeoutError:
            log.warning("sessions did not end within %g s", self.settings.drain_timeout)
        # Every other connection ends now (handshakes in progress too); those that left wait for
        # the publisher, so that their edges reconnect only once nothing of theirs can be fenced.
        lingering = {s.task for s in leaving}
        await self._cancel_handlers(lambda task: task not in lingering)
        await self.publisher.close(self.settings.drain_timeout)
        for session in leaving:
            session.release()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._cancel_handlers(lambda task: True)
        if self._events_task is not None:
            self._events_task.cancel()
            await asyncio.gather(self._events_task, return_exceptions=True)
        if self.certificates is not None:
            await self.certificates.stop()
        await self.services.decoders.close()
        await self.redis.aclose()
        if self.control is not self.redis:
            await self.control.aclose()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self._closed.set()
        log.info("gateway stopped")

    async def _cancel_handlers(self, which: Callable[[asyncio.Task[None]], bool]) -> None:
        tasks = [task for task in self._handlers if which(task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_edges_away(self) -> list[Session]:
        """GOAWAY to every live session's edge; wait (up to ``drain_timeout``) until they have left.
        Returns the sessions that went away (their connections stay open until `Session.release`)."""
        self.services.going_away = True  # a session whose handshake ends now goes away at once
        leaving = [s for s in list(self.sessions.values()) if s.go_away()]
        if leaving:
            log.info("asked %d edge(s) to reconnect elsewhere; waiting for them to leave", len(leaving))
            try:
                async with asyncio.timeout(self.settings.drain_timeout):
                    await asyncio.gather(*(s.wait_ended() for s in leaving))
            except TimeoutError:
                log.warning("edges did not all leave within %g s", self.settings.drain_timeout)
        # Sessions that began meanwhile went away too (Session.stream).
        late = [s for s in self.sessions.values() if s.going_away and s not in leaving]
        return [s for s in (*leaving, *late) if s.task is not None]

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        try:
            if not self.serving:
                writer.close()
                return
            if not self.connections.acquire(address):
                await self._refuse_early(writer, address)
                return
            try:
                if self.tls is None or await self._start_tls(writer, address):
                    await self._serve(reader, writer)
            finally:
                self.connections.release(address)
        except asyncio.CancelledError:
            pass  # shutdown: the session has been ended; a cancelled handler would be logged as an error
        except Exception:
            log.exception("connection from %s failed", address)
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _start_tls(self, writer: asyncio.StreamWriter, address: str) -> bool:
        """The TLS handshake within the handshake deadline; False (logged, counted) when it fails."""
        assert self.tls is not None
        try:
            # After the admission check, so an address over its limit costs no TLS work. (On 3.11 the
            # StreamReader keeps pausing the TCP transport itself: backpressure still reaches the peer.)
            await writer.start_tls(self.tls, ssl_handshake_timeout=self.settings.handshake_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError; a timeout aborts the connection
            metrics.CONNECTIONS.labels(OUTCOME_TLS_FAILED).inc()
            log.info(
                "connection from %s refused: TLS handshake failed: %s", address, exc or type(exc).__name__
            )
            return False
        return True

    async def _refuse_early(self, writer: asyncio.StreamWriter, address: str) -> None:
        metrics.CONNECTIONS.labels(REJECT_LIMIT).inc()
        reason = f"too many connections from {address} (limit {self.settings.max_connections_per_ip})"
        log.info("connection refused: %s", reason)
        if self.tls is not None:
            writer.close()  # a REJECT in clear would be garbage to a TLS client; no TLS work for it either
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await write_frame(writer, Reject(REJECT_LIMIT, reason).to_bytes())
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        services = self.services
        if self.mutual_tls:
            # Same shared state (live sessions, limits); only the identity check is this connection's.
            registry = CertificateBoundRegistry(services.registry, writer.get_extra_info("peercert"))
            services = replace(services, registry=registry)
        session = Session(services, reader, writer)
        try:
            await session.handshake()
        except Refused as refused:
            await session.reject(refused)
            return
        except (ConnectionError, OSError) as exc:
            await session.reject(Refused(None, f"connection error: {exc}"))
            return
        metrics.CONNECTIONS.labels("accepted").inc()
        if session.hello is not None and session.hello.stream.masks:
            await session.receive_edge_masks()
            return
        await session.stream()

    async def _watch_device_events(self) -> None:
        backoff = 0.1
        first = True
        while True:
            pubsub = self.control.pubsub()
            try:
                await pubsub.subscribe(keys.DEVICE_EVENTS)
                if not first:
                    await self._recheck_sessions()
                first = False
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._on_device_event(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("device events unavailable (%s); retrying in %.1f s", exc, backoff)
                first = False
                await asyncio.sleep(backoff)
                backoff = min(EVENTS_BACKOFF_MAX, backoff * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _on_device_event(self, data: bytes | str) -> None:
        event = parse_event(data)
        if event is None:
            return
        backfill = self.services.backfill.get(event.device_id)
        if backfill is not None and event.kind != EVENT_CONNECTED:
            self._close_soon(backfill, END_REVOKED if event.kind == EVENT_REVOKED else END_ROTATED)
        session = self.sessions.get(event.device_id)
        if session is None:
            return
        if event.kind == EVENT_CONNECTED:
            if event.generation:  # only a newer lease replaces ours, however late its announcement
                if session.superseded(event.generation, NOTICED_EVENT):
                    self._close_soon(session, END_REPLACED)
            elif event.session_id != session.session_id:  # a gateway without leases (rolling upgrade)
                log.info(
                    "device %s connected again (session %s, maybe elsewhere): closing session %s",
                    event.device_id,
                    event.session_id,
                    session.session_id,
                )
                self._close_soon(session, END_REPLACED)
            return
        log.info("device %s %s: closing session %s", event.device_id, event.kind, session.session_id)
        # A rotated token ends the session too: the edge must reconnect with its new token.
        self._close_soon(session, END_REVOKED if event.kind == EVENT_REVOKED else END_ROTATED)

    def _close_soon(self, session: Session, reason: str) -> None:
        task = asyncio.create_task(session.close(reason))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _recheck_sessions(self) -> None:
        for device_id, session in list(self.sessions.items()):
            try:
                ok = await session.still_authorized()
            except (RedisError, OSError):
                return
            if not ok:
                log.info(
                    "device %s is no longer authorized: closing session %s", device_id, session.session_id
                )
                self._close_soon(session, END_REVOKED)
