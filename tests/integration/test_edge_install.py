"""The edge installs lean: the `flowcloud edge` command, run for real (synthetic camera, libx264,
a real handshake and stream to a peer gateway), imports only what the core dependencies and the
``edge`` extra install, and none of torch, torchvision, redis or the server and training stacks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.cli import REPO
from support.edge import TestGateway

SERVER_AND_TRAINING = {"torch", "torchvision", "redis", "fastapi", "uvicorn", "kubernetes", "matplotlib"}

# Run the real CLI entry point; at exit, write the top-level modules the process imported.
PROBE = """
import atexit, json, sys
def report():
    with open(sys.argv[1], "w") as out:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), out)
atexit.register(report)
from flowcloud.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _requirement_names(requirements: list[str]) -> set[str]:
    """The distribution names of requirements that apply here (markers evaluated, extras off)."""
    names: set[str] = set()
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.add(canonicalize_name(requirement.name))
    return names


def edge_install() -> set[str]:
    """The distributions `pip install flowcloud[edge]` brings: the core dependencies, the edge extra,
    and what those require in turn."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = list(_requirement_names(project["dependencies"] + project["optional-dependencies"]["edge"]))
    installed: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in installed:
            installed.add(name)
            todo += _requirement_names(metadata.requires(name) or [])
    return installed


def test_core_dependencies_pin_no_server_or_training_stack() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _requirement_names(project["dependencies"]).isdisjoint(SERVER_AND_TRAINING)
    assert edge_install().isdisjoint(SERVER_AND_TRAINING)


def test_the_edge_command_imports_only_what_the_edge_install_has(tmp_path: Path) -> None:
    modules_file = tmp_path / "modules.json"

    async def scenario() -> tuple[int, bytes]:
        async with TestGateway() as gw:
            command = [
                sys.executable, "-c", PROBE, str(modules_file),
                "edge", "--gateway", f"127.0.0.1:{gw.port}", "--device-id", "lean-cam",
                "--source", "synthetic",
                "--width", "96", "--height", "64", "--fps", "30", "--frames", "6", "--encoder", "libx264",
                "--metrics-port", "0", "--json",
            ]  # fmt: skip
            env = {**os.environ, "FLOWCLOUD_EDGE_TOKEN": "tok"}
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()[-2000:]
            assert json.loads(out)["sent"] == 6
            return proc.returncode, out

    asyncio.run(scenario())
    imported = set(json.loads(modules_file.read_text()))
    assert imported.isdisjoint(SERVER_AND_TRAINING), sorted(imported & SERVER_AND_TRAINING)
    # Every third-party module it imported comes from a distribution the edge install has.
    owners = metadata.packages_distributions()
    ours = {"flowcloud", "edge", "services", "training"}
    third_party = {m for m in imported if m in owners and m not in ours}
    distributions = {canonicalize_name(d) for m in third_party for d in owners[m]}
    allowed = edge_install() | {"flowcloud", "setuptools", "pip"}
    assert distributions <= allowed, sorted(distributions - allowed)
