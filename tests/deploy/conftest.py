"""Shared helpers of the deployment checks: the real tools, and the CLI and settings contracts.

CI has no cluster and no Docker engine, so these checks are static, but they use the real tools
(helm, kubernetes-validate, hadolint) that `make tools` installs; a missing tool fails the test.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from flowcloud.cli.main import COMMANDS
from flowcloud.settings import (
    AlertsSettings,
    ApiSettings,
    EdgeSettings,
    GatewaySettings,
    ServiceSettings,
    WorkerSettings,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "flowcloud"
SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (
    GatewaySettings,
    WorkerSettings,
    ApiSettings,
    AlertsSettings,
    EdgeSettings,
)


def find_tool(name: str) -> str:
    """A tool from .tools/bin (make tools), the venv's bin, or PATH; fails the test when absent."""
    for candidate in (ROOT / ".tools" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make tools` (it installs helm, kubectl, hadolint)")
    return found


def settings_env_names() -> set[str]:
    """Every environment variable a FlowCloud settings class reads."""
    names: set[str] = set()
    shared = set(ServiceSettings.model_fields)
    for cls in SETTINGS_CLASSES:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field in cls.model_fields:
            if field not in shared:
                names.add(f"{prefix}{field}".upper())
    for info in ServiceSettings.model_fields.values():
        alias = info.validation_alias
        choices = getattr(alias, "choices", [alias])
        names.update(str(c) for c in choices if str(c).startswith("FLOWCLOUD_"))
    return names


def secret_env_names() -> set[str]:
    """Settings that hold secrets (SecretStr fields), plus the Redis URLs (they carry the passwords)."""
    names = {"FLOWCLOUD_REDIS_URL", "FLOWCLOUD_CONTROL_REDIS_URL"}
    shared = ServiceSettings.model_fields
    for field in shared.values():  # read under their own FLOWCLOUD_* alias, whatever the service
        if "SecretStr" in repr(field.annotation):
            names.update(str(c) for c in getattr(field.validation_alias, "choices", []) if str(c).isupper())
    for cls in SETTINGS_CLASSES:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name, field in cls.model_fields.items():
            if "SecretStr" in repr(field.annotation) and name not in shared:
                names.add(f"{prefix}{name}".upper())
    return names


def cli_commands() -> set[str]:
    return set(COMMANDS)


def parse_cli(argv: list[str]) -> None:
    """Parse `flowcloud COMMAND ARGS...` with the command's own argparse parser; fails the test on error."""
    import argparse
    import importlib

    assert argv[0] == "flowcloud", argv
    command, rest = argv[1], argv[2:]
    assert command in COMMANDS, f"`flowcloud {command}` is not a CLI command ({sorted(COMMANDS)})"
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.fail(f"cannot import {module_name} to check `flowcloud {command}`: {exc}")
    parser = argparse.ArgumentParser(prog=f"flowcloud {command}", exit_on_error=False)
    module.configure(parser)
    try:
        parser.parse_args(rest)
    except (argparse.ArgumentError, SystemExit) as exc:
        pytest.fail(f"`flowcloud {command} {' '.join(rest)}` does not parse: {exc}")
