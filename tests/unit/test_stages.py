"""Per-stage times (flowcloud.stages): the stamps a frame collects, the stages between them, and
how they travel on the frame entry and the result."""

from __future__ import annotations

import itertools
import json

import pytest

from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.labels import LABEL_IDS
from flowcloud.results import META_FIELD, MaskResult
from flowcloud.stages import STAGE_NAMES, STAGES, STAMPS, durations, stamps_of

T = 1_764_000_000.0
# capture, sent, recv, decoded, published, read, infer_start, infer_end, persisted
TIMES = (T, T + 0.010, T + 0.050, T + 0.058, T + 0.060, T + 0.100, T + 0.105, T + 0.185, T + 0.190)


def result(**changes: float | None) -> MaskResult:
    stamps: dict[str, float | None] = {**dict(zip(STAMPS, TIMES, strict=True)), **changes}
    return MaskResult(
        stream="cam-1",
        seq=7,
        model="m",
        model_version="v1",
        label_set=LABEL_IDS.name,
        width=4,
        height=2,
        **stamps,  # type: ignore[arg-type]
    )


def test_the_stages_chain_the_stamps_in_order() -> None:
    assert [s.start for s in STAGES] == list(STAMPS[:-1])
    assert [s.end for s in STAGES] == list(STAMPS[1:])
    assert len(set(STAGE_NAMES)) == len(STAGES)


def test_stages_are_the_differences_and_sum_to_the_latency() -> None:
    r = result()
    stages = r.stages()
    assert list(stages) == list(STAGE_NAMES)
    expected = [b - a for a, b in itertools.pairwise(TIMES)]
    assert list(stages.values()) == pytest.approx(expected, abs=1e-6)
    assert stages["network"] == pytest.approx(0.040, abs=1e-6) and stages["inference"] == pytest.approx(
        0.080, abs=1e-6
    )
    assert sum(v for v in stages.values() if v is not None) == pytest.approx(r.latency, abs=1e-6)


def test_a_missing_stamp_folds_its_time_into_the_next_stage() -> None:
    """An older edge sends no send time: edge and network become one 'network' of 50 ms, and the
    sum is still the latency; a result of an older worker has no read time, likewise."""
    stages = result(sent_ts=None, read_ts=None).stages()
    assert stages["edge"] is None and stages["network"] == pytest.approx(0.050, abs=1e-6)
    assert stages["queue"] is None and stages["batch"] == pytest.approx(0.045, abs=1e-6)
    assert sum(v for v in stages.values() if v is not None) == pytest.approx(0.190, abs=1e-6)
    assert durations({}) == dict.fromkeys(STAGE_NAMES)


def test_the_stamps_travel_on_the_frame_entry() -> None:
    frame = Frame("cam-1", 3, T, T + 0.05, 8, 8, "raw", bytes(192), sent_ts=T + 0.01, decoded_ts=T + 0.058)
    fields = {
        k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in frame.to_fields().items()
    }
    assert keys.F_PUBLISHED_TS.encode() not in fields  # not stamped yet: not written
    assert Frame.from_fields(fields) == frame
    published = Frame.from_fields({**fields, keys.F_PUBLISHED_TS.encode(): repr(T + 0.06).encode()})
    assert stamps_of(published)["published_ts"] == T + 0.06
    old = {k: v for k, v in fields.items() if k not in (keys.F_SENT_TS.encode(), keys.F_DECODED_TS.encode())}
    assert (Frame.from_fields(old).sent_ts, Frame.from_fields(old).decoded_ts) == (None, None)


def test_results_of_older_workers_still_read() -> None:
    """A result written before the stage stamps existed reads with them as None."""
    r = result()
    meta = r.metadata()
    for name in ("sent_ts", "decoded_ts", "published_ts", "read_ts"):
        del meta[name]
    del meta["latency"], meta["stages"]
    meta["shares"] = {}
    old = MaskResult.from_fields({META_FIELD.encode(): json.dumps(meta).encode()})
    assert old.read_ts is None and old.stages()["queue"] is None
    assert old.latency == pytest.approx(r.latency, abs=1e-6)
