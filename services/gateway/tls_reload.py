"""Certificate hot reload on the device port: a renewed certificate is served without a restart.

`TlsReloader.context` is the device port's current `ssl.SSLContext`; the server reads it for each
new connection. Every ``interval`` seconds (0: never) the reloader stats the certificate, key and
client-CA files, following symlinks, so that the kubelet's atomic swap of a mounted Secret's
``..data`` directory (cert-manager renewing it) shows as a new inode. When files changed and then
held still for one more check (a certificate and key rewritten one after the other in place are read
as a pair, not as a mismatch), it builds a new context with `flowcloud.protocol.tls.server_context`,
the function used at start, and serves it to new connections; a connection already established keeps
the context it was handshaked with, so live sessions are untouched. A context that cannot be built
(a half-written file, a key that does not match the certificate, an unreadable CA) is logged once as
an error and counted, and the old one stays in service until the files change again: the port never
falls back to plain TCP.

Metrics: ``flowcloud_gateway_tls_reloads_total{outcome="ok"|"failed"}`` and the notAfter of the
certificate being served, ``flowcloud_gateway_tls_certificate_expiry_timestamp_seconds``, to alert
on before it lapses (e.g. ``... - time() < 7 * 86400``: renewals are not arriving).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
from dataclasses import dataclass

from cryptography import x509

from flowcloud.protocol.tls import server_context
from services.gateway import metrics

log = logging.getLogger(__name__)

RELOAD_OK = "ok"
RELOAD_FAILED = "failed"

# What identifies a version of a file: (st_dev, st_ino, st_size, st_mtime_ns) of the file a path
# resolves to; None while it cannot be stat'ed (missing, mid-swap).
Stamp = tuple[int, int, int, int] | None


def file_stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data directory gives another inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ServedCertificate:
    """The leaf certificate of a chain file (the first certificate in it), for logs and metrics."""

    subject: str
    serial: int
    not_after: datetime.datetime

    @classmethod
    def read(cls, path: str) -> ServedCertificate:
        try:
            with open(path, "rb") as file:
                cert = x509.load_pem_x509_certificate(file.read(1 << 20))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the gateway certificate from {path}: {exc}") from None
        return cls(cert.subject.rfc4514_string(), cert.serial_number, cert.not_valid_after_utc)

    def describe(self) -> str:
        until = f"{self.not_after:%Y-%m-%d %H:%M:%S} UTC"
        return f"{self.subject or 'no subject'} (serial {self.serial:x}) valid until {until}"


class TlsReloader:
    """The device port's TLS context, rebuilt when its files change (see the module docstring)."""

    def __init__(
        self, cert: str, key: str | None = None, client_ca: str | None = None, interval: float = 30.0
    ) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.interval = interval
        self._stamps = self._stat()
        self._changing: tuple[Stamp, ...] | None = None  # stamps seen changed, not yet held still
        # At start a file that does not work is the operator's error: ValueError, no gateway.
        self.context: ssl.SSLContext = server_context(cert, key, client_ca)
        self.served = ServedCertificate.read(cert)
        metrics.TLS_CERTIFICATE_EXPIRY.set(self.served.not_after.timestamp())
        for outcome in (RELOAD_OK, RELOAD_FAILED):  # exported at 0, so increase() sees the first one
            metrics.TLS_RELOADS.labels(outcome)
        self._task: asyncio.Task[None] | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(path for path in (self.cert, self.key, self.client_ca) if path is not None)

    def _stat(self) -> tuple[Stamp, ...]:
        return tuple(file_stamp(path) for path in self.files)

    def check(self) -> bool | None:
        """Reload when a file changed and then held still for one check: True (reloaded), False
        (failed, old context kept), None (no change, or files still changing)."""
        stamps = self._stat()
        if stamps == self._stamps:
            self._changing = None
            return None
        if stamps != self._changing:
            # Changed since the last check: wait one more, so that a certificate and key rewritten
            # one after the other in place (not swapped together) are read as a pair.
            self._changing = stamps
            return None
        self._changing = None
        # Taken before reading: a file changing while it is read is seen again at the next check.
        # A failure is not retried until a file changes again (one error per bad version).
        self._stamps = stamps
        try:
            context = server_context(self.cert, self.key, self.client_ca)
            served = ServedCertificate.read(self.cert)
        except ValueError as exc:
            metrics.TLS_RELOADS.labels(RELOAD_FAILED).inc()
            log.error("TLS certificate reload failed; still serving %s: %s", self.served.describe(), exc)
            return False
        self.context, self.served = context, served
        metrics.TLS_RELOADS.labels(RELOAD_OK).inc()
        metrics.TLS_CERTIFICATE_EXPIRY.set(served.not_after.timestamp())
        log.info("TLS certificate reloaded: new connections get %s", served.describe())
        if served.not_after <= datetime.datetime.now(datetime.UTC):
            log.warning("the reloaded TLS certificate has expired: edges will refuse it")
        return True

    async def watch(self) -> None:
        """Check every ``interval`` seconds until cancelled; returns at once when the interval is 0."""
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a surprise must not end the watching: count it, keep the old context
                metrics.TLS_RELOADS.labels(RELOAD_FAILED).inc()
                log.exception("TLS certificate reload failed; still serving %s", self.served.describe())

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self.watch(), name="tls-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
