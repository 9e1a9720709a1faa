"""The chart's TLS values for the gateway's device port: Secrets mounted read-only, the settings
pointing at them, nothing when TLS is off, and mutual TLS refused without a server certificate."""

from __future__ import annotations

from typing import Any

import pytest

from flowcloud.settings import GatewaySettings

from .conftest import CHART
from .test_chart import containers, helm, one, pod_spec, render

TLS = ("--set", "gateway.tls.secretName=gw-tls")
MTLS = (
    *TLS,
    "--set",
    "gateway.tls.clientCA.secretName=device-ca",
    "--set",
    "gateway.tls.clientCA.secretKey=bundle.pem",
)


def _gateway(*args: str) -> tuple[dict[str, str], dict[str, dict[str, object]], list[dict[str, object]]]:
    deployment = one(render(*args), "Deployment", "gateway")
    container = next(containers(deployment))
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    return env, volumes, container["volumeMounts"]


def test_tls_off_by_default() -> None:
    env, volumes, _ = _gateway()
    assert not [name for name in env if "_TLS_" in name]
    assert set(volumes) == {"tmp"}


def test_mutual_tls_mounts_the_secrets_and_sets_the_settings() -> None:
    env, volumes, mounts = _gateway(*MTLS)
    files = {name: value for name, value in env.items() if "_TLS_" in name}
    assert files == {
        "FLOWCLOUD_GATEWAY_TLS_CERT_FILE": "/etc/flowcloud/tls/tls.crt",
        "FLOWCLOUD_GATEWAY_TLS_KEY_FILE": "/etc/flowcloud/tls/tls.key",
        "FLOWCLOUD_GATEWAY_TLS_CLIENT_CA_FILE": "/etc/flowcloud/client-ca/ca.crt",
    }
    # The names are real settings (the gateway would refuse unknown ones).
    given: dict[str, Any] = {name.removeprefix("FLOWCLOUD_GATEWAY_").lower(): v for name, v in files.items()}
    assert GatewaySettings(**given).tls_client_ca_file == "/etc/flowcloud/client-ca/ca.crt"
    assert volumes["tls"]["secret"] == {
        "secretName": "gw-tls",
        "defaultMode": 0o440,
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
    }
    assert volumes["client-ca"]["secret"] == {
        "secretName": "device-ca",
        "defaultMode": 0o440,
        "items": [{"key": "bundle.pem", "path": "ca.crt"}],
    }
    assert {"name": "tls", "mountPath": "/etc/flowcloud/tls", "readOnly": True} in mounts
    assert {"name": "client-ca", "mountPath": "/etc/flowcloud/client-ca", "readOnly": True} in mounts


def test_tls_without_client_ca_and_mtls_without_a_certificate() -> None:
    env, volumes, _ = _gateway(*TLS)
    assert "FLOWCLOUD_GATEWAY_TLS_CERT_FILE" in env and "FLOWCLOUD_GATEWAY_TLS_CLIENT_CA_FILE" not in env
    assert "client-ca" not in volumes
    result = helm("template", "fc", str(CHART), "--set", "gateway.tls.clientCA.secretName=ca", check=False)
    assert result.returncode != 0
    assert "gateway.tls.clientCA (mutual TLS) needs gateway.tls.secretName" in result.stderr


@pytest.mark.parametrize("value", ["gateway.tls.secretNme=x", "gateway.tls.clientCA.secretKey="])
def test_schema_rejects_bad_tls_values(value: str) -> None:
    result = helm("template", "fc", str(CHART), "--set", value, check=False)
    assert result.returncode != 0 and "schema" in result.stderr
