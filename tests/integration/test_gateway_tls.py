"""TLS and mutual TLS on the edge -> gateway connection: a real gateway (real redis-server, real
decoders), the real edge daemon and sender, and a throwaway PKI made at test time (support.tls)."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import time

import pytest
from support.cli import REPO, flowcloud
from support.edge import run_synthetic_edge
from support.frames import frames_on_redis
from support.gateway import check_stream, gateway_settings, metric, register, session_ended
from support.tls import SHORT_STREAM, Pki, tls_edge_config, tls_gateway
from support.waiting import eventually

from edge.sender import MUTUAL_TLS_HINT, FatalRejection
from flowcloud.cli.main import main
from flowcloud.protocol.framing import frame
from flowcloud.protocol.handshake import Hello, StreamInfo
from flowcloud.protocol.tls import client_context
from services.gateway.server import Gateway

pytestmark = pytest.mark.timeout(60)

FRAMES = SHORT_STREAM


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


async def closed_without_reply(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the gateway sent before closing (fails when it keeps the connection open)."""
    received = b""
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(4096):
                received += chunk
        except ConnectionError:
            pass
    return received


def test_frames_flow_over_tls_and_a_plaintext_client_is_refused(redis_url: str, pki: Pki) -> None:
    async def scenario() -> None:
        token = await register(redis_url, "cam-1")
        async with tls_gateway(redis_url, pki).listen() as gw:
            assert gw.tls is not None and not gw.mutual_tls
            edge = asyncio.create_task(
                run_synthetic_edge(tls_edge_config(gw.port, "cam-1", token, pki.ca.path))
            )
            assert await eventually(lambda: "cam-1" in gw.sessions, 20)
            # A plaintext edge with a valid token on the TLS port: no session, no REJECT in clear.
            failed = metric("flowcloud_gateway_connections_total", outcome="tls_failed")
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            hello = Hello("cam-1", token, StreamInfo(96, 64, 30.0), edge_time=time.time())
            writer.write(frame(hello.to_bytes()))
            await writer.drain()
            reply = await closed_without_reply(reader, 5.0)
            assert b"reject" not in reply and b"accept" not in reply
            assert await eventually(
                lambda: metric("flowcloud_gateway_connections_total", outcome="tls_failed") == failed + 1, 2
            )
            writer.close()
            result = await edge
            # The good stream kept its one session throughout.
            await check_stream(redis_url, gw, "cam-1", result, FRAMES)
            assert gw.services.ended["cam-1"] == 1

    asyncio.run(scenario())


def test_wrong_ca_or_name_is_a_clear_fatal_error(redis_url: str, pki: Pki) -> None:
    async def scenario() -> None:
        token = await register(redis_url, "cam-1")
        async with tls_gateway(redis_url, pki).listen() as gw:
            port = gw.port
            before = metric("flowcloud_edge_connects_total", result="tls_certificate")
            with pytest.raises(FatalRejection) as wrong_ca:
                await run_synthetic_edge(
                    tls_edge_config(gw.port, "cam-1", token, pki.other_ca.path, frames=1000)
                )
            with pytest.raises(FatalRejection) as wrong_name:
                await run_synthetic_edge(
                    tls_edge_config(
                        gw.port, "cam-1", token, pki.ca.path, server_name="gw.example", frames=1000
                    )
                )
            # Each failed once and gave up: a certificate will not fix itself by reconnecting.
            assert metric("flowcloud_edge_connects_total", result="tls_certificate") == before + 2
            assert gw.services.ended["cam-1"] == 0 and not gw.sessions
            # --tls-server-name names what the certificate carries when dialing an address.
            result = await run_synthetic_edge(
                tls_edge_config(gw.port, "cam-1", token, pki.ca.path, server_name="localhost")
            )
            await check_stream(redis_url, gw, "cam-1", result, FRAMES)
        assert str(wrong_ca.value) == (
            f"gateway 127.0.0.1:{port} (TLS name 127.0.0.1): TLS certificate verification of the "
            "gateway failed: self-signed certificate in certificate chain"
        )
        assert str(wrong_name.value) == (
            f"gateway 127.0.0.1:{port} (TLS name gw.example): TLS certificate verification of the "
            "gateway failed: Hostname mismatch, certificate is not valid for 'gw.example'."
        )

    asyncio.run(scenario())


