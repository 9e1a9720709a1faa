"""The Redis Cluster rules of flowcloud.keys, checked on the source: no KEYS and no SCAN (both see
one node of a cluster), and MULTI transactions only where every key is of one slot: in the control
plane (a plain Redis, flowcloud.settings) or on one stream's keys. Scripts and pipelines over
several slots are caught at run time by the tests on a real cluster (test_results_cluster)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("flowcloud", "services", "edge", "bench")
# Modules whose transactions are on the control plane (devices, API keys, alert rules: a plain Redis).
CONTROL_PLANE = {"flowcloud/registry.py", "services/api/apikeys.py", "flowcloud/alerts.py"}
# Functions ("module:function") whose transactions touch one slot, or are known to cross slots and
# are owned elsewhere, with why.
ALLOWED: dict[str, str] = {
    "services/worker/recovery.py:fail": "INCR and EXPIRE of one frame's attempts counter: one key",
    "flowcloud/frame_log.py:publish_blocking": "MULTI only with atomic=True, which its callers (tests "
    "and benches) ask for on one Redis or one shard's references, so that one read sees them all",
}


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """Every call, with the name of the function around it ("" at module level)."""
    out: list[tuple[str, ast.Call]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call):
                out.append((function, child))
            visit(child, inner)

    visit(tree, "")
    return out


def _violations(source: str, rel: str) -> list[str]:
    out = []
    for function, node in _calls(ast.parse(source, rel)):
        if not isinstance(node.func, ast.Attribute):
            continue
        name, where = node.func.attr, f"{rel}:{node.lineno}"
        if name == "keys" and (node.args or node.keywords):  # dict.keys() takes no argument; KEYS does
            out.append(f"{where}: KEYS")
        elif name in ("scan", "scan_iter"):
            out.append(f"{where}: SCAN")
        elif name == "execute_command" and node.args and isinstance(node.args[0], ast.Constant):
            command = str(node.args[0].value).upper()
            if command in ("KEYS", "SCAN", "MULTI"):
                out.append(f"{where}: {command}")
        elif rel not in CONTROL_PLANE and f"{rel}:{function}" not in ALLOWED:
            transaction = name in ("transaction", "multi") or (
                name == "pipeline"
                and (
                    any(k.arg == "transaction" and not _is_false(k.value) for k in node.keywords)
                    or (not node.keywords and not node.args)  # redis-py's default is transaction=True
                )
            )
            if transaction:
                out.append(f"{where}: a MULTI transaction outside the control plane")
    return out


def _is_false(value: ast.expr) -> bool:
    return isinstance(value, ast.Constant) and value.value is False


def test_no_keys_scan_or_transactions_across_slots() -> None:
    found = [
        v for path in _sources() for v in _violations(path.read_text(), path.relative_to(REPO).as_posix())
    ]
    assert found == []


def test_the_check_sees_what_it_forbids() -> None:
    """The checker flags each forbidden form (else the test above could never fail)."""
    probe = (
        "async def f(r):\n"
        "    await r.keys('fc:*')\n"
        "    async for k in r.scan_iter('fc:*'):\n"
        "        pass\n"
        "    p = r.pipeline()\n"
        "    q = r.pipeline(transaction=True)\n"
        "    ok = r.pipeline(transaction=False)\n"
        "    d = {}.keys()\n"
    )
    found = _violations(probe, "services/probe.py")
    assert (
        sorted(v.split(": ", 1)[1] for v in found)
        == ["KEYS", "SCAN"] + ["a MULTI transaction outside the control plane"] * 2
    )


def test_a_cluster_needs_the_control_plane_apart_where_it_is_read() -> None:
    from pydantic import ValidationError

    from flowcloud.settings import (
        AlertsSettings,
        ApiSettings,
        GatewaySettings,
        ServiceSettings,
        WorkerSettings,
    )

    for model in (ApiSettings, AlertsSettings, GatewaySettings):
        with pytest.raises(
            ValidationError, match="FLOWCLOUD_REDIS_CLUSTER needs FLOWCLOUD_CONTROL_REDIS_URL"
        ):
            model(redis_cluster=True)
        assert model(redis_cluster=True, control_redis_url="redis://control:6379/0").redis_cluster
    assert WorkerSettings(redis_cluster=True).redis_cluster  # workers never read the control plane
    with pytest.raises(ValueError, match="needs FLOWCLOUD_CONTROL_REDIS_URL"):  # the CLIs ask for it
        ServiceSettings(redis_cluster=True).control_url  # noqa: B018
