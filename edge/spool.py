"""The edge's store-and-forward spool: whole GOPs on disk while the gateway is away.

Layout: a directory of segment files, oldest first by name (``<first capture µs>-<n>.rfc4571``).
A segment is a valid gateway recording: RTP/H.264 packets in RFC 4571 framing, each access unit's
first packet carrying the capture-time extension (id 1), so ``flowcloud edge --source SEGMENT``
replays it and GStreamer's ``rtpstreamdepay ! rtph264depay`` decodes it. A ``.json`` beside each
segment holds its stream description, as beside a recording.

**Records are checksummed.** The last packet of each access unit (the marker packet) carries a
second extension (id 2): the CRC-32 of the capture time and the access unit's NAL units. An access
unit without it (a torn write at the tail: the process or the machine died mid-write) or with a
wrong one is never read as video; on open, a torn tail is cut off the file, and damage inside a
segment skips to the next IDR.

**Whole GOPs.** A segment starts at an IDR and holds whole GOPs; it is sealed at an IDR once it
is ``segment_seconds`` old (or when the gateway comes back). Caps on bytes and on age evict the
oldest sealed segments first; each evicted GOP is counted. A ``.sent`` file beside a segment
records how many of its GOPs the backfill has sent, so a restarted edge neither loses nor repeats
them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge import metrics
from edge.frames import EncodedFrame, StreamShape
from flowcloud.protocol.capture_time import SPOOL_CHECKSUM_EXT_ID, capture_time_extension, encode_capture_time
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import DESCRIPTION_SUFFIX, RECORDING_SUFFIX, Rfc4571Decoder, frame
from flowcloud.protocol.h264 import Depacketizer, Packetizer
from flowcloud.protocol.rtp import RtpPacket

log = logging.getLogger(__name__)

CHECKSUM_EXT_ID = SPOOL_CHECKSUM_EXT_ID  # on an access unit's last packet: CRC-32 (big-endian)
SPOOL_MTU = 65_000  # whole access units in few packets; room left for the checksum element
SENT_SUFFIX = ".sent"
SEGMENT_NAME = re.compile(r"\d{17}-\d{6}")  # <first capture µs>-<counter>
READ_CHUNK = 1 << 16

# Why GOPs left the spool unsent (label values of flowcloud_edge_spool_evicted_gops_total).
EVICT_BYTES = "max_bytes"
EVICT_AGE = "max_age"


def checksum(capture_time: float, nals: list[bytes]) -> bytes:
    """CRC-32 of an access unit's capture time and NAL units (each with a 4-byte length)."""
    crc = zlib.crc32(encode_capture_time(capture_time))
    for nal in nals:
        crc = zlib.crc32(struct.pack("!I", len(nal)), crc)
        crc = zlib.crc32(nal, crc)
    return struct.pack("!I", crc)


def encode_record(packetizer: Packetizer, item: EncodedFrame) -> bytes:
    """One access unit as framed RTP packets, the last one carrying its checksum."""
    packets = packetizer.packetize(
        item.nals, packetizer.timestamp_of(item.capture_time), capture_time_extension(item.capture_time)
    )
    last = packets[-1]
    last.extensions = {**last.extensions, CHECKSUM_EXT_ID: checksum(item.capture_time, item.nals)}
    return b"".join(frame(bytes(p)) for p in packets)


@dataclass
class Gop:
    frames: list[EncodedFrame]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.frames)


@dataclass
class SegmentScan:
    """What a segment holds: its valid access units, and where the valid bytes end."""

    frames: list[EncodedFrame]
    good_end: int  # bytes up to the end of the last valid record
    torn: bool  # bytes after good_end that are no record
    corrupt: int  # records inside the file that failed their checksum

    def gops(self) -> list[Gop]:
        gops: list[Gop] = []
        for item in self.frames:
            if item.keyframe or not gops:
                gops.append(Gop([]))
            gops[-1].frames.append(item)
        return gops


def scan_segment(path: Path) -> SegmentScan:
    """Read a segment, keeping only access units whose checksum holds (bounded reads)."""
    framing = Rfc4571Decoder()
    depacketizer = Depacketizer()
    crcs: dict[int, bytes] = {}  # RTP timestamp -> checksum of its marker packet
    frames: list[EncodedFrame] = []
    offset = good_end = 0
    corrupt = 0
    need_idr = True
    with path.open("rb") as file:
        while chunk := file.read(READ_CHUNK):
            try:
                bodies = framing.feed(chunk)
            except ProtocolError:
                break  # framing lost: nothing after this point can be trusted
            for body in bodies:
                offset += 2 + len(body)
                try:
                    packet = RtpPacket.parse(body)
                    if packet.marker and CHECKSUM_EXT_ID in packet.extensions:
                        crcs[packet.timestamp] = packet.extensions[CHECKSUM_EXT_ID]
                    units = depacketizer.push(packet)
                except ProtocolError:
                    continue
                for au in units:
                    want = crcs.pop(au.timestamp, None)
                    if au.capture_time is None or want is None or checksum(au.capture_time, au.nals) != want:
                        corrupt += 1
                        need_idr = True
                        continue
                    if need_idr and not au.keyframe:
                        corrupt += 1  # follows damage (or starts no GOP): cannot be decoded
                        continue
                    need_idr = False
                    frames.append(EncodedFrame(au.nals, au.keyframe, au.capture_time))
                    good_end = offset
    return SegmentScan(frames, good_end, path.stat().st_size > good_end, corrupt)


