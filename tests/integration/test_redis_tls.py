"""A managed-style data plane: a Redis Cluster node speaking TLS only, with a certificate from a
private CA and a password. The settings the chart gives every service (FLOWCLOUD_REDIS_URL without a
password, FLOWCLOUD_REDIS_PASSWORD, FLOWCLOUD_REDIS_CA_FILE, FLOWCLOUD_REDIS_CLUSTER) reach it through
the one client factory; without the CA or the password it refuses."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException
from support.tls import Pki
from support.waiting import wait_for

from flowcloud.children import die_with_parent
from flowcloud.redis_client import connect, connect_async
from flowcloud.redis_server import find_redis_server, free_ports
from flowcloud.settings import ServiceSettings, WorkerSettings, with_redis_auth

# URL-special characters: they must reach Redis intact, escaped by the settings, not by the operator.
PASSWORD = "tok@en:/#%?&="


class TlsClusterNode:
    """One redis-server in cluster mode holding every slot, on a TLS-only port."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        self.pki = pki
        # The bus port given, not the default port + 10000: above 55535 that is no port at all, and
        # below it may be another process's (redis-server then exits at start).
        self.port, bus_port = free_ports(2)
        cmd = [
            find_redis_server(),
            "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
            "--tls-ca-cert-file", str(pki.ca.path), "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--cluster-enabled", "yes", "--tls-cluster", "yes", "--cluster-port", str(bus_port),
            "--cluster-config-file", str(directory / "nodes.conf"),
            "--logfile", str(directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        admin = redis.Redis(
            host="127.0.0.1", port=self.port, password=PASSWORD, ssl=True, ssl_ca_certs=str(pki.ca.path)
        )
        wait_for("the TLS redis-server to answer", lambda: self._answers(admin), 15, self.process)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(
            "the one-node cluster to be ok",
            lambda: b"cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"),
            15,
            self.process,
        )
        admin.close()

    def _answers(self, client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsClusterNode]:
    directory = tmp_path_factory.mktemp("redis-tls")
    server = TlsClusterNode(directory, Pki.create(directory))
    yield server
    server.stop()


def chart_env(monkeypatch: pytest.MonkeyPatch, node: TlsClusterNode, **overrides: str | None) -> None:
    """The environment the chart renders for an external TLS Redis Cluster (externalRedis.*)."""
    env: dict[str, str | None] = {
        "FLOWCLOUD_REDIS_URL": f"rediss://127.0.0.1:{node.port}",
        "FLOWCLOUD_REDIS_PASSWORD": PASSWORD,
        "FLOWCLOUD_REDIS_CA_FILE": str(node.pki.ca.path),
        "FLOWCLOUD_REDIS_CLUSTER": "true",
        "FLOWCLOUD_FRAME_SHARDS": "6",
    }
    env.update(overrides)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_the_chart_settings_reach_a_tls_cluster(
    node: TlsClusterNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    chart_env(monkeypatch, node)
    settings = WorkerSettings()
    assert settings.redis_cluster and settings.frame_shards == 6
    assert PASSWORD not in str(settings.describe()), "the folded password is redacted in logs"
    client = connect(settings.redis_url, settings.redis_cluster)
    assert isinstance(client, redis.RedisCluster)
    client.set("{cam-1}:probe", "sync")
    client.close()

    async def read_back() -> bytes | None:
        aclient = connect_async(settings.redis_url, settings.redis_cluster)
        try:
            return await aclient.get("{cam-1}:probe")
        finally:
            await aclient.aclose()

    assert asyncio.run(read_back()) == b"sync"


def test_without_the_ca_the_certificate_is_refused(
    node: TlsClusterNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    chart_env(monkeypatch, node, FLOWCLOUD_REDIS_CA_FILE=None)
    settings = ServiceSettings()
    with pytest.raises(RedisClusterException, match="CERTIFICATE_VERIFY_FAILED"):
        connect(settings.redis_url, settings.redis_cluster).ping()


def test_without_the_password_redis_refuses(node: TlsClusterNode, monkeypatch: pytest.MonkeyPatch) -> None:
    chart_env(monkeypatch, node, FLOWCLOUD_REDIS_PASSWORD=None, FLOWCLOUD_REDIS_CLUSTER="false")
    settings = ServiceSettings()
    with pytest.raises(redis.AuthenticationError):
        connect(settings.redis_url, settings.redis_cluster).ping()


def test_a_single_redis_url_gets_the_same_treatment(
    node: TlsClusterNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    chart_env(monkeypatch, node, FLOWCLOUD_REDIS_CLUSTER="false")
    settings = ServiceSettings()

    async def ping() -> bool:
        client = connect_async(settings.redis_url, settings.redis_cluster)
        assert isinstance(client, aioredis.Redis)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(ping())


def test_the_url_keeps_its_own_password_and_ca() -> None:
    url = "rediss://user:own@h:6380/0?ssl_ca_certs=%2Fown.pem"
    assert with_redis_auth(url, "other", "/other.pem") == url
    assert with_redis_auth("rediss://user@h:6380", "p w", None) == "rediss://user:p%20w@h:6380"
    with pytest.raises(ValueError, match=r"needs a rediss:// URL, not redis://"):
        ServiceSettings(redis_url="redis://h:6379", redis_ca_file="/ca.pem")
