"""The class-share indexes of mask results: what MaskStore writes beside each result, and the
layout the query API and alert evaluators read.

A result is indexed once, when it is first written (one Lua script per result on its stream's
keys, so the result, its index entries and its minute aggregate appear together or not at all;
writing the same frame again changes nothing):

- **Share ladder.** For every class present, the result joins one sorted set per level of
  ``LEVELS`` that its share reaches (``keys.class_index``; member ``"<seq>:<share>"``, score the
  capture time). A query for ``share >= m`` reads the highest level at or below ``m`` by time:
  when ``m`` is a level, every entry read is a match; between levels, entries below ``m`` are
  skipped by their member, without reading their results.
- **Minute aggregates** (``keys.share_buckets``): result count, first and last capture time,
  per-class share sum and max, and per-class counts of results at or above each level. Hours are
  sums of minutes, so an aggregate over an hour costs 60 reads, whatever the frame rate.
- **Results shards** (``keys.results_shard(keys.shard_of(stream, shards))``): stream, seq, capture
  time and shares by class name, for alert evaluators. Written after the script, at least once
  (``keys.unfinished_results``): another slot than the stream's.

Classes are indexed by name, so ``class=person`` finds people in streams of either label set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowcloud import keys
from flowcloud.labels import LABEL_SETS

LEVELS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # level 0: the class is present
BUCKET_SECONDS = 60
RESULTS_STREAM_MAXLEN = 100_000  # results waiting for the alert evaluators per shard at most (approximate)

# Members of a minute-aggregate sorted set.
AGG_COUNT = "n"
AGG_FIRST = "t0"
AGG_LAST = "t1"
AGG_SUM = "sum:"  # + class name
AGG_MAX = "max:"  # + class name
AGG_ABOVE = "above:"  # + class name + ":" + level


def levels_reached(share: float) -> int:
    """How many levels a present class's share reaches (at least 1: level 0 is 'present')."""
    return sum(1 for level in LEVELS if share >= level)


def level_for(min_share: float) -> int:
    """The index level to read for ``share >= min_share``: the highest level at or below it."""
    return max(i for i, level in enumerate(LEVELS) if level <= min_share)


def class_names(label_set: str, shares: Mapping[int, float]) -> dict[str, float]:
    """Shares by class name (ids outside the label set keep their number as a name)."""
    names = LABEL_SETS[label_set].class_names if label_set in LABEL_SETS else ()
    return {names[c] if 0 <= c < len(names) else str(c): s for c, s in shares.items()}


def member(seq: int, share: float) -> str:
    return f"{seq}:{share!r}"


def parse_member(raw: bytes | str) -> tuple[int, float]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    seq, _, share = text.partition(":")
    return int(seq), float(share)


def bucket_of(capture_ts: float) -> int:
    return math.floor(capture_ts / BUCKET_SECONDS)


def index_call(
    stream: str,
    seq: int,
    capture_ts: float,
    label_set: str,
    shares: Mapping[int, float],
    fields: Mapping[str, str | bytes],
    ttl: int,
) -> tuple[list[str], list[str | bytes]]:
    """The KEYS and ARGV of ``results.INDEX_SCRIPT`` for one result (all keys of its stream)."""
    index_keys: list[str] = []
    per_class: list[str | bytes] = []
    for name, share in sorted(class_names(label_set, shares).items()):
        reached = levels_reached(share)
        index_keys += [keys.class_index(stream, name, level) for level in range(reached)]
        per_class += [name, repr(share), str(reached)]
    script_keys = [
        keys.mask(stream, seq),
        keys.mask_index(stream),
        keys.share_buckets(stream, bucket_of(capture_ts)),
        keys.class_indexes(stream),
        keys.unfinished_results(stream),
        *index_keys,
    ]
    args: list[str | bytes] = [
        fields["meta"],
        fields["labels_png"],
        str(ttl),
        str(seq),
        repr(capture_ts),
        *per_class,
    ]
    return script_keys, args


def result_event(
    stream: str, seq: int, capture_ts: float, label_set: str, shares: Mapping[int, float]
) -> dict[str, str]:
    """The fields of a result's entry on its results shard."""
    return {
        keys.R_STREAM: stream,
        keys.R_SEQ: str(seq),
        keys.R_CAPTURE_TS: repr(capture_ts),
        keys.R_SHARES: json.dumps(class_names(label_set, shares)),
    }


@dataclass
class ShareAggregate:
    """Per-class share statistics of the results in one time bucket (or a sum of buckets)."""

    start: float
    count: int = 0
    first: float | None = None
    last: float | None = None
    sums: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    above: dict[tuple[str, int], int] = field(default_factory=dict)  # (class, level) -> results

    @classmethod
    def parse(cls, start: float, pairs: list[tuple[Any, float]]) -> ShareAggregate:
        out = cls(start)
        for raw, score in pairs:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name == AGG_COUNT:
                out.count = int(score)
            elif name == AGG_FIRST:
                out.first = score
            elif name == AGG_LAST:
                out.last = score
            elif name.startswith(AGG_SUM):
                out.sums[name[len(AGG_SUM) :]] = score
            elif name.startswith(AGG_MAX):
                out.maxima[name[len(AGG_MAX) :]] = score
            elif name.startswith(AGG_ABOVE):
                cls_name, _, level = name[len(AGG_ABOVE) :].rpartition(":")
                out.above[(cls_name, int(level))] = int(score)
        return out

    def add(self, other: ShareAggregate) -> None:
        """Fold another bucket into this one."""
        self.count += other.count
        if other.first is not None:
            self.first = other.first if self.first is None else min(self.first, other.first)
        if other.last is not None:
            self.last = other.last if self.last is None else max(self.last, other.last)
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        for name, value in other.maxima.items():
            self.maxima[name] = max(self.maxima.get(name, 0.0), value)
        for pair, n in other.above.items():
            self.above[pair] = self.above.get(pair, 0) + n

    def frame_interval(self) -> float | None:
        """The mean time between results (None with fewer than two)."""
        if self.count < 2 or self.first is None or self.last is None:
            return None
        return (self.last - self.first) / (self.count - 1)
