"""A throwaway PKI for the TLS tests, made with `cryptography` at test time (nothing is checked in).

`Pki.create(dir)` writes PEM files: a CA, a gateway certificate for 127.0.0.1 and localhost, and
client certificates by device id; `other_ca` is a second CA nobody trusts. EC P-256 keys: fast to
make and to handshake with on a small machine.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.daemon import DaemonConfig
from flowcloud.protocol.tls import ClientTls
from services.gateway.server import Gateway
from support.edge import daemon_config
from support.gateway import gateway_settings

SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1",)


@dataclass(frozen=True)
class Authority:
    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path  # the CA certificate, PEM


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def make_authority(directory: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(name, cert, key, path)


def issue(
    ca: Authority,
    directory: Path,
    stem: str,
    common_name: str,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    server: bool = False,
) -> Issued:
    """A leaf certificate signed by ``ca``; ``cert`` holds the leaf then the CA (a chain)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM) + ca.cert.public_bytes(serialization.Encoding.PEM)
    )
    return Issued(cert_path, _write_key(key, directory / f"{stem}.key"))


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Authority
    other_ca: Authority
    server: Issued

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca = make_authority(directory, "flowcloud-test-ca")
        other = make_authority(directory, "untrusted-ca")
        server = issue(ca, directory, "gateway", "gateway", SERVER_NAMES, SERVER_ADDRESSES, server=True)
        return cls(directory, ca, other, server)

    def client(self, device_id: str, *, san: bool = False, ca: Authority | None = None) -> Issued:
        """A client certificate naming ``device_id`` in its CN (or, with ``san``, only in a DNS SAN)."""
        authority = ca or self.ca
        stem = f"client-{device_id}-{'san' if san else 'cn'}-{authority.name}"
        if san:
            return issue(authority, self.directory, stem, "flowcloud edge", dns_names=(device_id,))
        return issue(authority, self.directory, stem, device_id)


SHORT_STREAM = 12  # frames an edge sends by default in the TLS tests


def tls_gateway(redis_url: str, pki: Pki, mutual: bool = False, **overrides: object) -> Gateway:
    """A gateway serving ``pki``'s certificate; with ``mutual``, requiring clients from its CA."""
    settings = gateway_settings(
        redis_url,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.path) if mutual else None,
        **overrides,
    )
    return Gateway(settings)


def tls_edge_config(
    port: int,
    device_id: str,
    token: str,
    ca: Path,
    client: Issued | None = None,
    server_name: str | None = None,
    **changes: object,
) -> DaemonConfig:
    """An edge that verifies the gateway against ``ca`` (and presents ``client``), `SHORT_STREAM` frames."""
    tls = ClientTls(str(ca), str(client.cert) if client else None, str(client.key) if client else None)
    defaults: dict[str, object] = {"bitrate": 200_000, "tls_server_name": server_name, "frames": SHORT_STREAM}
    return daemon_config(port, device_id=device_id, token=token, tls=tls, **{**defaults, **changes})
