"""Prometheus metrics of a segmentation worker (served on /metrics with /healthz and /readyz)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from flowcloud import stages

BATCH_SIZE = Histogram(
    "flowcloud_worker_batch_size",
    "Frames per inference batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INFERENCE_SECONDS = Histogram(
    "flowcloud_worker_inference_seconds",
    "Wall time of one batch on the model (upload, forward, upsample, argmax, download)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SECONDS = Histogram(
    "flowcloud_worker_batch_seconds",
    "Wall time of one batch from read to acknowledged",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
END_TO_END_SECONDS = Histogram(
    "flowcloud_worker_end_to_end_latency_seconds",
    "Capture (edge) to result persisted, on Redis's clock",
    buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
CONSUMER_LAG = Gauge(
    "flowcloud_worker_consumer_lag", "Frame references not yet read by the group, summed over the shards"
)
SHARD_LAG = Gauge(
    "flowcloud_worker_shard_lag", "Frame references of one shard queue not yet read by the group", ["shard"]
)
PENDING = Gauge(
    "flowcloud_worker_pending", "References the group has read but not acknowledged, summed over the shards"
)
FRAMES_PROCESSED = Counter("flowcloud_worker_frames_processed_total", "Frames segmented and persisted")
FRAMES_DROPPED = Counter(
    "flowcloud_worker_frames_dropped_total",
    "Frames acknowledged without a result (realtime mode), by reason: stale (when read), stale_in_queue, "
    "stale_before_inference, late_after_inference (the model overran its forecast), queue_full, "
    "trimmed_pending, evicted (the frame left its stream's frame log before a worker fetched it)",
    ["reason"],
)
QUEUED = Gauge("flowcloud_worker_queued_frames", "Frames read and waiting for a batch")
BATCH_LIMIT = Gauge(
    "flowcloud_worker_batch_limit",
    "Frames the next batch may take: the configured batch size, or fewer if more would not fit the "
    "time budget of one batch (realtime: a third of max_frame_age) at the model's measured speed",
)
FRAMES_FAILED = Counter("flowcloud_worker_frames_failed_total", "Failed attempts at a frame", ["stage"])
FRAMES_DEAD_LETTERED = Counter(
    "flowcloud_worker_frames_dead_lettered_total",
    "Frames moved to the dead-letter stream, by reason: malformed, failed (max_attempts times), "
    "redelivered (max_attempts deliveries without an acknowledgement: it may kill its worker)",
    ["reason"],
)
FRAMES_RECLAIMED = Counter(
    "flowcloud_worker_frames_reclaimed_total", "Pending frames of idle consumers taken over with XAUTOCLAIM"
)
CLOCK_OFFSET = Gauge(
    "flowcloud_worker_clock_offset_seconds", "Redis's clock minus this machine's (frame ages use Redis's)"
)
REDIS_ERRORS = Counter("flowcloud_worker_redis_errors_total", "Redis connection failures (then reconnect)")
READY = Gauge(
    "flowcloud_worker_ready", "1 once the model is loaded and warmed up, 0 while loading or draining"
)
# Published to persisted: queue, batch, inference, persist (flowcloud.stages.WORKER_STAGES).
STAGE_SECONDS = Histogram(
    "flowcloud_worker_stage_seconds",
    "Seconds a frame spent in each stage this service measures (flowcloud.stages), on Redis's clock",
    ["stage"],
    buckets=stages.BUCKETS,
)
