"""Certificate hot reload on the gateway's device port: a real gateway (real redis-server, real
decoders), the real edge daemon over TLS, TLS probes on loopback, and a throwaway PKI
(support.tls) whose files are rotated the way the kubelet updates a mounted Secret."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import REGISTRY
from support.edge import daemon_config, run_synthetic_edge
from support.frames import frames_on_redis
from support.gateway import check_stream, gateway_settings, metric, register
from support.tls import SERVER_ADDRESSES, SERVER_NAMES, Issued, Pki, issue, tls_edge_config, tls_gateway
from support.waiting import eventually

from edge.daemon import DaemonResult
from flowcloud.protocol.tls import ClientTls, client_context
from flowcloud.settings import GatewaySettings
from services.gateway import metrics as gateway_metrics
from services.gateway.cli import configure, settings_from
from services.gateway.server import Gateway
from services.gateway.tls_reload import TlsReloader

pytestmark = pytest.mark.timeout(60)

INTERVAL = 0.2
RELOADS = "flowcloud_gateway_tls_reloads_total"
EXPIRY = "flowcloud_gateway_tls_certificate_expiry_timestamp_seconds"


@dataclass(frozen=True)
class SecretMount:
    """A directory laid out as the kubelet mounts a Secret: ``tls.crt -> ..data/tls.crt``,
    ``..data -> ..<version>``; `update` swaps ``..data`` atomically to a new version directory."""

    path: Path

    @property
    def cert(self) -> Path:
        return self.path / "tls.crt"

    @property
    def key(self) -> Path:
        return self.path / "tls.key"

    @classmethod
    def create(cls, path: Path, issued: Issued) -> SecretMount:
        path.mkdir()
        mount = cls(path)
        mount.update(issued)
        for name in ("tls.crt", "tls.key"):
            (path / name).symlink_to(Path("..data") / name)
        return mount

    def update(self, issued: Issued) -> None:
        version = self.path / f"..{len(list(self.path.glob('..2*'))) + 2026}"
        version.mkdir()
        (version / "tls.crt").write_bytes(issued.cert.read_bytes())
        (version / "tls.key").write_bytes(issued.key.read_bytes())
        (self.path / "..data_tmp").symlink_to(version.name)
        os.replace(self.path / "..data_tmp", self.path / "..data")


def renewed(pki: Pki, stem: str) -> Issued:
    """A new gateway certificate from the same CA (another key, serial and notAfter)."""
    return issue(pki.ca, pki.directory, stem, "gateway", SERVER_NAMES, SERVER_ADDRESSES, server=True)


async def reloads_reach(outcome: str, count: float) -> bool:
    return await eventually(lambda: metric(RELOADS, outcome=outcome) == count, 5)


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a poll never sees a partial file the test did not mean)."""
    path.with_name(path.name + ".tmp").write_bytes(data)
    os.replace(path.with_name(path.name + ".tmp"), path)


async def served_serial(port: int, pki: Pki, client: Issued | None = None) -> int:
    """The serial of the certificate a new TLS connection to the gateway gets (verified against the CA)."""
    context = client_context(
        str(pki.ca.path), str(client.cert) if client else None, str(client.key) if client else None
    )
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return int(writer.get_extra_info("peercert")["serialNumber"], 16)
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)


async def run_edge(port: int, device_id: str, token: str, pki: Pki, frames: int) -> DaemonResult:
    return await run_synthetic_edge(tls_edge_config(port, device_id, token, pki.ca.path, frames=frames))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


def test_a_renewed_certificate_is_served_to_new_connections_and_live_sessions_keep_streaming(
    redis_url: str, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frames = 90  # 3 s at 30 fps: the rotation happens mid-stream
    mount = SecretMount.create(tmp_path / "tls", pki.server)
    new = renewed(pki, "gateway-renewed")
    old_serial, new_serial = leaf(pki.server.cert).serial_number, leaf(new.cert).serial_number
    assert old_serial != new_serial

    async def scenario() -> None:
        token = await register(redis_url, "cam-1")
        token_2 = await register(redis_url, "cam-2")
        settings = gateway_settings(
            redis_url,
            tls_cert_file=str(mount.cert),
            tls_key_file=str(mount.key),
            tls_reload_interval=INTERVAL,
        )
        async with Gateway(settings).listen() as gw:
            assert metric(EXPIRY) == leaf(pki.server.cert).not_valid_after_utc.timestamp()
            assert await served_serial(gw.port, pki) == old_serial
            edge = asyncio.create_task(run_edge(gw.port, "cam-1", token, pki, frames))
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= 10, 20)
            ok, failed = metric(RELOADS, outcome="ok"), metric(RELOADS, outcome="failed")
            session = gw.sessions["cam-1"]

            mount.update(new)  # what the kubelet does when cert-manager renews the Secret
            assert await reloads_reach("ok", ok + 1)
            assert await served_serial(gw.port, pki) == new_serial
            assert metric(EXPIRY) == leaf(new.cert).not_valid_after_utc.timestamp()
            # The live session was not touched and is still streaming after the reload.
            assert not edge.done() and gw.sessions.get("cam-1") is session
            published = len(frames_on_redis(redis_url, "cam-1"))
            assert published < frames
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) > published, 5)
            # A new edge session works with the new certificate.
            result_2 = await run_edge(gw.port, "cam-2", token_2, pki, 6)
            await check_stream(redis_url, gw, "cam-2", result_2, 6)
            await check_stream(redis_url, gw, "cam-1", await edge, frames)
            # One reload for one swap (nothing changed since), no failure.
            await asyncio.sleep(3 * INTERVAL)
            assert metric(RELOADS, outcome="ok") == ok + 1
            assert metric(RELOADS, outcome="failed") == failed

    with caplog.at_level(logging.INFO, logger="services.gateway.tls_reload"):
        asyncio.run(scenario())
    assert any(
        r.message.startswith("TLS certificate reloaded: new connections get CN=gateway")
        and f"serial {new_serial:x}" in r.message
        for r in caplog.records
    )