def test_mutual_tls_binds_the_certificate_to_the_device(
    redis_url: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        token = await register(redis_url, "cam-1")
        await register(redis_url, "cam-2")
        async with tls_gateway(redis_url, pki, mutual=True).listen() as gw:
            assert gw.mutual_tls
            refused = metric("flowcloud_gateway_connections_total", outcome="certificate")
            tls_failed = metric("flowcloud_gateway_connections_total", outcome="tls_failed")
            # No client certificate (valid token): REJECT certificate; the edge says why and stops.
            with pytest.raises(FatalRejection) as no_certificate:
                await run_synthetic_edge(tls_edge_config(gw.port, "cam-1", token, pki.ca.path, frames=1000))
            # A valid certificate for cam-2 with cam-1's token: REJECT certificate.
            with pytest.raises(FatalRejection) as other_device:
                await run_synthetic_edge(
                    tls_edge_config(gw.port, "cam-1", token, pki.ca.path, pki.client("cam-2"))
                )
            assert metric("flowcloud_gateway_connections_total", outcome="certificate") == refused + 2
            # A certificate from a CA the gateway does not trust fails the TLS handshake (counted and
            # logged by the gateway; asyncio sends no alert, so the edge sees a closed connection and
            # retries until its source ends).
            untrusted = pki.client("cam-1", ca=pki.other_ca)
            result = await run_synthetic_edge(
                tls_edge_config(gw.port, "cam-1", token, pki.ca.path, untrusted, frames=4)
            )
            assert (result.sent, result.sessions) == (0, 0)
            assert metric("flowcloud_gateway_connections_total", outcome="tls_failed") >= tls_failed + 1
            assert gw.services.ended["cam-1"] == 0 and not gw.sessions
            # The right certificate (device id in the CN) streams.
            result = await run_synthetic_edge(
                tls_edge_config(gw.port, "cam-1", token, pki.ca.path, pki.client("cam-1"))
            )
            await check_stream(redis_url, gw, "cam-1", result, FRAMES)
        assert str(no_certificate.value) == (
            "gateway rejected the connection: certificate: this gateway requires a client certificate naming "
            "the device (mutual TLS); none was given"
        )
        assert str(other_device.value) == (
            "gateway rejected the connection: certificate: "
            "the client certificate names cam-2, not device 'cam-1'"
        )

    with (
        caplog.at_level(logging.INFO, logger="services.gateway.server"),
        caplog.at_level(logging.INFO, logger="edge.sender"),
    ):
        asyncio.run(scenario())
    assert any(
        "TLS handshake failed" in r.message and "certificate verify failed" in r.message
        for r in caplog.records
    )
    # The edge with the untrusted certificate is told what the closed connection may mean.
    assert any(r.name == "edge.sender" and MUTUAL_TLS_HINT in r.getMessage() for r in caplog.records)


def test_a_client_that_never_finishes_tls_is_cut_at_the_deadline(
    redis_url: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        token = await register(redis_url, "cam-1")
        async with tls_gateway(redis_url, pki, handshake_timeout=1.0).listen() as gw:
            failed = metric("flowcloud_gateway_connections_total", outcome="tls_failed")
            silent = await asyncio.open_connection("127.0.0.1", gw.port)
            partial = await asyncio.open_connection("127.0.0.1", gw.port)
            partial[1].write(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
            await partial[1].drain()
            started = time.monotonic()
            # Meanwhile a good TLS edge streams (its own deadline starts at its own connection).
            result = await run_synthetic_edge(tls_edge_config(gw.port, "cam-1", token, pki.ca.path))
            await closed_without_reply(silent[0], 3.0)
            await closed_without_reply(partial[0], 3.0)
            assert 0.8 < time.monotonic() - started < 3.0
            assert metric("flowcloud_gateway_connections_total", outcome="tls_failed") == failed + 2
            await check_stream(redis_url, gw, "cam-1", result, FRAMES)
            for _, writer in (silent, partial):
                writer.close()
        assert not any("TLS is off" in r.message for r in caplog.records)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())


def test_plain_gateway_warns_and_tls_settings_are_checked(
    redis_url: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with Gateway(gateway_settings(redis_url, decoder_spares=0)).listen() as gw:
            assert gw.tls is None

            # A TLS edge against it: not a certificate problem, so retried until its source ends.
            result = await run_synthetic_edge(
                tls_edge_config(gw.port, "cam-1", "token", pki.ca.path, frames=3)
            )
            assert (result.sent, result.sessions) == (0, 0)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert any("TLS is off: device tokens and video travel in clear" in r.message for r in caplog.records)
    assert any("the gateway does not seem to speak TLS" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="^tls_client_ca_file needs tls_cert_file"):
        Gateway(gateway_settings(redis_url, tls_client_ca_file=str(pki.ca.path)))
    with pytest.raises(ValueError, match="^cannot load the gateway certificate from .*missing.crt"):
        Gateway(gateway_settings(redis_url, tls_cert_file=str(pki.directory / "missing.crt")))
    with pytest.raises(ValueError, match="^cannot load the gateway certificate from"):
        # A key that does not belong to the certificate.
        Gateway(
            gateway_settings(
                redis_url, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.client("x").key)
            )
        )
    with pytest.raises(ValueError, match="^cannot load the client CA from"):
        client = pki.client("y")
        Gateway(
            gateway_settings(
                redis_url, tls_cert_file=str(pki.server.cert), tls_client_ca_file=str(client.key)
            )
        )


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    def command(*args: str) -> tuple[int, str]:
        status = main(list(args))
        return status, capsys.readouterr().err.strip().splitlines()[-1]

    gateway = ("edge", "--gateway", "127.0.0.1:9", "--device-id", "x", "--token", "t")
    assert command(*gateway, "--tls-key", str(pki.server.key)) == (
        1,
        "flowcloud edge: a TLS client key needs its certificate (--tls-cert)",
    )
    status, line = command(*gateway, "--tls-ca", str(pki.directory / "nope.pem"))
    assert status == 1 and line.startswith(f"flowcloud edge: cannot load the gateway CA from {pki.directory}")
    status, line = command("gateway", "--tls-key", str(pki.server.key), "--metrics-port", "0")
    assert (status, line) == (
        1,
        "flowcloud gateway: tls_key_file needs tls_cert_file (the gateway's certificate chain)",
    )


def test_cli_edge_process_streams_over_mutual_tls(redis_url: str, pki: Pki) -> None:
    async def scenario() -> None:
        token = await register(redis_url, "cli-cam")
        client = pki.client("cli-cam", san=True)  # the device id as a DNS subjectAltName
        async with tls_gateway(redis_url, pki, mutual=True).listen() as gw:
            env = {**os.environ, "FLOWCLOUD_EDGE_TOKEN": token}
            env["FLOWCLOUD_EDGE_TLS_KEY_FILE"] = str(client.key)  # the key from the environment
            command = flowcloud(
                "edge", "--gateway", f"127.0.0.1:{gw.port}", "--device-id", "cli-cam",
                "--source", "synthetic", "--width", "96", "--height", "64", "--frames", str(FRAMES),
                "--encoder", "libx264", "--metrics-port", "0", "--json",
                "--tls-ca", str(pki.ca.path), "--tls-cert", str(client.cert),
                "--tls-server-name", "localhost",
            )  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 40)
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip() == f'{{"captured": {FRAMES}, "sent": {FRAMES}, "sessions": 1}}'
            assert b"TLS is off" not in err
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cli-cam")) >= FRAMES, 20)
            assert await session_ended(gw, "cli-cam")

    asyncio.run(scenario())


def test_tls_context_policy(pki: Pki) -> None:
    context = client_context(str(pki.ca.path))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
