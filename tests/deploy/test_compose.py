"""docker-compose.yml: valid against the Compose Specification schema, and its commands, variables and
ports are the CLI's, the settings classes' and the Helm chart's."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from flowcloud.settings import EdgeSettings

from .conftest import CHART, ROOT, parse_cli, secret_env_names, settings_env_names

COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
LONG_RUNNING = ("redis", "gateway", "worker", "worker-gpu", "api", "edge")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def validate(doc: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    # The schema names draft 2019-09 (with a URL jsonschema does not recognise).
    jsonschema.Draft201909Validator(schema).validate(doc)


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    validate(compose)


def test_schema_check_is_real(compose: dict[str, Any]) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["gateway"]["healthchek"] = bad["services"]["gateway"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(compose)
    bad["services"]["edge"]["depends_on"]["gateway"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def invocations(service: dict[str, Any]) -> list[list[str]]:
    """The `flowcloud ...` command lines a service runs (directly or inside `sh -c`)."""
    entrypoint = service.get("entrypoint")
    command = service.get("command", [])
    if entrypoint == ["sh", "-c"]:
        words = shlex.split(" ".join(command).replace("$$", "$"))
        found, current = [], None
        for word in words:
            if word == "flowcloud":
                current = ["flowcloud"]
                found.append(current)
            elif word in ("||", "&&", ";", ">", "|") or word.startswith(">"):
                current = None
            elif current is not None and not word.startswith("/run/"):
                current.append(word)
        return found
    assert entrypoint is None, "the image's entrypoint is flowcloud"
    return [["flowcloud", *command]]


def test_commands_match_the_cli(compose: dict[str, Any]) -> None:
    seen = {}
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        runs = invocations(service)
        assert runs, f"{name} runs no flowcloud command"
        for argv in runs:
            parse_cli(argv)
        seen[name] = runs
    assert [r[1] for r in seen["gateway"]] == ["gateway"]
    assert [r[1] for r in seen["worker"]] == ["worker"] == [r[1] for r in seen["worker-gpu"]]
    assert [r[1] for r in seen["api"]] == ["api"]
    assert seen["init"][0][:5] == ["flowcloud", "devices", "add", "demo-cam", "--tenant"]
    edge = seen["edge"][0]
    assert edge[:2] == ["flowcloud", "edge"]
    assert edge[edge.index("--device-id") + 1] == "demo-cam"
    assert edge[edge.index("--source") + 1] == "synthetic"
    assert edge[edge.index("--gateway") + 1] == "gateway:7000"


def test_env_vars_are_settings_and_no_secret_is_literal(compose: dict[str, Any]) -> None:
    known = settings_env_names()
    secrets = secret_env_names() - {"FLOWCLOUD_REDIS_URL"}  # compose's Redis has no password
    for name, service in compose["services"].items():
        for var, value in (service.get("environment") or {}).items():
            if var.startswith("FLOWCLOUD_"):
                assert var in known, f"{name}: {var} is not a setting"
            if var in secrets:
                assert str(value).startswith("${"), f"{name}: {var} is a literal"


def test_ports_match_the_chart(compose: dict[str, Any]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    services = compose["services"]
    assert services["gateway"]["environment"]["FLOWCLOUD_GATEWAY_PORT"] == str(values["gateway"]["port"])
    assert services["gateway"]["environment"]["FLOWCLOUD_GATEWAY_METRICS_PORT"] == str(
        values["gateway"]["metricsPort"]
    )
    assert services["worker"]["environment"]["FLOWCLOUD_WORKER_METRICS_PORT"] == str(
        values["worker"]["metricsPort"]
    )
    assert services["api"]["environment"]["FLOWCLOUD_API_PORT"] == str(values["api"]["port"])
    assert services["edge"]["environment"]["FLOWCLOUD_EDGE_METRICS_PORT"] == str(
        EdgeSettings.model_fields["metrics_port"].default
    )
    for name, port in (
        ("gateway", 9101),
        ("worker", 9102),
        ("worker-gpu", 9102),
        ("api", 8000),
        ("edge", 9103),
    ):
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/" in probe, f"{name} healthcheck does not probe port {port}"


def test_healthchecks_and_startup_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dependency == "init" else "service_healthy"
            assert rule["condition"] == expected, (name, dependency)
    for name in ("init", "gateway", "worker", "worker-gpu", "api"):
        assert "redis" in services[name]["depends_on"]
    assert set(services["edge"]["depends_on"]) == {"init", "gateway", "worker"}
    assert services["init"]["restart"] == "no"
    assert services["worker-gpu"]["profiles"] == ["gpu"] and "profiles" not in services["worker"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"


def test_containers_run_as_non_root_from_the_project_dockerfiles(compose: dict[str, Any]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["securityContext"]["runAsUser"]
    for name, service in compose["services"].items():
        assert not str(service.get("user", "0")).startswith("0"), f"{name} runs as root"
        assert service.get("read_only") is True and service.get("cap_drop") == ["ALL"], name
        if name != "redis":
            assert service["user"] == f"{uid}:{uid}"
            assert (ROOT / service["build"]["dockerfile"]).is_file()
