"""Response and request bodies, so that the OpenAPI document describes every answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flowcloud import keys
from flowcloud.registry import DEFAULT_TENANT
from flowcloud.stages import STAGES


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, for a person")
    error: str | None = Field(None, description="a short machine-readable code (e.g. redis_unavailable)")


class LatencyBody(BaseModel):
    samples: int = Field(description="newest results summarised")
    p50: float | None = Field(None, description="capture-to-result latency, median, seconds")
    p95: float | None = Field(None, description="capture-to-result latency, 95th percentile, seconds")
    mean: float | None = None
    max: float | None = None
    result_fps: float | None = Field(None, description="results per second of capture time")


class StreamBody(BaseModel):
    stream_id: str
    device: str | None
    tenant: str | None
    status: str = Field(description="live (frames arriving) or idle")
    width: int | None = Field(None, description="resolution the edge sends")
    height: int | None = None
    fps: float | None = Field(None, description="frame rate the edge announced")
    started: float | None = Field(None, description="unix seconds the current or last session began")
    last_seen: float | None = Field(None, description="unix seconds of the last frame")
    last_seq: int | None = Field(None, description="seq of the last frame the gateway published")
    trimmed_unread: int = Field(
        0, description="frames the bounded frames stream trimmed before a worker read them (lost)"
    )
    results: int = Field(description="mask results kept")
    latest_result_seq: int | None = None
    latency: LatencyBody


class StreamList(BaseModel):
    items: list[StreamBody]


class MaskBody(BaseModel):
    stream: str
    seq: int
    capture_ts: float
    recv_ts: float
    infer_start: float
    infer_end: float
    persisted_ts: float
    model: str
    model_version: str
    label_set: str
    width: int
    height: int
    shares: dict[str, float] = Field(description="class id -> fraction of pixels (absent classes omitted)")
    latency: float = Field(description="capture to persisted, seconds")
    backfill: bool = Field(
        False, description="the frame was spooled by the edge during an outage and sent after it"
    )
    producer: str = Field("cloud", description="who made the mask: cloud (workers) or edge (fallback model)")
    sent_ts: float | None = Field(None, description="the edge sent it (absent from older edges)")
    decoded_ts: float | None = Field(None, description="the gateway had decoded it")
    published_ts: float | None = Field(None, description="the gateway wrote it to the frames stream")
    read_ts: float | None = Field(None, description="a worker read it")
    stages: dict[str, float | None] = Field(
        description="seconds in each stage, capture to persisted, in order: "
        + ", ".join(f"{s.name} ({s.what})" for s in STAGES)
        + "; they sum to latency (null: not stamped, its time is in the next stage)"
    )


class MaskPage(BaseModel):
    items: list[MaskBody] = Field(description="newest first")
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


class ClassBody(BaseModel):
    id: int
    name: str
    color: tuple[int, int, int]


class SharePoint(BaseModel):
    seq: int
    capture_ts: float
    latency: float
    shares: dict[str, float]
    stages: dict[str, float | None] = Field(description="seconds in each stage (as a mask's stages)")
    backfill: bool = Field(False, description="the frame was spooled during an outage and backfilled")


class StageBody(BaseModel):
    name: str
    what: str = Field(description="what the frame waits for or goes through in this stage")
    samples: int = Field(description="results in the window that measured this stage")
    p50: float | None = Field(None, description="seconds, median")
    p95: float | None = Field(None, description="seconds, 95th percentile")
    mean: float | None = Field(None, description="seconds, mean over the window (the means add up)")
    share: float | None = Field(None, description="mean / mean capture-to-persisted latency")


class StatsBody(BaseModel):
    stream: str
    label_set: str | None = Field(None, description="label set of the newest result in the window")
    classes: list[ClassBody] = Field(description="classes present in the window")
    mean: dict[str, float] = Field(description="class id -> mean share over the points")
    series: list[SharePoint] = Field(description="oldest first")
    stages: list[StageBody] = Field(
        description="where live frames' time goes, capture to persisted, in order (backfill left out)"
    )
    backfill_stages: list[StageBody] = Field(
        default_factory=list, description="the same for the window's backfilled frames (outage included)"
    )


class DeviceCreate(BaseModel):
    device_id: str = Field(description=keys.IDENTIFIER_RULE)
    tenant: str = Field(DEFAULT_TENANT, description="the tenant whose readers see the device's stream")


class DeviceBody(BaseModel):
    device_id: str
    tenant: str
    created: float
    rotated: float | None
    revoked: float | None
    active: bool


class DeviceWithToken(DeviceBody):
    token: str = Field(description="the device's token; shown only now")


class DeviceList(BaseModel):
    items: list[DeviceBody]


class HealthBody(BaseModel):
    status: str


class ReadyBody(BaseModel):
    status: str = Field(description="ready or not ready")
    redis: bool
    workers_ready: int = Field(description="workers whose recent heartbeat says ready")
    detail: str | None = None


class ClusterPod(BaseModel):
    name: str
    phase: str | None
    ready: bool
    node: str | None
    restarts: int
    started: str | None = Field(description="ISO 8601")
    gpus: int = Field(description="GPUs the pod requests")


class ClusterNode(BaseModel):
    name: str
    ready: bool
    gpu_model: str | None = Field(description="the node's nvidia.com/gpu.product label")
    gpus: int
    gpus_allocatable: int


class ClusterDeployment(BaseModel):
    name: str
    replicas: int | None
    ready_replicas: int


class ClusterAutoscaler(BaseModel):
    name: str
    managed_by: str | None = Field(description="keda-operator when KEDA manages this HPA")
    min_replicas: int | None
    max_replicas: int
    current_replicas: int | None
    desired_replicas: int


class ClusterBody(BaseModel):
    namespace: str
    deployment: ClusterDeployment | None
    autoscaler: ClusterAutoscaler | None
    pods: list[ClusterPod]
    nodes: list[ClusterNode]


class WorkerList(BaseModel):
    items: list[dict[str, str | float]] = Field(description="heartbeat fields, name, last_heartbeat")


class ClassAggregate(BaseModel):
    mean: float = Field(description="mean share over the bucket's results (0 where absent)")
    max: float = Field(description="largest share in the bucket")
    results_above: int = Field(description="results whose share is at or above the threshold")
    seconds_above: float = Field(description="time at or above the threshold (results x frame interval)")


class AggregateBucket(BaseModel):
    start: float = Field(description="unix seconds the minute or hour begins")
    results: int
    first: float | None = Field(None, description="capture time of the bucket's first result")
    last: float | None = Field(None, description="capture time of the bucket's last result")
    classes: dict[str, ClassAggregate] = Field(description="class name -> statistics (present classes)")


class AggregateBody(BaseModel):
    stream: str
    since: float
    until: float
    resolution: str
    threshold: float
    buckets: list[AggregateBucket] = Field(description="oldest first; buckets without results are left out")


class AlertRuleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(None, description="the rule's tenant (default: the key's)")
    stream: str | None = Field(None, description="one stream, or every stream of the tenant when absent")
    class_name: str = Field(description="a class name of the label set, e.g. person")
    op: Literal["above", "below"] = Field(description="fire when the share is above or below the threshold")
    threshold: float = Field(ge=0.0, le=1.0, description="share of the pixels")
    hold_frames: int = Field(1, ge=1, le=100_000, description="consecutive results the condition must hold")
    hold_seconds: float = Field(0.0, ge=0, le=86_400, description="capture time the condition must hold")
    cooldown: float = Field(60.0, ge=0, le=86_400 * 7, description="seconds after a firing before the next")
    webhook_url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://", description="POST each firing here (http or https)"
    )


class AlertRuleBody(BaseModel):
    id: str
    tenant: str
    stream: str | None
    class_name: str
    op: str
    threshold: float
    hold_frames: int
    hold_seconds: float
    cooldown: float
    webhook_url: str | None
    created: float


class AlertRuleWithSecret(AlertRuleBody):
    webhook_secret: str = Field(description="HMAC-SHA256 key of the webhook signature; shown only this once")


class AlertRuleList(BaseModel):
    items: list[AlertRuleBody]


class FiringBody(BaseModel):
    id: str
    rule: str
    tenant: str
    stream: str
    seq: int
    class_name: str
    share: float = Field(description="the class's share in the result that fired")
    op: str
    threshold: float
    capture_ts: float = Field(description="capture time of the result that fired")
    run_start: float = Field(description="capture time the condition began to hold")
    run_frames: int = Field(description="results the condition had held for")
    webhook_url: str | None = None
    status: str = Field(description="pending, delivered, dead (every webhook try failed) or recorded")
    attempts: int = Field(0, description="webhook tries so far")
    last_error: str | None = None
    delivered_ts: float | None = None


class FiringList(BaseModel):
    items: list[FiringBody] = Field(description="newest first")
