"""Settings: one pydantic-settings model per service, all read from ``FLOWCLOUD_*`` env vars.

``FLOWCLOUD_REDIS_URL`` (the data plane: frames, results) and ``FLOWCLOUD_CONTROL_REDIS_URL``
(the control plane: devices, API keys; default: the data-plane Redis) are shared by every service;
everything else carries the service's own prefix (``FLOWCLOUD_GATEWAY_``, ``FLOWCLOUD_WORKER_``,
``FLOWCLOUD_API_``, ``FLOWCLOUD_EDGE_``).
Secrets are ``SecretStr`` (never printed) and have no default. ``describe()`` renders settings
for logs with secrets and URL passwords masked.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Self
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowcloud.keys import FIRINGS_STREAM_MAXLEN, MAX_SHARDS
from flowcloud.share_index import RESULTS_STREAM_MAXLEN
from flowcloud.sizes import SizeText

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# The choices of the worker's settings; the code that acts on them takes its lists from these.
Precision = Literal["fp32", "bf16", "fp16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
FrameMode = Literal["realtime", "complete"]
FrameEncoding = Literal["jpeg", "raw"]  # how the gateway stores decoded frames on the stream


def redact_url(url: str) -> str:
    """A URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def with_redis_auth(url: str, password: str | None, ca_file: str | None) -> str:
    """``url`` with ``password`` (percent-encoded) when it carries none, and ``ca_file`` as its
    ``ssl_ca_certs`` (which redis-py's from_url hands to the TLS context) when it names no CA."""
    parts = urlsplit(url)
    if password and parts.password is None:
        user = quote(parts.username, safe="") if parts.username else ""
        netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        parts = parts._replace(netloc=netloc)
    if ca_file:
        if parts.scheme != "rediss":
            raise ValueError(f"a Redis CA file ({ca_file}) needs a rediss:// URL, not {parts.scheme}://")
        if "ssl_ca_certs" not in parse_qs(parts.query):
            query = f"{parts.query}&" if parts.query else ""
            parts = parts._replace(query=query + urlencode({"ssl_ca_certs": ca_file}))
    return urlunsplit(parts)


CONTROL_PLANE_APART = (
    "FLOWCLOUD_REDIS_CLUSTER needs FLOWCLOUD_CONTROL_REDIS_URL: the control plane (devices, API keys, "
    "alert rules) lives on one plain Redis, not on the cluster"
)


