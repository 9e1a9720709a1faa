"""Wire-protocol cost against decoding: how much of a gateway core the RTP/H.264 layer takes.

    python -m bench.protocol                  # 150 frames of 640x480 at 2 Mb/s, MTU 1200
    python -m bench.protocol --frames 300 --mtu 600

Encodes a moving 640x480 scene with the edge's own encoder (PyAV libx264, ultrafast,
zerolatency), then times on the same access units, in one process and one thread:
  * edge encode (frames/s): can this machine's edge keep up with 30 fps?
  * packetize (edge side): NAL units -> RTP packets -> RFC 4571 bytes;
  * depacketize (gateway side): RFC 4571 bytes -> RTP parse -> access units;
  * bare PyAV decode of the same access units (the baseline);
and prints the protocol's time as a ratio of decode time.
"""

from __future__ import annotations

import argparse
import time

import av
import numpy as np

from edge.encoder import Libx264Encoder
from edge.frames import EncodedFrame, Picture, StreamShape
from flowcloud.protocol.capture_time import capture_time_extension
from flowcloud.protocol.framing import Rfc4571Decoder, frame
from flowcloud.protocol.h264 import AccessUnit, Depacketizer, Packetizer
from flowcloud.protocol.rtp import RtpPacket

SHAPE = StreamShape(640, 480, 30.0)


def scene(i: int) -> np.ndarray:
    y, x = np.mgrid[0 : SHAPE.height, 0 : SHAPE.width]
    img = np.empty((SHAPE.height, SHAPE.width, 3), np.uint8)
    img[..., 0] = (x + 3 * i) % 256
    img[..., 1] = (y + 2 * i) % 256
    img[..., 2] = ((x // 40 + y // 40 + i // 5) % 2) * 200
    return img


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--mtu", type=int, default=1200)
    parser.add_argument("--bitrate", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="timing runs of each step (best is kept)")
    args = parser.parse_args()

    images = [scene(i) for i in range(args.frames)]
    encoder = Libx264Encoder(SHAPE, args.bitrate, keyframe_interval=30)
    started = time.perf_counter()
    encoded: list[EncodedFrame] = []
    for i, image in enumerate(images):
        encoded += encoder.encode(Picture(image, 1_764_000_000 + i / 30))
    encoded += encoder.flush()
    encode_s = time.perf_counter() - started
    size = sum(e.size for e in encoded)

    def packetize() -> bytes:
        packetizer = Packetizer(mtu=args.mtu, ssrc=1, first_sequence_number=0)
        out = bytearray()
        for i, e in enumerate(encoded):
            for p in packetizer.packetize(e.nals, 3000 * i, capture_time_extension(e.capture_time)):
                out += frame(bytes(p))
        return bytes(out)

    wire = packetize()

    def depacketize() -> list[AccessUnit]:
        depacketizer = Depacketizer()
        aus: list[AccessUnit] = []
        framing = Rfc4571Decoder()
        for pos in range(0, len(wire), 65536):  # TCP-sized reads
            for body in framing.feed(wire[pos : pos + 65536]):
                aus += depacketizer.push(RtpPacket.parse(body))
        return aus + depacketizer.flush()

    def decode() -> int:
        codec = av.CodecContext.create("h264", "r")
        codec.thread_count = 1
        count = 0
        for e in encoded:
            for packet in codec.parse(b"".join(b"\x00\x00\x00\x01" + n for n in e.nals)):
                count += len(codec.decode(packet))
        for packet in codec.parse(b""):
            count += len(codec.decode(packet))
        return count + len(codec.decode(None))

    def best(fn: object) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        return min(times)

    aus = depacketize()
    assert [a.nals for a in aus] == [e.nals for e in encoded], "round trip is not bit-exact"
    assert decode() == args.frames
    pack_s, depack_s, decode_s = best(packetize), best(depacketize), best(decode)
    n = len(encoded)
    packets = sum(1 for _ in Rfc4571Decoder().feed(wire))
    rows = [
        ("stream", f"{n} frames 640x480, {size / n / 1024:.1f} KiB/frame, {packets / n:.1f} packets/frame"),
        ("edge encode (libx264)", f"{n / encode_s:8.1f} frames/s"),
        ("packetize", f"{n / pack_s:8.1f} frames/s  {size / pack_s / 1e6:7.1f} MB/s"),
        ("depacketize", f"{n / depack_s:8.1f} frames/s  {size / depack_s / 1e6:7.1f} MB/s"),
        ("bare PyAV decode (1 thread)", f"{n / decode_s:8.1f} frames/s  (baseline)"),
        ("depacketize / decode time", f"{depack_s / decode_s:8.3f}"),
        ("packetize / encode time", f"{pack_s / encode_s:8.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"MTU {args.mtu}, bitrate {args.bitrate} b/s, best of {args.repeat}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
