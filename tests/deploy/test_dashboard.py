"""The Grafana dashboard queries only metrics the services define."""

from __future__ import annotations

import json
import re

from .conftest import ROOT

DASHBOARD = ROOT / "infra" / "grafana" / "flowcloud-dashboard.json"


def defined_metrics() -> set[str]:
    names: set[str] = set()
    for folder in ("flowcloud", "services", "edge"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(flowcloud_[a-z0-9_]+)\"", text):
                names.add(name)
                if kind == "Histogram":
                    names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_dashboard_uses_only_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bflowcloud_[a-z0-9_]+", e)}
    defined = defined_metrics()
    assert used, "the dashboard queries nothing"
    assert used <= defined, f"metrics the code does not define: {sorted(used - defined)}"
    for prefix in ("flowcloud_gateway_", "flowcloud_worker_", "flowcloud_api_", "flowcloud_edge_"):
        assert any(m.startswith(prefix) for m in used), f"no panel for {prefix}*"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