@dataclass
class Segment:
    path: Path
    first_capture: float
    last_capture: float
    frames: int
    gops: int
    bytes: int
    sent_gops: int = 0
    sent_frames: int = 0

    @property
    def sent_path(self) -> Path:
        return self.path.with_suffix(SENT_SUFFIX)


class Spool:
    """A bounded on-disk spool of whole GOPs (see the module docstring). Not thread-safe: one
    thread (the daemon's event loop) appends, seals, reads and evicts."""

    def __init__(
        self,
        directory: str | Path,
        shape: StreamShape,
        max_bytes: int = 1 << 30,
        max_age: float = 3600.0,
        segment_seconds: float = 10.0,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shape = shape
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.segment_seconds = segment_seconds
        self.evicted_gops = 0
        self._sealed: list[Segment] = []
        self._open: Segment | None = None
        self._file: BinaryIO | None = None
        self._packetizer: Packetizer | None = None
        self._counter = 0
        self._recover()

    # --- state ---------------------------------------------------------------------------------

    @property
    def segments(self) -> list[Segment]:
        """Every segment, oldest first (the open one last)."""
        return [*self._sealed, *([self._open] if self._open else [])]

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    @property
    def frames(self) -> int:
        """Access units held and not yet sent (GOPs already sent from a segment excluded)."""
        return sum(s.frames - s.sent_frames for s in self.segments)

    @property
    def sealed_frames(self) -> int:
        """Access units the backfill may read now (in sealed segments) and not yet sent."""
        return sum(s.frames - s.sent_frames for s in self._sealed)

    def frames_before(self, capture_time: float) -> int:
        """Access units held and not yet sent in the segments begun before ``capture_time`` (a
        live session's first frame: the spool seals its GOP there, so no segment straddles it)."""
        return sum(s.frames - s.sent_frames for s in self.segments if s.first_capture < capture_time)

    @property
    def gops(self) -> int:
        return sum(s.gops - s.sent_gops for s in self.segments)

    @property
    def oldest(self) -> float | None:
        """Capture time of the oldest access unit held."""
        segments = self.segments
        return segments[0].first_capture if segments else None

    @property
    def in_gop(self) -> bool:
        """An open segment is taking access units (it can take a non-IDR)."""
        return self._open is not None

    def _update_metrics(self) -> None:
        metrics.SPOOL_BYTES.set(self.bytes)
        metrics.SPOOL_GOPS.set(self.gops)
        metrics.SPOOL_FRAMES.set(self.frames)
        oldest = self.oldest
        metrics.SPOOL_OLDEST.set(oldest or 0)

    # --- recovery ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Scan the segments left by an earlier run; cut torn tails; count what is there."""
        for path in sorted(self.directory.glob(f"*{RECORDING_SUFFIX}")):
            if SEGMENT_NAME.fullmatch(path.stem) is None:
                log.warning("spool: ignoring %s (not a segment name)", path.name)
                continue
            scan = scan_segment(path)
            if scan.torn:
                log.warning(
                    "spool: %s ends in %d bytes that are no whole record (a torn write): cut off",
                    path.name,
                    path.stat().st_size - scan.good_end,
                )
                metrics.SPOOL_TORN.inc()
                with path.open("r+b") as file:
                    file.truncate(scan.good_end)
            if scan.corrupt:
                metrics.FRAMES_DROPPED.labels("spool_corrupt").inc(scan.corrupt)
            gops = scan.gops()
            if not gops:
                self._remove(path)
                continue
            sent = self._read_sent(path, len(gops))
            segment = Segment(
                path,
                scan.frames[0].capture_time,
                scan.frames[-1].capture_time,
                len(scan.frames),
                len(gops),
                scan.good_end,
                sent_gops=sent,
                sent_frames=sum(len(g.frames) for g in gops[:sent]),
            )
            self._sealed.append(segment)
            self._counter = max(self._counter, int(path.stem.rsplit("-", 1)[-1]) + 1)
        if self._sealed:
            log.info(
                "spool: %d segment(s) with %d GOPs (%d frames) from an earlier run, captured from %s",
                len(self._sealed),
                self.gops,
                self.frames,
                time.strftime("%H:%M:%S", time.localtime(self._sealed[0].first_capture)),
            )
        self._update_metrics()

    @staticmethod
    def _read_sent(path: Path, gops: int) -> int:
        try:
            return max(0, min(gops, int(path.with_suffix(SENT_SUFFIX).read_text().strip())))
        except (OSError, ValueError):
            return 0

    # --- writing -------------------------------------------------------------------------------

    def append(self, item: EncodedFrame) -> bool:
        """Store an access unit; False (counted) when it cannot start a GOP (no IDR yet)."""
        opened = self._open
        old = opened is not None and item.capture_time - opened.first_capture >= self.segment_seconds
        if item.keyframe and old:
            self.seal()
        if self._open is None:
            if not item.keyframe:
                metrics.FRAMES_DROPPED.labels("spool_await_keyframe").inc()
                return False
            self._start_segment(item.capture_time)
        assert self._open is not None and self._packetizer is not None
        data = encode_record(self._packetizer, item)
        file = self._file
        assert file is not None
        file.write(data)
        file.flush()  # in the kernel: survives kill -9
        segment = self._open
        segment.frames += 1
        segment.gops += item.keyframe
        segment.bytes += len(data)
        segment.last_capture = item.capture_time
        metrics.SPOOL_FRAMES_WRITTEN.inc()
        self.enforce_caps(time.time())
        self._update_metrics()
        return True

    def _start_segment(self, capture_time: float) -> None:
        name = f"{round(capture_time * 1_000_000):017d}-{self._counter:06d}"
        self._counter += 1
        path = self.directory / f"{name}{RECORDING_SUFFIX}"
        description = {"spool": True, "stream": {"width": self.shape.width, "height": self.shape.height,
                                                  "fps": self.shape.fps}}  # fmt: skip
        path.with_suffix(DESCRIPTION_SUFFIX).write_text(json.dumps(description) + "\n")
        self._file = path.open("ab")
        self._packetizer = Packetizer(mtu=SPOOL_MTU)
        self._open = Segment(path, capture_time, capture_time, 0, 0, 0)

    def seal(self) -> None:
        """Close the open segment (its GOPs become readable by the backfill)."""
        if self._open is None:
            return
        file = self._file
        assert file is not None
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        self._sealed.append(self._open)
        self._open = None
        self._file = None

    def close(self) -> None:
        self.seal()

    # --- caps ----------------------------------------------------------------------------------

    def enforce_caps(self, now: float) -> None:
        """Evict the oldest sealed segments over the byte cap or past the age cap."""
        while self._sealed:
            oldest = self._sealed[0]
            if self.bytes > self.max_bytes:
                reason = EVICT_BYTES
            elif oldest.last_capture < now - self.max_age:
                reason = EVICT_AGE
            else:
                break
            self._sealed.pop(0)
            gops = oldest.gops - oldest.sent_gops
            self.evicted_gops += gops
            metrics.SPOOL_EVICTED_GOPS.labels(reason).inc(gops)
            metrics.FRAMES_DROPPED.labels(f"spool_{reason}").inc(oldest.frames - oldest.sent_frames)
            log.warning("spool: evicted %s (%d GOPs, %d bytes): %s", oldest.path.name, gops, oldest.bytes,
                        reason)  # fmt: skip
            self._remove(oldest.path)
        self._update_metrics()

    # --- reading (backfill) --------------------------------------------------------------------

    def pending(self) -> Iterator[tuple[Segment, int, Gop]]:
        """Sealed GOPs not sent yet, oldest first: (segment, index in it, GOP)."""
        while self._sealed:
            segment = self._sealed[0]
            gops = scan_segment(segment.path).gops() if segment.path.exists() else []
            for index in range(segment.sent_gops, len(gops)):
                if not self._sealed or self._sealed[0] is not segment:
                    break  # evicted while we were sending
                yield segment, index, gops[index]
            if self._sealed and self._sealed[0] is segment:
                self.done(segment)

    def mark_sent(self, segment: Segment, index: int, gop: Gop) -> None:
        """The backfill has sent GOP ``index`` of ``segment``: remember it across restarts."""
        if segment.sent_gops > index:
            return
        segment.sent_gops = index + 1
        segment.sent_frames += len(gop.frames)
        tmp = segment.sent_path.with_suffix(".sent.tmp")
        try:
            tmp.write_text(f"{segment.sent_gops}\n")
            os.replace(tmp, segment.sent_path)
        except OSError as exc:
            log.warning("spool: cannot record progress of %s: %s", segment.path.name, exc)
        self._update_metrics()

    def done(self, segment: Segment) -> None:
        """A segment whose GOPs were all sent leaves the spool."""
        if segment in self._sealed:
            self._sealed.remove(segment)
        self._remove(segment.path)
        self._update_metrics()

    @staticmethod
    def _remove(path: Path) -> None:
        for suffix in (RECORDING_SUFFIX, DESCRIPTION_SUFFIX, SENT_SUFFIX):
            path.with_suffix(suffix).unlink(missing_ok=True)