class ServiceSettings(BaseSettings):
    """Fields every service has."""

    # The service reads devices, API keys or alert rules, and needs the control plane at start.
    reads_control_plane: ClassVar[bool] = False

    model_config = SettingsConfigDict(extra="forbid", populate_by_name=True)

    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        validation_alias=AliasChoices("FLOWCLOUD_REDIS_URL", "redis_url"),
        description="Redis URL (redis:// or rediss://); a password in it is never logged",
        repr=False,  # may hold a password; describe() shows it redacted
    )
    control_redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("FLOWCLOUD_CONTROL_REDIS_URL", "control_redis_url"),
        description="Redis URL of the control plane (devices, API keys): a store with its own durability, "
        "apart from the frames; default: redis_url (one machine, one persistent Redis)",
        repr=False,
    )
    redis_cluster: bool = Field(
        False,
        validation_alias=AliasChoices("FLOWCLOUD_REDIS_CLUSTER", "redis_cluster"),
        description="redis_url names a node of a Redis Cluster (the client discovers the rest)",
    )
    frame_shards: int = Field(
        1,
        ge=1,
        le=MAX_SHARDS,
        validation_alias=AliasChoices("FLOWCLOUD_FRAME_SHARDS", "frame_shards"),
        description="frame queues the streams are spread over (the same in every gateway and worker)",
    )
    redis_password: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("FLOWCLOUD_REDIS_PASSWORD", "redis_password"),
        description="password of the data-plane Redis when redis_url carries none (e.g. a managed "
        "Redis's token from its own Secret, with no URL escaping)",
    )
    redis_ca_file: str | None = Field(
        None,
        validation_alias=AliasChoices("FLOWCLOUD_REDIS_CA_FILE", "redis_ca_file"),
        description="PEM CA bundle that signs the data-plane Redis's certificates (rediss:// only; "
        "default: the system's trust store)",
    )
    log_level: str = Field(
        "INFO", validation_alias=AliasChoices("FLOWCLOUD_LOG_LEVEL", "log_level"), description="logging level"
    )

    @model_validator(mode="after")
    def _redis_auth_into_url(self) -> Self:
        # Folded into the URL once, so that every client made from redis_url (one node or a cluster) has them.
        password = self.redis_password.get_secret_value() if self.redis_password else None
        self.redis_url = with_redis_auth(self.redis_url, password, self.redis_ca_file)
        return self

    @model_validator(mode="after")
    def _control_plane_apart(self) -> Self:
        # The control plane (devices, API keys, alert rules, device events) is one plain Redis:
        # its writes are transactions over a record and its index, and gateways subscribe there.
        if self.reads_control_plane:
            self.control_url  # noqa: B018  # raises without one
        return self

    @property
    def control_url(self) -> str:
        """Where devices and API keys live: control_redis_url, else the data-plane redis_url (a
        plain Redis: with a Redis Cluster, control_redis_url is required; ValueError without)."""
        if self.redis_cluster and not self.control_redis_url:
            raise ValueError(CONTROL_PLANE_APART)
        return self.control_redis_url or self.redis_url

    def describe(self) -> dict[str, Any]:
        """The settings as a dict fit for a log line: secrets and URL passwords masked."""
        out: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                out[name] = "***" if value.get_secret_value() else ""
            elif name.endswith("_url") and isinstance(value, str):  # control_redis_url too
                out[name] = redact_url(value)
            else:
                out[name] = value
        return out


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCLOUD_GATEWAY_")  # the rest from ServiceSettings
    reads_control_plane: ClassVar[bool] = True

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(7000, ge=0, le=65535, description="TCP port for edge devices (0 = any free port)")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus metrics port (0 = off)")
    model_size: SizeText = Field("256x512", description="HxW that decoded frames are resized to")
    frame_encoding: FrameEncoding = Field(
        "jpeg", description="how frames are stored on the stream: jpeg or raw"
    )
    jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality of frames on the stream")
    frames_maxlen: int = Field(
        2000,
        ge=10,
        description="frame references each shard queue keeps; unread ones beyond are trimmed and counted",
    )
    backfill_maxlen: int = Field(
        10_000,
        ge=10,
        description="spooled frames each stream's backfill log, and references each shard's backfill "
        "lane, keep; unread ones beyond are trimmed, counted",
    )
    results_tenant_max_bytes: int = Field(
        0,
        ge=0,
        description="bytes of results each tenant may keep, edge-made masks included: set it as the "
        "workers' (0: no budget)",
    )
    handshake_timeout: float = Field(5.0, gt=0, description="seconds a client has to complete the handshake")
    max_sessions: int = Field(256, ge=1, description="live sessions at most")
    max_connections_per_ip: int = Field(16, ge=1, description="concurrent connections per client address")
    max_bytes_per_second: int = Field(8_000_000, ge=1, description="per-device ingress byte rate limit")
    max_frames_per_second: float = Field(60.0, gt=0, description="per-device frame rate limit")
    max_width: int = Field(3840, ge=16, description="largest frame width accepted before decoding")
    max_height: int = Field(2160, ge=16, description="largest frame height accepted before decoding")
    record_dir: str | None = Field(None, description="save each session's raw RFC 4571 bytes here")
    max_nal_size: int = Field(2_000_000, ge=1024, description="largest NAL unit accepted, in bytes")
    max_access_unit_size: int = Field(
        4_000_000, ge=1024, description="largest access unit accepted, in bytes"
    )
    max_malformed: int = Field(100, ge=1, description="consecutive malformed packets that end a session")
    decoder_backlog: int = Field(60, ge=1, description="access units in flight per decoder before dropping")
    decoder_spares: int = Field(1, ge=0, le=16, description="started decoder processes kept ready")
    decoder_stall_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a decoder with work may stay silent before it is killed and restarted",
    )
    decoder_memory_mb: int = Field(
        1024, ge=0, description="address-space cap of each decoder process (0 = none)"
    )
    publish_queue: int = Field(1024, ge=16, description="decoded frames buffered for Redis at most")
    stream_frames_maxlen: int = Field(
        300,
        ge=10,
        description="approximate MAXLEN of each stream's frame log (10 s at 30 fps): the one copy of its "
        "frames' bytes, what workers fetch and overlays draw on; a frame evicted before a worker "
        "fetched it is counted",
    )
    stream_frames_ttl: int = Field(
        3600,
        ge=0,
        description="seconds a stream's frame log (and backfill log) outlives its last frame (0 = forever)",
    )
    drain_timeout: float = Field(
        5.0, gt=0, description="seconds to finish decoding and publishing on SIGTERM"
    )
    tls_cert_file: str | None = Field(
        None, description="PEM certificate chain (leaf first); set, the device port speaks TLS only"
    )
    tls_key_file: str | None = Field(
        None, description="PEM private key of tls_cert_file (default: in that file)"
    )
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA bundle; set, edges need a certificate from it naming their device (mTLS)"
    )
    tls_reload_interval: float = Field(
        30.0,
        ge=0,
        description="seconds between checks of the TLS files for a renewed certificate (0 = never)",
    )
    lease_ttl: float = Field(
        3.0, gt=0, le=60, description="seconds a live session's lease lasts unrenewed (gateway/lease.py)"
    )
    lease_renew_interval: float = Field(
        0.5,
        gt=0,
        le=30,
        description="seconds between lease renewals; also how late a session may learn of a takeover "
        "whose device event it missed",
    )

    @model_validator(mode="after")
    def _renew_within_ttl(self) -> Self:
        if self.lease_renew_interval >= self.lease_ttl:
            raise ValueError(
                f"lease_renew_interval ({self.lease_renew_interval:g} s) must be shorter than "
                f"lease_ttl ({self.lease_ttl:g} s)"
            )
        return self


class WorkerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCLOUD_WORKER_")  # the rest from ServiceSettings
    name: str | None = Field(None, description="consumer name (default: hostname-pid)")
    model: str | None = Field(None, description="zoo model name (default: what the weights say)")
    weights: str | None = Field(None, description="weights file (default: the bundled demo model)")
    device: str = Field("cpu", description="cpu or cuda")
    precision: Precision = Field("fp32", description="fp32, bf16 or fp16")
    batch_size: int = Field(8, ge=1, le=256, description="frames per batch at most")
    batch_timeout_ms: int = Field(
        5,
        ge=1,
        description="how long the oldest queued frame waits for a fuller batch while the model is free",
    )
    mode: FrameMode = Field("realtime", description="realtime (drop stale frames) or complete (process all)")
    max_frame_age: float = Field(
        2.0,
        gt=0,
        description="realtime mode: a frame's result is persisted within this many seconds of its "
        "capture, or the frame is dropped",
    )
    max_queued_frames: int = Field(
        512,
        ge=1,
        le=100_000,
        description="realtime: frames read and waiting for a batch at most (the oldest of the longest "
        "stream's queue are dropped beyond)",
    )
    claim_idle_ms: int = Field(30_000, ge=100, description="reclaim pending frames idle this long")
    max_attempts: int = Field(3, ge=1, description="failures before a frame is dead-lettered")
    drain_timeout: float = Field(20.0, gt=0, description="seconds to finish the batch in flight on SIGTERM")
    results_max_per_stream: int = Field(10_000, ge=1, description="results kept per stream")
    results_ttl: int = Field(86_400, ge=60, description="seconds a result is kept")
    results_tenant_max_bytes: int = Field(
        0, ge=0, description="bytes of results each tenant may keep; the oldest go first (0: no budget)"
    )
    results_events_maxlen: int = Field(
        RESULTS_STREAM_MAXLEN,
        ge=1,
        description="result events kept per results shard for the alert evaluators; beyond, the oldest "
        "unread ones are trimmed and counted",
    )
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus metrics port (0 = off)")
    compile: bool = Field(False, description="torch.compile the model (GPU)")
    compile_mode: CompileMode = Field(
        "reduce-overhead",
        description="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune",
    )
    random_weights: bool = Field(False, description="random weights instead of a file (benchmarks and tests)")
    label_set: str | None = Field(None, description="label set (default: what the weights say)")
    input_size: SizeText | None = Field(
        None, description="HxW the model sees (default: each frame's own size)"
    )
    warmup_size: SizeText = Field(
        "256x512", description="HxW of the warm-up batch run before reporting ready"
    )
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: all cores)")
    decode_threads: int = Field(4, ge=1, le=64, description="threads decoding frames and encoding label maps")
    channels_last: bool = Field(True, description="run the model in channels_last memory format")
    dead_letter_maxlen: int = Field(10_000, ge=10, description="approximate MAXLEN of the dead-letter stream")
    heartbeat_interval: float = Field(2.0, gt=0, le=60, description="seconds between heartbeats")
    poll_ms: int = Field(
        500, ge=10, le=10_000, description="longest blocking read, so SIGTERM is seen quickly"
    )

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> Self:
        if self.weights and self.random_weights:
            raise ValueError("weights and random_weights exclude each other")
        return self


class ApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCLOUD_API_")  # the rest from ServiceSettings
    reads_control_plane: ClassVar[bool] = True

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    admin_key: SecretStr | None = Field(None, description="bootstrap admin API key (secret; no default)")
    metrics_public: bool = Field(False, description="serve /metrics without an API key (for plain scrapers)")
    auth_cache_seconds: float = Field(
        2.0, ge=0, le=60, description="how long a verified API key is trusted before Redis is asked again"
    )
    live_window: float = Field(10.0, gt=0, description="a stream seen within this many seconds is live")
    live_max_clients: int = Field(32, ge=1, description="concurrent /live viewers at most")
    live_max_fps: float = Field(
        10.0, gt=0, le=60, description="most overlay frames per second sent to a viewer"
    )
    live_max_seconds: float = Field(3600.0, gt=0, description="a /live response ends after this long")
    live_key_check_seconds: float = Field(
        0.5, gt=0, le=1.0, description="a /live response asks whether its key was revoked this often"
    )
    require_worker: bool = Field(False, description="/readyz fails while no worker is ready")
    worker_stale_seconds: float = Field(30.0, gt=0, description="a worker silent this long is not counted")
    redis_timeout: float = Field(2.0, gt=0, description="seconds to wait on Redis before answering 503")
    tenant_cache_seconds: float = Field(
        2.0, ge=0, le=60, description="how long a stream's tenant is trusted before Redis is asked again"
    )
    latest_cache_ms: float = Field(
        50.0, ge=0, le=5000, description="/masks/latest answers from a copy at most this old (0: always read)"
    )
    cluster_view: bool = Field(
        False, description="serve /cluster (admins): the workers' pods, nodes and autoscaler from Kubernetes"
    )
    cluster_api_url: str | None = Field(
        None, description="Kubernetes API URL needing no credentials (kubectl proxy); default: in-cluster"
    )
    cluster_namespace: str | None = Field(
        None, description="namespace of the workers (default: the pod's own)"
    )
    cluster_worker_selector: str = Field(
        "app.kubernetes.io/component=worker", description="label selector of the worker pods"
    )
    cluster_worker_deployment: str | None = Field(
        None, description="the workers' Deployment (its replicas and the autoscaler that scales it)"
    )
    cluster_gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of a GPU")


class AlertsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCLOUD_ALERTS_")  # the rest from ServiceSettings
    reads_control_plane: ClassVar[bool] = True

    name: str | None = Field(None, description="consumer name (default: hostname-pid)")
    batch_size: int = Field(256, ge=1, le=10_000, description="results evaluated per read at most")
    poll_ms: int = Field(
        500, ge=10, le=10_000, description="longest blocking read, so SIGTERM is seen quickly"
    )
    claim_idle_ms: int = Field(
        30_000,
        ge=100,
        description="take over results and deliveries another evaluator left pending this long",
    )
    rules_cache_seconds: float = Field(
        1.0,
        ge=0,
        le=60,
        description="how long rules and stream tenants are trusted before Redis is asked again",
    )
    webhook_timeout: float = Field(5.0, gt=0, le=60, description="seconds a webhook has to answer")
    webhook_attempts: int = Field(6, ge=1, le=100, description="tries before a firing is dead-lettered")
    webhook_backoff: float = Field(
        0.5, gt=0, le=60, description="seconds before the first retry (then doubled)"
    )
    webhook_backoff_max: float = Field(60.0, gt=0, le=3600, description="longest wait between two tries")
    deliveries_in_flight: int = Field(16, ge=1, le=1024, description="webhook deliveries at once at most")
    dead_letter_maxlen: int = Field(10_000, ge=10, description="approximate MAXLEN of the dead-letter stream")
    firings_maxlen: int = Field(
        FIRINGS_STREAM_MAXLEN,
        ge=1,
        description="firings kept queued for the webhook deliverers; beyond, the oldest unread ones are "
        "trimmed, counted and marked dead",
    )
    metrics_port: int = Field(9104, ge=0, le=65535, description="Prometheus metrics port (0 = off)")


class EdgeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCLOUD_EDGE_")  # the rest from ServiceSettings

    gateway: str | None = Field(None, description="HOST:PORT of the ingest gateway")
    device_id: str | None = Field(None, description="this device's registered id")
    token: SecretStr | None = Field(None, description="this device's token (secret; no default)")
    source: str = Field("synthetic", description="camera:/dev/videoN, a file, synthetic, rtsp://, rfc4571://")
    bitrate: int = Field(2_000_000, ge=10_000, description="H.264 target bitrate in bits/s")
    keyframe_interval: int = Field(30, ge=1, description="frames between IDR frames")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus metrics port (0 = off)")
    encoder: str = Field(
        "auto", description="auto (nvv4l2h264enc when present, else libx264), libx264, x264enc"
    )
    mtu: int = Field(1200, ge=64, le=65535, description="largest RTP packet in bytes")
    width: int = Field(640, ge=16, le=8192, description="picture width for cameras and synthetic video")
    height: int = Field(480, ge=16, le=8192, description="picture height for cameras and synthetic video")
    fps: float = Field(30.0, gt=0, le=240, description="frame rate for cameras and synthetic video")
    queue_size: int = Field(60, ge=1, description="encoded frames held while the network is behind")
    reconnect_max_delay: float = Field(30.0, gt=0, description="longest wait between reconnect attempts (s)")
    spool_dir: str | None = Field(
        None, description="spool video here while the gateway is away, and backfill it after (unset: drop)"
    )
    spool_max_bytes: int = Field(1 << 30, ge=1 << 20, description="spool cap in bytes (oldest GOPs evicted)")
    spool_max_age: float = Field(3600.0, gt=0, description="spool cap in seconds of age (older GOPs evicted)")
    spool_segment_seconds: float = Field(10.0, ge=0, description="seconds of video per spool segment file")
    spool_backlog: float = Field(
        0.5,
        gt=0,
        description="seconds live video may be late while connected (queued on the edge, or on the path as "
        "the gateway's delay reports show) before whole GOPs go to the spool instead (the link is slower "
        "than the encoder)",
    )
    backfill_bitrate: int = Field(
        2_000_000, ge=10_000, description="the backfill's share of the link in bits/s (live always first)"
    )
    backfill_speed: float = Field(2.0, gt=0, le=100, description="backfill frames/s at most, times the fps")
    fallback_model: str | None = Field(
        None, description="ONNX model run on the device while the cloud is away ('': the bundled demo model)"
    )
    fallback_after: float = Field(
        10.0, ge=0, description="seconds without the cloud before the fallback runs"
    )
    fallback_fps: float = Field(1.0, gt=0, le=60, description="fallback masks per second at most")
    tls: bool = Field(False, description="TLS to the gateway, verified against the system trust store")
    tls_ca_file: str | None = Field(
        None, description="PEM CA bundle to verify the gateway with (implies TLS)"
    )
    tls_cert_file: str | None = Field(None, description="PEM client certificate for mutual TLS (implies TLS)")
    tls_key_file: str | None = Field(
        None, description="PEM private key of tls_cert_file (default: in that file)"
    )
    tls_server_name: str | None = Field(
        None, description="name to verify the gateway's certificate against (and SNI); default: its host"
    )

    @property
    def tls_enabled(self) -> bool:
        """Any TLS setting turns TLS on."""
        return bool(
            self.tls or self.tls_ca_file or self.tls_cert_file or self.tls_key_file or self.tls_server_name
        )
