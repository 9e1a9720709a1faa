"""Prometheus metrics of the edge daemon (one set per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FRAMES_CAPTURED = Counter("flowcloud_edge_frames_captured_total", "pictures captured or access units relayed")
FRAMES_SENT = Counter("flowcloud_edge_frames_sent_total", "access units written to the gateway")
FRAMES_DROPPED = Counter(
    "flowcloud_edge_frames_dropped_total",
    "access units not sent, by reason (queue_full, stale, await_keyframe, disconnected; upstream_<reason> "
    "for what the depacketizer of a relayed, replayed or GStreamer-encoded stream dropped)",
    ["reason"],
)
PACKETS_SENT = Counter("flowcloud_edge_rtp_packets_sent_total", "RTP packets written to the gateway")
BYTES_SENT = Counter("flowcloud_edge_bytes_sent_total", "bytes written to the gateway (framing included)")
CONNECTS = Counter("flowcloud_edge_connects_total", "connection attempts, by result", ["result"])
CONNECTED = Gauge("flowcloud_edge_connected", "1 while a gateway session is established")
GOAWAYS = Counter(
    "flowcloud_edge_goaways_total",
    "sessions ended at a gateway's GOAWAY (it was stopping), then reconnected at once",
)
CLOCK_OFFSET = Gauge(
    "flowcloud_edge_clock_offset_seconds", "gateway clock minus edge clock, at the last handshake"
)
RTT = Gauge("flowcloud_edge_rtt_seconds", "round-trip time measured in the last handshake")
ENCODE_SECONDS = Histogram(
    "flowcloud_edge_encode_seconds",
    "time to encode one picture",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
)

# Store and forward (edge.spool, edge.backfill).
SPOOL_BYTES = Gauge("flowcloud_edge_spool_bytes", "bytes of video held in the spool")
SPOOL_GOPS = Gauge("flowcloud_edge_spool_gops", "GOPs held in the spool and not yet sent")
SPOOL_FRAMES = Gauge("flowcloud_edge_spool_frames", "access units held in the spool and not yet sent")
SPOOL_OLDEST = Gauge(
    "flowcloud_edge_spool_oldest_capture_timestamp_seconds",
    "capture time of the oldest access unit in the spool (0: empty); time() minus it is the spool's age",
)
SPOOL_FRAMES_WRITTEN = Counter(
    "flowcloud_edge_spool_frames_written_total", "access units written to the spool"
)
SPOOL_CONGESTION_FRAMES = Counter(
    "flowcloud_edge_spool_congestion_frames_total",
    "access units spooled while connected, whole GOPs, because the link could not keep up (backfilled later)",
)
SPOOL_EVICTED_GOPS = Counter(
    "flowcloud_edge_spool_evicted_gops_total",
    "GOPs evicted from the spool unsent, by cap (max_bytes, max_age)",
    ["reason"],
)
SPOOL_TORN = Counter(
    "flowcloud_edge_spool_torn_tails_total", "segments found with a torn write at their tail (cut off)"
)
BACKFILL_FRAMES_SENT = Counter(
    "flowcloud_edge_backfill_frames_sent_total", "spooled access units sent to the gateway's backfill lane"
)
BACKFILL_BYTES_SENT = Counter(
    "flowcloud_edge_backfill_bytes_sent_total", "bytes sent on the backfill connection"
)
BACKFILL_LAG = Gauge(
    "flowcloud_edge_backfill_lag_seconds",
    "age (now minus capture time) of the last access unit the backfill sent; 0 when the spool is empty",
)
PATH_DELAY = Gauge(
    "flowcloud_edge_path_delay_seconds",
    "queuing delay on the path to the gateway, from its last delay report (the rise above the session's "
    "lowest)",
)
KEYFRAME_REQUESTS = Counter(
    "flowcloud_edge_keyframe_requests_total",
    "keyframe requests from the gateway, by outcome (honoured: the encoder was asked for an IDR; "
    "unsupported: a relayed stream cannot make one)",
    ["outcome"],
)
FALLBACK_MASKS = Counter(
    "flowcloud_edge_fallback_masks_total",
    "masks of the fallback model, by event (made, synced, failed, evicted)",
    ["event"],
)
FALLBACK_SECONDS = Histogram(
    "flowcloud_edge_fallback_seconds",
    "time of one fallback-model segmentation on the device",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
