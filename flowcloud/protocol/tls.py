"""TLS on the edge -> gateway connection: the one place that sets its TLS policy.

The gateway serves TLS when it has a certificate chain (`server_context`), and mutual TLS when
it also has a client CA: then every edge must present a certificate from that CA (the gateway
refuses a connection without one), and the certificate must name the device
(`certificate_names`: the subject commonName or a DNS subjectAltName equal to the device id in
the HELLO). The edge verifies the gateway against the
system trust store or a given CA (`client_context`). Both sides require TLS 1.2 or newer and
take the rest (ciphers, no compression, no renegotiation) from `ssl.create_default_context`.

The edge reads its TLS files again for every connection (`ClientTls`): a renewed client certificate
or a rotated CA is used from the next connection on, without a restart.

Certificate problems are permanent: a wrong CA, a name mismatch, or a client certificate the
gateway does not accept will not fix themselves by reconnecting (`is_certificate_failure`).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# Alerts a TLS server sends when it refuses the client's certificate (OpenSSL reason names).
CLIENT_CERTIFICATE_ALERTS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None, what: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        files = cert if key is None else f"{cert} and {key}"
        raise ValueError(f"cannot load the {what} from {files}: {exc}") from None


def server_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """The gateway's context; with ``client_ca`` every client must present a certificate it signed.

    ``key`` may be None when the private key is in the ``cert`` PEM file. Raises ValueError with a
    message fit for a person when a file cannot be read or does not hold what it should.
    """
    try:
        # cafile given: only that CA verifies clients (not the system store's public CAs).
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the client CA from {client_ca}: {exc}") from None
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, cert, key, "gateway certificate")
    if client_ca is not None:
        # A presented certificate must verify, or the handshake fails. One that is missing is
        # refused by the gateway with REJECT "certificate" after the handshake: asyncio sends no
        # TLS alert when a server handshake fails, so the edge would only see a closed socket.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The edge's context: verify the gateway (``ca``, else the system trust store); optional client cert."""
    if key is not None and cert is None:
        raise ValueError("a TLS client key needs its certificate (--tls-cert)")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the gateway CA from {ca}: {exc}") from None
    context.minimum_version = MINIMUM_VERSION
    if cert is not None:
        _load_chain(context, cert, key, "client certificate")
    return context


class ClientTls:
    """The edge's TLS files, loaded into a new `client_context` for each connection.

    At start a file that does not load is an error (ValueError). Later, files that do not load
    (caught mid-rewrite, or replaced by something broken) leave the last context that loaded in
    use, with an error logged: a renewal in progress never stops a reconnect.
    """

    def __init__(self, ca: str | None = None, cert: str | None = None, key: str | None = None) -> None:
        self.ca, self.cert, self.key = ca, cert, key
        self._last = client_context(ca, cert, key)

    def context(self) -> ssl.SSLContext:
        """The context for a new connection, from the files as they are now."""
        try:
            self._last = client_context(self.ca, self.cert, self.key)
        except ValueError as exc:
            log.error("TLS files did not load, so this connection uses the last ones that did: %s", exc)
        return self._last


def certificate_names(peercert: dict[str, Any] | None) -> frozenset[str]:
    """The names a verified peer certificate (``SSLObject.getpeercert()``) gives its holder.

    The subject's commonName(s) and the DNS subjectAltNames; exact strings, no wildcards.
    """
    if not peercert:
        return frozenset()
    names = {value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names.update(value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS")
    return frozenset(names)


def is_certificate_failure(exc: BaseException) -> bool:
    """Whether a TLS error is about certificates (ours refused, or the peer's failed verification)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    return isinstance(exc, ssl.SSLError) and exc.reason in CLIENT_CERTIFICATE_ALERTS


def describe_failure(exc: ssl.SSLError) -> str:
    """One line about a TLS failure, for a person."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification of the gateway failed: {exc.verify_message or exc.reason}"
    if exc.reason in CLIENT_CERTIFICATE_ALERTS:
        alert = (exc.reason or "").split("ALERT_", 1)[-1].lower().replace("_", " ")
        return f"the gateway refused this device's TLS client certificate ({alert})"
    if exc.reason == "WRONG_VERSION_NUMBER":
        return "TLS error: the gateway does not seem to speak TLS (wrong version number)"
    return f"TLS error: {exc.reason or exc}"
