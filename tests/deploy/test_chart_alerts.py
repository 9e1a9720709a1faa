"""The chart's PrometheusRule: every alert parses as PromQL (promql-parser, the Prometheus grammar)
and names only metrics, and labels of them, that FlowCloud's services export; thresholds come
from the values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from prometheus_client.metrics import MetricWrapperBase

from edge import metrics as edge_metrics
from services.api import metrics as api_metrics
from services.gateway import metrics as gateway_metrics
from services.worker import metrics as worker_metrics

from .test_chart import CI_VALUES, Obj, by_kind, render

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Labels Prometheus gives every series from its scrape target (the Prometheus Operator's ServiceMonitors).
TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for every metric the services define (the histogram's ``le`` too)."""
    series: dict[str, set[str]] = {}
    for module in (gateway_metrics, worker_metrics, api_metrics, edge_metrics):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                for suffix in SUFFIXES[str(value._type)]:
                    labels = set(value._labelnames) | ({"le"} if suffix == "_bucket" else set())
                    series[value._name + suffix] = labels
    return series


def selectors(expr: Any) -> Iterator[Any]:
    """Every vector selector in a parsed PromQL expression."""
    if isinstance(expr, promql_parser.VectorSelector):
        yield expr
    elif isinstance(expr, promql_parser.MatrixSelector):
        yield expr.vector_selector
    elif isinstance(expr, promql_parser.Call):
        for arg in expr.args:
            yield from selectors(arg)
    else:
        for part in ("lhs", "rhs", "expr", "param"):
            child = getattr(expr, part, None)
            if child is not None:
                yield from selectors(child)


@pytest.fixture(scope="module")
def rules() -> list[Obj]:
    (rule,) = by_kind(render("-f", str(CI_VALUES)), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_no_rule_unless_enabled() -> None:
    assert by_kind(render(), "PrometheusRule") == []


def test_alerts_parse_and_name_exported_metrics(rules: list[Obj]) -> None:
    series = exported()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 8
    for rule in rules:
        expr = promql_parser.parse(rule["expr"])  # ValueError on a syntax error
        found = list(selectors(expr))
        assert found, f"{rule['alert']} reads no metric"
        for selector in found:
            assert selector.name in series, f"{rule['alert']}: {selector.name} is not exported"
            for matcher in selector.matchers.matchers:
                assert matcher.name in series[selector.name] | TARGET_LABELS, (
                    f"{rule['alert']}: no label {matcher.name}"
                )
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_thresholds_come_from_the_values(rules: list[Obj]) -> None:
    by_name = {r["alert"]: r for r in rules}
    assert by_name["FlowCloudLatencyHigh"]["expr"].endswith("> 1.5")  # set in the CI values
    assert by_name["FlowCloudWorkersLagging"]["expr"].endswith("> 500")  # the default
    assert "< 7 * 86400" in by_name["FlowCloudGatewayCertificateExpiresSoon"]["expr"]
    # Go template braces survive for Prometheus to fill in.
    assert "{{ $value }}" in by_name["FlowCloudWorkersLagging"]["annotations"]["summary"]
