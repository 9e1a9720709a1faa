"""Prometheus metrics of the ingest gateway (served by flowcloud.observability)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from flowcloud import stages
from flowcloud.protocol import h264

# Reasons a frame is dropped (label values of FRAMES_DROPPED). The depacketizer's own reasons
# (flowcloud.protocol.h264.DROP_*: loss, await_idr, malformed, incomplete, nal_too_large,
# access_unit_too_large, ssrc_change) are counted under their own names; these are the gateway's.
DROP_AWAIT_IDR = h264.DROP_AWAIT_IDR  # also after a decoder error or restart, until the next IDR
DROP_RATE_LIMIT = "rate_limit"  # above the device's frames/s
DROP_DECODER_BACKLOG = "decoder_backlog"  # the session's decoder is too far behind
DROP_DECODE_ERROR = "decode_error"  # the decoder refused the access unit
DROP_DIMENSIONS = "dimensions"  # SPS (before decoding) or decoded picture above the frame-size cap
DROP_DECODER_CRASH = "decoder_crash"  # in flight when the decoder process died
DROP_SESSION_CLOSED = "session_closed"  # still decoding when the session ended
DROP_PUBLISH_BACKLOG = "publish_backlog"  # the publish queue is full (Redis slow or down)
DROP_REDIS_UNAVAILABLE = "redis_unavailable"  # a publish to Redis failed
DROP_TRIMMED_UNREAD = "trimmed_unread"  # trimmed by its shard queue's bound before a worker read it
DROP_FENCED = "fenced"  # sent by a session that lost the stream's lease (an older generation)
DROP_BACKFILL_DUPLICATE = "backfill_duplicate"  # a spooled frame an edge sent again (published already)
DROP_GOAWAY_UNREAD = "goaway_unread"  # sent after a going-away session stopped reading (TLS: 1 s of silence)

SESSIONS = Gauge("flowcloud_gateway_sessions", "live (authenticated) sessions")
CONNECTIONS = Counter(
    "flowcloud_gateway_connections_total", "connections by outcome (accepted or a REJECT code)", ["outcome"]
)
SESSION_ENDS = Counter("flowcloud_gateway_session_ends_total", "sessions ended, by reason", ["reason"])
BYTES = Counter("flowcloud_gateway_bytes_total", "RTP bytes received from authenticated devices")
PACKETS = Counter("flowcloud_gateway_packets_total", "RTP packets received from authenticated devices")
PACKETS_REJECTED = Counter(
    "flowcloud_gateway_packets_rejected_total",
    "packets refused by the RTP/H.264 parser, by reason",
    ["reason"],
)
FRAMES_DECODED = Counter("flowcloud_gateway_frames_decoded_total", "frames decoded")
FRAMES_PUBLISHED = Counter(
    "flowcloud_gateway_frames_published_total", "frames written to their frame logs (and queued for workers)"
)
FRAMES_DROPPED = Counter("flowcloud_gateway_frames_dropped_total", "frames dropped, by reason", ["reason"])
THROTTLED_SECONDS = Counter(
    "flowcloud_gateway_throttled_seconds_total", "seconds sessions were paused by the bytes/s limit"
)
DECODER_RESTARTS = Counter(
    "flowcloud_gateway_decoder_restarts_total", "decoder processes restarted after a crash"
)
DECODE_SECONDS = Histogram(
    "flowcloud_gateway_decode_seconds",
    "decode + resize + encode time of one frame in a decoder process",
    buckets=(0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0),
)
PUBLISH_SECONDS = Histogram(
    "flowcloud_gateway_publish_seconds",
    "time of one pipelined publish to Redis (a batch of frames)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
)
PUBLISH_QUEUE = Gauge("flowcloud_gateway_publish_queue", "decoded frames waiting to be published")
REDIS_UP = Gauge("flowcloud_gateway_redis_up", "1 while the last Redis operation succeeded")
CLOCK_OFFSET = Gauge(
    "flowcloud_gateway_clock_offset_seconds",
    "Redis's clock minus this machine's (published times are on Redis's)",
)
TLS_RELOADS = Counter(
    "flowcloud_gateway_tls_reloads_total",
    "reloads of the device port's TLS certificate after its files changed, by outcome (ok or failed)",
    ["outcome"],
)
TLS_CERTIFICATE_EXPIRY = Gauge(
    "flowcloud_gateway_tls_certificate_expiry_timestamp_seconds",
    "notAfter of the TLS certificate served on the device port, as a unix time",
)

# Capture (edge) to published: edge, network, decode, publish (flowcloud.stages.GATEWAY_STAGES).
STAGE_SECONDS = Histogram(
    "flowcloud_gateway_stage_seconds",
    "Seconds a frame spent in each stage this service measures (flowcloud.stages), on Redis's clock",
    ["stage"],
    buckets=stages.BUCKETS,
)


def drop(reason: str, count: int = 1) -> None:
    FRAMES_DROPPED.labels(reason).inc(count)


KEYFRAME_REQUESTS = Counter(
    "flowcloud_gateway_keyframe_requests_total",
    "keyframe requests to edges, by reason (drop, decoder_restart, session_start) and outcome "
    "(sent, rate_limited)",
    ["reason", "outcome"],
)
KEYFRAME_ANSWER_SECONDS = Histogram(
    "flowcloud_gateway_keyframe_answer_seconds",
    "from a keyframe request to the next IDR received on that session",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
DELAY_REPORTS = Counter(
    "flowcloud_gateway_delay_reports_total", "delay reports sent to live edges that asked for them"
)
REPORTED_DELAY = Histogram(
    "flowcloud_gateway_reported_delay_seconds",
    "one-way delay (receipt minus the edge's send time) of the access units reported to edges",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
BACKFILL_FRAMES = Counter(
    "flowcloud_gateway_backfill_frames_total", "frames of backfill lanes (spooled video) decoded"
)
BACKFILL_UNRESERVED = Counter(
    "flowcloud_gateway_backfill_unreserved_total",
    "backfill frames beyond the seqs their live session reserved (they sort after it in the timeline)",
)
EDGE_MASKS = Counter(
    "flowcloud_gateway_edge_masks_total",
    "masks made by edges' fallback models and synced, by outcome (stored, malformed, redis_unavailable)",
    ["outcome"],
)
LEASE_TAKEOVERS = Counter(
    "flowcloud_gateway_lease_takeovers_total",
    "live-session leases acquired while another session of the device still held one (gateway/lease.py)",
)
LEASE_LOST = Counter(
    "flowcloud_gateway_lease_lost_total",
    "sessions closed because a newer session of their device took the lease over, by how this gateway "
    "learned of it (event: the device event; renewal: the lease renewal found a newer generation)",
    ["noticed"],
)
GOAWAYS = Counter(
    "flowcloud_gateway_goaways_total",
    "GOAWAY messages sent to edges (the gateway is stopping: reconnect elsewhere)",
)
