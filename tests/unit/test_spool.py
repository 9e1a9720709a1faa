"""The edge spool: whole GOPs of real libx264 video on disk, checksummed, bounded, recoverable,
and replayable as a gateway recording."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import pytest

from edge.encoder import Libx264Encoder
from edge.frames import EncodedFrame, Picture, StreamShape
from edge.sources import RecordingSource
from edge.sources import TestPattern as Pattern
from edge.spool import Spool, scan_segment
from flowcloud.protocol.framing import RECORDING_SUFFIX

SHAPE = StreamShape(96, 64, 30.0)
GOP = 5


def encoded(count: int, start: float | None = None) -> list[EncodedFrame]:
    """``count`` access units of real H.264 (an IDR every `GOP`), captured 1/30 s apart."""
    start = time.time() - count / SHAPE.fps if start is None else start
    encoder = Libx264Encoder(SHAPE, 200_000, GOP)
    pattern = Pattern(SHAPE.width, SHAPE.height)
    out: list[EncodedFrame] = []
    for i in range(count):
        out += encoder.encode(Picture(pattern.frame(i), start + i / SHAPE.fps))
    out += encoder.flush()
    return out


def micros(frames: list[EncodedFrame]) -> list[int]:
    """Capture times as the spool keeps them: whole microseconds (the RTP extension's unit)."""
    return [round(f.capture_time * 1_000_000) for f in frames]


def decodable(frames: list[EncodedFrame]) -> int:
    """How many pictures FFmpeg decodes from the access units, in order."""
    codec = av.CodecContext.create("h264", "r")
    pictures = 0
    for item in frames:
        data = b"".join(b"\x00\x00\x00\x01" + n for n in item.nals)
        pictures += len(codec.decode(av.Packet(data)))
    pictures += len(codec.decode(None))
    return pictures


def sent(spool: Spool) -> list[EncodedFrame]:
    """Drain the spool as the backfill does: every pending GOP, marked sent."""
    out: list[EncodedFrame] = []
    for segment, index, gop in spool.pending():
        out += gop.frames
        spool.mark_sent(segment, index, gop)
    return out


def test_spool_keeps_whole_gops_with_capture_times_across_a_restart(tmp_path: Path) -> None:
    frames = encoded(23)
    spool = Spool(tmp_path, SHAPE, segment_seconds=0.2)
    for item in frames:
        assert spool.append(item)
    spool.close()
    assert spool.frames == 23 and spool.gops == 5
    reopened = Spool(tmp_path, SHAPE)
    assert reopened.frames == 23 and reopened.gops == 5
    out = sent(reopened)
    assert micros(out) == micros(frames)
    assert [f.nals for f in out] == [f.nals for f in frames]
    assert decodable(out) == 23
    assert reopened.frames == 0 and not list(tmp_path.glob(f"*{RECORDING_SUFFIX}"))


def test_spool_starts_at_an_idr(tmp_path: Path) -> None:
    frames = encoded(8)
    spool = Spool(tmp_path, SHAPE)
    assert not spool.append(frames[1])  # a P frame cannot start a GOP
    assert all(spool.append(f) for f in frames[GOP:])
    spool.close()
    assert micros(sent(spool)) == micros(frames[GOP:])


def spooled_segment(folder: Path, frames: list[EncodedFrame]) -> Path:
    """Spool ``frames`` into ``folder`` and close it: the one segment file they went to."""
    spool = Spool(folder, SHAPE)
    for item in frames:
        spool.append(item)
    spool.close()
    (segment,) = folder.glob(f"*{RECORDING_SUFFIX}")
    return segment


def test_a_torn_last_record_is_cut_and_everything_before_it_recovers(tmp_path: Path) -> None:
    frames = encoded(12)
    segment = spooled_segment(tmp_path, frames)
    whole = segment.read_bytes()
    segment.write_bytes(whole[:-7])  # the last record lost its end (kill -9, power cut)
    reopened = Spool(tmp_path, SHAPE)
    assert reopened.frames == 11
    assert segment.stat().st_size < len(whole) - 7  # the torn bytes are gone from the file
    out = sent(reopened)
    assert micros(out) == micros(frames[:11])
    assert decodable(out) == 11


def test_a_damaged_record_is_never_read_as_video(tmp_path: Path) -> None:
    frames = encoded(10)
    segment = spooled_segment(tmp_path, frames)
    data = bytearray(segment.read_bytes())
    target = frames[2].nals[-1]
    at = bytes(data).index(target[10:40])  # inside frame 2's slice data
    data[at + 5] ^= 0xFF
    segment.write_bytes(bytes(data))
    scan = scan_segment(segment)
    # Frame 2 fails its checksum; 3 and 4 depend on it; the next GOP is whole.
    assert micros(scan.frames) == micros(frames[:2] + frames[GOP:])
    assert scan.corrupt == 3


def test_a_full_spool_evicts_its_oldest_gops_and_counts_them(tmp_path: Path) -> None:
    frames = encoded(40)  # 8 GOPs
    gop_bytes = sum(f.size for f in frames[:GOP])
    spool = Spool(tmp_path, SHAPE, max_bytes=int(3.5 * gop_bytes), segment_seconds=0)
    for item in frames:
        spool.append(item)
    spool.close()
    assert spool.evicted_gops >= 3
    assert spool.evicted_gops + spool.gops == 8
    out = sent(spool)
    kept = frames[GOP * spool.evicted_gops :]
    assert micros(out) == micros(kept)  # the newest, in order
    assert decodable(out) == len(kept)


def test_old_gops_age_out(tmp_path: Path) -> None:
    frames = encoded(20)
    spool = Spool(tmp_path, SHAPE, max_age=60, segment_seconds=0)
    for item in frames:
        spool.append(item)
    spool.seal()
    spool.enforce_caps(frames[-1].capture_time + 60 + 0.01 - 2 / SHAPE.fps)
    assert spool.evicted_gops == 3  # the last GOP's newest frame is still within the hour


def test_a_spool_segment_replays_with_the_recording_source(tmp_path: Path) -> None:
    frames = encoded(10)
    segment = spooled_segment(tmp_path, frames)
    source = RecordingSource(segment, loop=False, fps=5.0)
    assert source.open() == SHAPE  # size from the SPS, frame rate from the .json beside it
    replayed = list(source.access_units())
    assert [f.nals for f in replayed] == [f.nals for f in frames]
    assert not source.dropped
    assert isinstance(source._stopped, threading.Event)


@pytest.mark.parametrize("cut", [1, 2, 3, 20])
def test_any_torn_tail_leaves_only_whole_records(tmp_path: Path, cut: int) -> None:
    frames = encoded(6)
    segment = spooled_segment(tmp_path, frames)
    segment.write_bytes(segment.read_bytes()[:-cut])
    out = sent(Spool(tmp_path, SHAPE))
    assert [f.nals for f in out] == [f.nals for f in frames[: len(out)]]
    assert len(out) == 5
