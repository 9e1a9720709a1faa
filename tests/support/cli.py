"""The ``flowcloud`` command line as a user runs it: a real process of this interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def flowcloud(*args: str | Path) -> list[str]:
    """The command line of ``flowcloud ARGS`` (through the CLI's module, with this interpreter)."""
    return [sys.executable, "-m", "flowcloud.cli.main", *map(str, args)]


def run_flowcloud(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``flowcloud ARGS`` to its end (``env`` added to this environment); never raises on failure."""
    return subprocess.run(
        flowcloud(*args),
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def add_device(redis_url: str, device_id: str) -> str:
    """``flowcloud devices add DEVICE --json``: register a device; its token."""
    added = run_flowcloud("devices", "add", device_id, "--json", env={"FLOWCLOUD_REDIS_URL": redis_url})
    assert added.returncode == 0, added.stderr
    token = json.loads(added.stdout)["token"]
    assert isinstance(token, str) and token
    return token
