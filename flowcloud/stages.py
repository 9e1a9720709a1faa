"""Where a frame's time goes: the stamps it collects on its way, and the stages between them.

A frame is stamped at every hand-over, each stamp on Redis's clock (`flowcloud.clock`; the edge's
two stamps are mapped to it through the handshake offset), in unix seconds:

    capture_ts    the edge captured the picture
    sent_ts       the edge handed the access unit to its socket
    recv_ts       the gateway had the whole access unit
    decoded_ts    the gateway's decoder gave the picture back (decoded, resized, JPEG-encoded)
    published_ts  the gateway wrote the frame to the frames stream
    read_ts       a worker read the batch holding it
    infer_start   the model started on its batch
    infer_end     the model finished
    persisted_ts  the result was written

A stage is the time between two consecutive stamps. The gateway measures the first four stages
and the worker the last four; both export them as a histogram with a ``stage`` label, the result
carries all the stamps, and the API and dashboard show the stages (stacked, they sum to the
capture-to-persisted latency).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import Histogram

STAMPS: tuple[str, ...] = (
    "capture_ts",
    "sent_ts",
    "recv_ts",
    "decoded_ts",
    "published_ts",
    "read_ts",
    "infer_start",
    "infer_end",
    "persisted_ts",
)
# Seconds: from a millisecond on loopback to the far link's third of a second and beyond.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class Stage:
    name: str
    start: str  # the stamp it starts at
    end: str  # the stamp it ends at
    what: str


STAGES: tuple[Stage, ...] = (
    Stage("edge", "capture_ts", "sent_ts", "encode and queue on the edge"),
    Stage(
        "network",
        "sent_ts",
        "recv_ts",
        "edge to gateway: the link, up to the gateway's read of the access unit",
    ),
    Stage("decode", "recv_ts", "decoded_ts", "decode, resize and JPEG-encode at the gateway"),
    Stage("publish", "decoded_ts", "published_ts", "the gateway's publish queue and write"),
    Stage("queue", "published_ts", "read_ts", "waiting on the frames stream for a worker"),
    Stage("batch", "read_ts", "infer_start", "JPEG decode, batching, waiting for the model"),
    Stage("inference", "infer_start", "infer_end", "the model on the frame's batch"),
    Stage("persist", "infer_end", "persisted_ts", "label-map PNG, class shares, result write"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
GATEWAY_STAGES = STAGES[:4]  # capture (edge) to published
WORKER_STAGES = STAGES[4:]  # published to persisted


def stamps_of(item: object) -> dict[str, float | None]:
    """The stamps an object carries under their names (a `Frame`, a `MaskResult`), None if absent."""
    return {name: getattr(item, name, None) for name in STAMPS}


def durations(
    stamps: Mapping[str, float | None], stages: tuple[Stage, ...] = STAGES
) -> dict[str, float | None]:
    """Each stage's seconds, by name.

    A missing stamp (an older edge sends no send time) folds its two stages into the later one,
    so the stages still sum to the time between the first and the last stamp; the earlier stage
    is then None.
    """
    out: dict[str, float | None] = {}
    start: float | None = None
    for stage in stages:
        if start is None:
            start = stamps.get(stage.start)
        end = stamps.get(stage.end)
        if start is None or end is None:
            out[stage.name] = None
            continue
        out[stage.name] = end - start
        start = end
    return out


def observe(histogram: Histogram, stamps: Mapping[str, float | None], stages: tuple[Stage, ...]) -> None:
    """Record the known stages of one frame (a negative time, from clock error, counts as 0)."""
    for name, seconds in durations(stamps, stages).items():
        if seconds is not None:
            histogram.labels(name).observe(max(seconds, 0.0))
