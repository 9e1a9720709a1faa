"""Mutual TLS: bind a connection's client certificate to the device it may authenticate as.

The TLS layer has already verified the certificate against the client CA; what is left is the
identity: a certificate for ``cam-2`` must not open a session for ``cam-1``, even with cam-1's
token. The session authenticates through its registry, so a connection with a client
certificate gets a `CertificateBoundRegistry`: it refuses (REJECT ``certificate``, counted and
logged by the session like every refusal) a device id the certificate does not name, before the
token is looked at, and otherwise verifies as the shared registry does. The check is repeated
whenever the session re-verifies its device (after missed revocation events).
"""

from __future__ import annotations

from typing import Any

from flowcloud.protocol.handshake import REJECT_CERTIFICATE
from flowcloud.protocol.tls import certificate_names
from flowcloud.registry import Device, DeviceAuthError, DeviceRegistry


class CertificateBoundRegistry(DeviceRegistry):
    """The device registry as one mTLS connection sees it: only the ids its certificate names."""

    def __init__(self, registry: DeviceRegistry, peercert: dict[str, Any] | None) -> None:
        super().__init__(registry.redis)
        self.names = certificate_names(peercert)

    async def verify(self, device_id: str, token: str) -> Device:
        if not self.names:
            raise DeviceAuthError(
                REJECT_CERTIFICATE,
                "this gateway requires a client certificate naming the device (mutual TLS); none was given",
            )
        if device_id not in self.names:
            named = ", ".join(sorted(self.names))
            raise DeviceAuthError(
                REJECT_CERTIFICATE,
                f"the client certificate names {named[:200]}, not device {device_id!r}",
            )
        return await super().verify(device_id, token)
