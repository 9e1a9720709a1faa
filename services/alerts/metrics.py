"""Prometheus metrics of the alert evaluator (served on /metrics with /healthz and /readyz)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESULTS = Counter(
    "flowcloud_alerts_results_total",
    "Results read from the results stream, by outcome: evaluated (against at least one rule), "
    "no_rules (none applies), late (a newer result of the stream was evaluated first), malformed, "
    "trimmed_pending (read by an evaluator that died, trimmed from its shard before another "
    "reclaimed it: never evaluated)",
    ["outcome"],
)
EVALUATIONS = Counter("flowcloud_alerts_evaluations_total", "(result, rule) pairs evaluated")
FIRINGS = Counter("flowcloud_alerts_firings_total", "Alert firings recorded")
FIRINGS_DROPPED = Counter(
    "flowcloud_alerts_firings_dropped_total",
    "Firings removed from the delivery queue before a webhook deliverer handled them, by reason: "
    "trimmed_unread (over the queue's bound, never read by a deliverer), trimmed_pending (read by a "
    "deliverer that died, trimmed before another reclaimed it). A firing trimmed unread, if pending, "
    "is marked dead",
    ["reason"],
)
DELIVERIES = Counter(
    "flowcloud_alerts_webhook_deliveries_total",
    "Webhook tries by outcome: ok, failed (retried later) or dead (the last try failed)",
    ["outcome"],
)
BATCH_SECONDS = Histogram(
    "flowcloud_alerts_batch_seconds",
    "Wall time of evaluating one batch of results, read to acknowledged",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PENDING = Gauge("flowcloud_alerts_deliveries_in_flight", "Webhook deliveries in progress")
REDIS_ERRORS = Counter("flowcloud_alerts_redis_errors_total", "Redis errors (the loop backs off and retries)")

for outcome in ("evaluated", "no_rules", "late", "malformed", "trimmed_pending"):
    RESULTS.labels(outcome)
for reason in ("trimmed_unread", "trimmed_pending"):
    FIRINGS_DROPPED.labels(reason)
for outcome in ("ok", "failed", "dead"):
    DELIVERIES.labels(outcome)