def test_a_broken_certificate_is_refused_and_the_old_one_kept(
    redis_url: str, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Plain files overwritten in place (no kubelet), mutual TLS: the client CA is watched too.
    directory = tmp_path / "files"
    directory.mkdir()
    cert, key, ca = directory / "gw.crt", directory / "gw.key", directory / "ca.crt"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    ca.write_bytes(pki.ca.path.read_bytes())
    other = renewed(pki, "gateway-other")
    old_serial = leaf(pki.server.cert).serial_number
    client = pki.client("cam-1")

    async def scenario() -> None:
        token = await register(redis_url, "cam-1")
        settings = gateway_settings(
            redis_url,
            tls_cert_file=str(cert),
            tls_key_file=str(key),
            tls_client_ca_file=str(ca),
            tls_reload_interval=INTERVAL,
        )
        async with Gateway(settings).listen() as gw:
            expiry = metric(EXPIRY)
            ok, failed = metric(RELOADS, outcome="ok"), metric(RELOADS, outcome="failed")
            broken = [
                (key, other.key.read_bytes()),  # a key that does not match the certificate
                (cert, pki.server.cert.read_bytes()[:200]),  # a half-written certificate
                (ca, b"not a CA bundle\n"),  # an unreadable client CA
            ]
            for count, (path, data) in enumerate(broken, 1):
                replace_file(path, data)
                assert await reloads_reach("failed", failed + count)
                if path is not ca:
                    good = pki.server.key if path is key else pki.server.cert
                    replace_file(path, good.read_bytes())
                    # Back to the served pair: a successful reload of the same certificate.
                    assert await reloads_reach("ok", ok + count)
            # Still TLS, still the old certificate, and mutual TLS still works for a new edge.
            assert gw.mutual_tls and metric(EXPIRY) == expiry
            config = tls_edge_config(gw.port, "cam-1", token, pki.ca.path, client, frames=6)
            assert await served_serial(gw.port, pki, client) == old_serial
            result = await run_synthetic_edge(config)
            await check_stream(redis_url, gw, "cam-1", result, 6)
            # Each bad version failed once: no retry (and no log line) per poll while nothing changes.
            await asyncio.sleep(3 * INTERVAL)
            assert metric(RELOADS, outcome="failed") == failed + len(broken)

    with caplog.at_level(logging.ERROR, logger="services.gateway.tls_reload"):
        asyncio.run(scenario())
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3, errors
    assert all(m.startswith("TLS certificate reload failed; still serving CN=gateway") for m in errors)
    assert f"cannot load the gateway certificate from {cert} and {key}" in errors[0]
    assert f"cannot load the gateway certificate from {cert} and {key}" in errors[1]
    assert f"cannot load the client CA from {ca}" in errors[2]


def test_interval_zero_disables_watching(redis_url: str, pki: Pki, tmp_path: Path) -> None:
    mount = SecretMount.create(tmp_path / "tls", pki.server)
    new = renewed(pki, "gateway-renewed")
    reloader = TlsReloader(str(mount.cert), str(mount.key), interval=0)
    first = reloader.context

    async def unit() -> None:
        # watch() returns at once and start() starts nothing: no task polls the files.
        await asyncio.wait_for(reloader.watch(), 1.0)
        reloader.start()
        mount.update(new)
        await asyncio.sleep(3 * INTERVAL)
        assert reloader.context is first
        await reloader.stop()

    asyncio.run(unit())
    # An explicit check still sees the swap (through the symlinks), and the next one, with the files
    # unchanged since, reloads once.
    assert reloader.check() is None and reloader.context is first
    assert reloader.check() is True and reloader.context is not first
    assert reloader.served.serial == leaf(new.cert).serial_number
    assert reloader.check() is None

    # The setting: 30 s by default, 0 allowed, negative refused; the CLI flag sets it.
    assert GatewaySettings().tls_reload_interval == 30.0
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        GatewaySettings(tls_reload_interval=-1)
    parser = argparse.ArgumentParser()
    configure(parser)
    assert settings_from(parser.parse_args(["--tls-reload-interval", "0"])).tls_reload_interval == 0.0

    # A gateway with interval 0 keeps serving the certificate it started with.
    async def gateway() -> None:
        mount_2 = SecretMount.create(tmp_path / "tls-2", pki.server)
        settings = gateway_settings(
            redis_url, tls_cert_file=str(mount_2.cert), tls_key_file=str(mount_2.key), tls_reload_interval=0
        )
        async with Gateway(settings).listen() as gw:
            mount_2.update(new)
            await asyncio.sleep(3 * INTERVAL)
            assert await served_serial(gw.port, pki) == leaf(pki.server.cert).serial_number

    asyncio.run(gateway())


def test_the_edge_reads_its_tls_files_again_for_each_connection(redis_url: str, tmp_path: Path) -> None:
    """A CA rollover on a restart: the gateway comes back with a certificate from a new CA, and the
    edge, whose CA and client certificate files were replaced meanwhile, reconnects and streams on
    (with the files it started with, it could not verify the new gateway: a fatal error)."""
    for name in ("old", "new", "edge"):
        (tmp_path / name).mkdir()
    old, new = Pki.create(tmp_path / "old"), Pki.create(tmp_path / "new")
    files = tmp_path / "edge"

    def install(pki: Pki) -> None:
        client = pki.client("cam-1")
        for name, source in (("ca.pem", pki.ca.path), ("tls.crt", client.cert), ("tls.key", client.key)):
            replace_file(files / name, source.read_bytes())

    async def scenario() -> None:
        token = await register(redis_url, "cam-1")
        install(old)
        tls = ClientTls(str(files / "ca.pem"), str(files / "tls.crt"), str(files / "tls.key"))
        config = daemon_config(0, device_id="cam-1", token=token, tls=tls, frames=240)
        async with tls_gateway(redis_url, old, mutual=True).listen() as first:
            config.port = first.port
            edge = asyncio.create_task(run_synthetic_edge(config))
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= 10, 20)
            install(new)
        before = len(frames_on_redis(redis_url, "cam-1"))
        async with tls_gateway(redis_url, new, mutual=True).listen(config.port) as second:
            assert await eventually(lambda: "cam-1" in second.sessions or edge.done(), 20)
            assert not edge.done(), f"the edge ended: {edge.exception()!r}"
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= before + 10, 20)
            result = await edge
        assert result.sessions == 2 and result.sent > before

    asyncio.run(scenario())


