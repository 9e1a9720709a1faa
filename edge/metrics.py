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
CLOCK_OFFSET = Gauge(
    "flowcloud_edge_clock_offset_seconds", "gateway clock minus edge clock, at the last handshake"
)
RTT = Gauge("flowcloud_edge_rtt_seconds", "round-trip time measured in the last handshake")
ENCODE_SECONDS = Histogram(
    "flowcloud_edge_encode_seconds",
    "time to encode one picture",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
)