def test_edge_tls_files_that_do_not_load_keep_the_last_good_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki.create(tmp_path)
    ca = tmp_path / "ca.pem"
    replace_file(ca, pki.ca.path.read_bytes())
    tls = ClientTls(str(ca))
    first = tls.context()
    assert [c["subject"] for c in first.get_ca_certs()] == [((("commonName", "flowcloud-test-ca"),),)]
    replace_file(ca, pki.other_ca.path.read_bytes())  # a rotated CA: the next connection trusts it
    rotated = tls.context()
    assert rotated is not first
    assert [c["subject"] for c in rotated.get_ca_certs()] == [((("commonName", "untrusted-ca"),),)]
    replace_file(ca, b"-----BEGIN CERTIFICATE-----\ntruncat")  # caught mid-rewrite
    with caplog.at_level(logging.ERROR, logger="flowcloud.protocol.tls"):
        assert tls.context() is rotated
    assert "TLS files did not load, so this connection uses the last ones that did" in caplog.text
    ca.unlink()
    with pytest.raises(ValueError, match="cannot load the gateway CA"):
        ClientTls(str(ca))  # at start, files that do not load are an error


def test_a_certificate_and_key_rewritten_one_after_the_other_reload_as_a_pair(tmp_path: Path) -> None:
    """certbot-style renewal in place: the certificate is written, a check runs, then the key. The
    mismatched pair in between is not loaded (no failure counted); the finished pair is."""
    pki = Pki.create(tmp_path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    replace_file(cert, pki.server.cert.read_bytes())
    replace_file(key, pki.server.key.read_bytes())
    for outcome in ("ok", "failed"):  # as in a fresh gateway process: no series yet
        if (outcome,) in gateway_metrics.TLS_RELOADS._metrics:
            gateway_metrics.TLS_RELOADS.remove(outcome)
    reloader = TlsReloader(str(cert), str(key), interval=INTERVAL)
    # Both series exist from the start at 0, so an alert on increase() sees the first failure.
    assert REGISTRY.get_sample_value(RELOADS, {"outcome": "failed"}) == 0.0
    assert REGISTRY.get_sample_value(RELOADS, {"outcome": "ok"}) == 0.0
    failed = metric(RELOADS, outcome="failed")
    new = renewed(pki, "gateway-in-place")
    replace_file(cert, new.cert.read_bytes())
    assert reloader.check() is None  # the new certificate with the old key: wait
    replace_file(key, new.key.read_bytes())
    assert reloader.check() is None  # changed again: wait
    assert reloader.check() is True
    assert reloader.served.serial == leaf(new.cert).serial_number
    assert metric(RELOADS, outcome="failed") == failed
