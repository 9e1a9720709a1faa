"""The SPS parser: real SPSs from libx264 (PyAV), GStreamer x264enc and the FFmpeg CLI give the
size they were made for and the size FFmpeg's decoder outputs; hand-built SPSs cover scaling
matrices, pic_order_cnt_type 1 and emulation prevention (and still decode, with real slices, in
FFmpeg); bad input raises ProtocolError with a precise message, and nothing else on any input."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.h264 import NAL_TYPE_SPS, nal_type, split_annexb, to_annexb
from flowcloud.protocol.sps import MAX_FRAME_MBS, MAX_MBS_PER_SIDE, SequenceParameterSet, unescape_rbsp

DATA = Path(__file__).parent.parent / "data"


@cache
def libx264_stream(
    width: int,
    height: int,
    pix_fmt: str = "yuv420p",
    profile: str = "",
    preset: str = "ultrafast",
    params: str = "",
) -> bytes:
    """Annex B bytes of a one-frame libx264 stream (SPS, PPS, IDR)."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, pix_fmt
    codec.time_base = Fraction(1, 30)
    codec.thread_count = 1
    options = {"preset": preset}
    if profile:
        options["profile"] = profile
    if params:
        options["x264-params"] = params
    codec.options = options
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    picture = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
    picture.pts = 0
    return b"".join(bytes(p) for p in [*codec.encode(picture), *codec.encode(None)])


def sps_of(annexb: bytes) -> bytes:
    return next(n for n in split_annexb(annexb) if nal_type(n) == NAL_TYPE_SPS)


def decoded_size(annexb: bytes) -> tuple[int, int]:
    """The picture size FFmpeg's own H.264 decoder gives the stream."""
    codec = av.CodecContext.create("h264", "r")
    pictures = [*codec.decode(av.Packet(annexb)), *codec.decode(None)]
    assert pictures, "FFmpeg decoded no picture"
    return pictures[0].width, pictures[0].height


# (width, height, pix_fmt, x264 profile, preset, x264-params) -> (profile_idc, chroma_format_idc, bit depth)
LIBX264_CASES = [
    ((1920, 1080, "yuv420p", "baseline", "ultrafast", ""), (66, 1, 8)),
    ((642, 362, "yuv420p", "main", "veryfast", "bframes=0"), (77, 1, 8)),
    ((176, 144, "yuv420p", "high", "veryfast", ""), (100, 1, 8)),
    ((1280, 720, "yuv420p", "high", "veryfast", "bframes=0"), (100, 1, 8)),
    ((643, 361, "yuv444p", "high444", "veryfast", ""), (244, 3, 8)),
    ((642, 361, "yuv422p", "high422", "ultrafast", ""), (122, 2, 8)),
    ((642, 361, "gray", "", "ultrafast", ""), (100, 0, 8)),
    ((640, 360, "yuv420p", "main", "veryfast", "interlaced=1"), (77, 1, 8)),  # field coding, cropped
    ((642, 362, "yuv420p10le", "high10", "ultrafast", ""), (110, 1, 10)),
    ((322, 240, "yuv422p10le", "high422", "ultrafast", "interlaced=1"), (122, 2, 10)),
]


@pytest.mark.parametrize(("config", "expected"), LIBX264_CASES, ids=lambda v: "-".join(map(str, v)))
def test_libx264_sps_gives_the_configured_and_decoded_size(
    config: tuple[int, int, str, str, str, str], expected: tuple[int, int, int]
) -> None:
    width, height = config[:2]
    stream = libx264_stream(*config)  # PyAV's libx264 encodes 10-bit too: a failure here is a failure
    sps = SequenceParameterSet.parse(sps_of(stream))
    assert (sps.width, sps.height) == (width, height) == decoded_size(stream)
    assert (sps.profile_idc, sps.chroma_format_idc, sps.bit_depth_luma) == expected
    assert sps.bit_depth_chroma == sps.bit_depth_luma
    assert sps.frame_mbs_only == ("interlaced" not in config[5])
    assert sps.coded_width == 16 * -(-width // 16) and sps.coded_height % 16 == 0


def test_cropping_fields_of_a_real_sps() -> None:
    sps = SequenceParameterSet.parse(sps_of(libx264_stream(642, 362)))
    assert (sps.width_in_mbs, sps.height_in_mbs) == (41, 23)
    assert (sps.crop_left, sps.crop_right, sps.crop_top, sps.crop_bottom) == (0, 14, 0, 6)
    assert (sps.sps_id, sps.level_idc, sps.pic_order_cnt_type, sps.vui_present) == (0, 30, 2, True)
    # Field coding: map units of two macroblock rows, crop units of two chroma lines.
    interlaced = SequenceParameterSet.parse(sps_of(libx264_stream(640, 360, params="interlaced=1")))
    assert (interlaced.frame_mbs_only, interlaced.height_in_mbs, interlaced.crop_bottom) == (False, 24, 24)


def test_gstreamer_x264enc_sps(tmp_path: Path) -> None:
    cases = [  # width, height, raw format, interlace mode, x264enc options, chroma_format_idc
        (350, 198, "I420", "progressive", "", 1),
        (322, 186, "Y444", "progressive", "", 3),
        (720, 576, "I420", "interleaved", "interlaced=true", 1),
    ]
    for width, height, raw, mode, extra, chroma in cases:
        out = tmp_path / f"{width}x{height}.h264"
        pipeline = (
            f"videotestsrc num-buffers=1 ! video/x-raw,format={raw},width={width},height={height},"
            f"framerate=25/1,interlace-mode={mode} ! x264enc speed-preset=veryfast {extra} ! "
            f"video/x-h264,stream-format=byte-stream ! filesink location={out}"
        )
        subprocess.run(
            ["gst-launch-1.0", "-q", *pipeline.split()], check=True, timeout=60, capture_output=True
        )
        stream = out.read_bytes()
        sps = SequenceParameterSet.parse(sps_of(stream))
        assert (sps.width, sps.height) == (width, height) == decoded_size(stream)
        assert (sps.chroma_format_idc, sps.frame_mbs_only) == (chroma, not extra)
    # The capture in tests/data (GStreamer x264enc, 160x120).
    stream = (DATA / "gst_160x120.h264").read_bytes()
    sps = SequenceParameterSet.parse(sps_of(stream))
    assert (sps.width, sps.height) == (160, 120) == decoded_size(stream)


def test_ffmpeg_cli_sps(tmp_path: Path) -> None:
    out = tmp_path / "out.h264"
    command = "ffmpeg -v error -f lavfi -i testsrc2=size=330x186:rate=25 -frames:v 1 -c:v libx264 "
    command += f"-profile:v high -pix_fmt yuv420p -f h264 {out}"
    subprocess.run(command.split(), check=True, timeout=60, capture_output=True)
    stream = out.read_bytes()
    sps = SequenceParameterSet.parse(sps_of(stream))
    assert (sps.width, sps.height, sps.profile_idc) == (330, 186, 100)
    assert decoded_size(stream) == (330, 186)


# --- hand-built SPSs ----------------------------------------------------------------------------


class BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> None:
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(2 * code.bit_length() - 1, code)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def nal(self) -> bytes:
        """NAL header + RBSP with trailing bits + emulation prevention (7.4.1)."""
        bits = [*self.bits, 1]
        bits += [0] * (-len(bits) % 8)
        rbsp = bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))
        out = bytearray((0x67,))
        zeros = 0
        for byte in rbsp:
            if zeros >= 2 and byte <= 3:
                out.append(3)
                zeros = 0
            out.append(byte)
            zeros = zeros + 1 if byte == 0 else 0
        return bytes(out)


@dataclass
class SpsFields:
    profile_idc: int = 100
    constraint_flags: int = 0
    level_idc: int = 30
    sps_id: int = 0
    chroma_format_idc: int = 1
    bit_depth_minus8: int = 0
    scaling_lists: dict[int, list[int]] | None = None  # list index -> delta_scale values
    log2_max_frame_num_minus4: int = 0
    poc_type: int = 0
    poc_cycle: list[int] = field(default_factory=list)
    offset_for_non_ref_pic: int = 0
    offset_for_top_to_bottom_field: int = 0
    max_num_ref_frames: int = 1
    width_mbs_minus1: int = 19
    height_map_units_minus1: int = 14
    frame_mbs_only: bool = True
    direct_8x8_inference: bool = True
    crop: tuple[int, int, int, int] | None = None  # left, right, top, bottom in crop units
    sps_id_bits: int | None = None

    def build(self) -> bytes:
        w = BitWriter()
        w.u(8, self.profile_idc)
        w.u(8, self.constraint_flags)
        w.u(8, self.level_idc)
        w.ue(self.sps_id)
        if self.profile_idc in (100, 110, 122, 244):
            w.ue(self.chroma_format_idc)
            if self.chroma_format_idc == 3:
                w.u(1, 0)
            w.ue(self.bit_depth_minus8)
            w.ue(self.bit_depth_minus8)
            w.u(1, 0)
            w.u(1, self.scaling_lists is not None)
            if self.scaling_lists is not None:
                for i in range(12 if self.chroma_format_idc == 3 else 8):
                    deltas = self.scaling_lists.get(i)
                    w.u(1, deltas is not None)
                    for delta in deltas or []:
                        w.se(delta)
        w.ue(self.log2_max_frame_num_minus4)
        w.ue(self.poc_type)
        if self.poc_type == 0:
            w.ue(2)
        elif self.poc_type == 1:
            w.u(1, 1)  # delta_pic_order_always_zero_flag: slices carry no POC fields, as with type 2
            w.se(self.offset_for_non_ref_pic)
            w.se(self.offset_for_top_to_bottom_field)
            w.ue(len(self.poc_cycle))
            for offset in self.poc_cycle:
                w.se(offset)
        w.ue(self.max_num_ref_frames)
        w.u(1, 0)
        w.ue(self.width_mbs_minus1)
        w.ue(self.height_map_units_minus1)
        w.u(1, self.frame_mbs_only)
        if not self.frame_mbs_only:
            w.u(1, 0)
        w.u(1, self.direct_8x8_inference)
        w.u(1, self.crop is not None)
        for offset in self.crop or ():
            w.ue(offset)
        w.u(1, 0)  # no VUI
        return w.nal()


def deltas_for(scales: list[int]) -> list[int]:
    """The delta_scale values that code a scaling list (a scale of 0 ends it early)."""
    previous = [8, *scales[:-1]]
    return [((s - p + 128) % 256) - 128 for s, p in zip(scales, previous, strict=True)]


def explicit_list(size: int, seed: int) -> list[int]:
    """delta_scale values of a full explicit list (no scale is 0, so all ``size`` are coded)."""
    return deltas_for([4 + (seed * 7 + j * 5) % 200 for j in range(size)])


def rebuilt_from(real: SequenceParameterSet, **changes: object) -> SpsFields:
    """A hand-built SPS with the real one's slice-relevant fields and the given changes."""
    unit = 1 if real.chroma_format_idc == 3 else 2  # progressive 4:2:0 or 4:4:4 only
    crop = (real.crop_left // unit, real.crop_right // unit, real.crop_top // unit, real.crop_bottom // unit)
    fields = SpsFields(
        profile_idc=real.profile_idc,
        level_idc=real.level_idc,
        chroma_format_idc=real.chroma_format_idc,
        log2_max_frame_num_minus4=real.log2_max_frame_num - 4,
        max_num_ref_frames=real.max_num_ref_frames,
        width_mbs_minus1=real.width_in_mbs - 1,
        height_map_units_minus1=real.height_in_mbs - 1,
        direct_8x8_inference=real.direct_8x8_inference,
        crop=crop if any(crop) else None,
    )
    for key, value in changes.items():
        setattr(fields, key, value)
    return fields


@pytest.mark.parametrize(
    ("pix_fmt", "profile", "size"), [("yuv420p", "high", (642, 362)), ("yuv444p", "high444", (643, 361))]
)
def test_scaling_matrices_and_poc_type_1_in_a_stream_ffmpeg_decodes(
    pix_fmt: str, profile: str, size: tuple[int, int]
) -> None:
    """Real slices (POC type 2, so no POC fields in slice headers) behind a hand-built SPS with
    POC type 1 and scaling lists: FFmpeg decodes the picture, and both agree on its size."""
    stream = libx264_stream(*size, pix_fmt, profile, "veryfast", "bframes=0")
    real = SequenceParameterSet.parse(sps_of(stream))
    assert real.pic_order_cnt_type == 2
    lists = 12 if pix_fmt == "yuv444p" else 8
    scaling = {i: explicit_list(16 if i < 6 else 64, i) for i in range(0, lists, 2)}
    scaling[1] = [-8]  # nextScale 0 at once: "use the default list"
    scaling[lists - 1] = deltas_for([20, 30, 40, 0])  # ends early: the rest repeat the last scale
    built = rebuilt_from(
        real,
        scaling_lists=scaling,
        poc_type=1,
        offset_for_non_ref_pic=-(2**30),  # 31 leading zero bits: 00 00 00 needs emulation prevention
        offset_for_top_to_bottom_field=3,
        poc_cycle=[1, -2, 5],
    ).build()
    assert b"\x00\x00\x03" in built
    sps = SequenceParameterSet.parse(built)
    assert (sps.width, sps.height, sps.pic_order_cnt_type, sps.scaling_matrix_present) == (*size, 1, True)
    assert sps.chroma_format_idc == real.chroma_format_idc
    nals = [built if nal_type(n) == NAL_TYPE_SPS else n for n in split_annexb(stream)]
    assert decoded_size(to_annexb(nals)) == size


def test_scaling_list_that_ends_early() -> None:
    # A list whose scale becomes 0 at entry 3 stops reading deltas: the rest repeat the last scale.
    fields = SpsFields(scaling_lists={0: [2, 2, -12], 6: deltas_for([9, 0])}, crop=(0, 3, 0, 1))
    sps = SequenceParameterSet.parse(fields.build())
    assert (sps.width, sps.height, sps.scaling_matrix_present) == (314, 238, True)


def test_poc_cycle_and_exp_golomb_bounds() -> None:
    extreme = SpsFields(poc_type=1, poc_cycle=[2**31 - 1, -(2**31 - 1)] * 127 + [0])
    assert SequenceParameterSet.parse(extreme.build()).pic_order_cnt_type == 1
    with pytest.raises(
        ProtocolError, match=r"^SPS: num_ref_frames_in_pic_order_cnt_cycle = 256 exceeds 255$"
    ):
        SequenceParameterSet.parse(SpsFields(poc_type=1, poc_cycle=[0] * 256).build())
    too_long = r"^SPS: Exp-Golomb code of offset_for_ref_frame\[1\] has more than 31 leading zero bits"
    with pytest.raises(ProtocolError, match=too_long):
        SequenceParameterSet.parse(SpsFields(poc_type=1, poc_cycle=[0, 2**31]).build())  # code 2**32 - 1


def test_emulation_prevention_is_removed() -> None:
    assert unescape_rbsp(b"\x00\x00\x03\x01\x00\x00\x03\x00\x00\x03") == b"\x00\x00\x01\x00\x00\x00\x00"
    assert unescape_rbsp(b"\x00\x00\x03\x00\x03\x00") == b"\x00\x00\x00\x03\x00"
    assert unescape_rbsp(b"\x01\x02") == b"\x01\x02"


REAL = sps_of(libx264_stream(642, 362))


@pytest.mark.parametrize(
    ("nal", "message"),
    [
        (b"", "SPS: empty NAL unit"),
        (b"\x68" + REAL[1:], "SPS: NAL unit type is 8, not 7"),
        (b"\xe7" + REAL[1:], "SPS: NAL unit header has the forbidden_zero_bit set"),
        (REAL + b"\x00" * 4096, f"SPS: NAL unit of {len(REAL) + 4096} bytes exceeds the limit of 4096"),
        (REAL[:1], "SPS: truncated in profile_idc (at bit 0 of 0)"),
        (REAL[:3], "SPS: truncated in level_idc (at bit 16 of 16)"),
        (REAL[:8], "SPS: truncated in frame_crop_left_offset (at bit 56 of 56)"),
        (
            b"\x67\x42\x00\x1e" + b"\x00" * 5,
            "SPS: Exp-Golomb code of seq_parameter_set_id has more than 31 leading zero bits",
        ),
        (SpsFields(sps_id=32).build(), "SPS: seq_parameter_set_id = 32 exceeds 31"),
        (SpsFields(chroma_format_idc=4).build(), "SPS: chroma_format_idc = 4 exceeds 3"),
        (SpsFields(bit_depth_minus8=7).build(), "SPS: bit_depth_luma_minus8 = 7 exceeds 6"),
        (SpsFields(log2_max_frame_num_minus4=13).build(), "SPS: log2_max_frame_num_minus4 = 13 exceeds 12"),
        (SpsFields(poc_type=3).build(), "SPS: pic_order_cnt_type = 3 exceeds 2"),
        (SpsFields(max_num_ref_frames=17).build(), "SPS: max_num_ref_frames = 17 exceeds 16"),
        (SpsFields(width_mbs_minus1=1055).build(), "SPS: pic_width_in_mbs_minus1 = 1055 exceeds 1054"),
        (
            SpsFields(height_map_units_minus1=600, frame_mbs_only=False).build(),
            "SPS: frame height of 1202 macroblocks exceeds 1055 (any level)",
        ),
        (
            SpsFields(width_mbs_minus1=999, height_map_units_minus1=999).build(),
            "SPS: frame of 1000x1000 macroblocks exceeds 139264 (any level)",
        ),
        (SpsFields(crop=(80, 80, 0, 0)).build(), "SPS: horizontal cropping of 320 leaves no picture"),
        (SpsFields(crop=(0, 0, 0, 121)).build(), "SPS: frame_crop_bottom_offset = 121 exceeds 120"),
        (SpsFields(crop=(0, 0, 60, 60)).build(), "SPS: vertical cropping of 240 leaves no picture"),
        (SpsFields(scaling_lists={0: [128]}).build(), "SPS: delta_scale of scaling list 0 = 128 exceeds 127"),
        (
            SpsFields(scaling_lists={6: explicit_list(64, 1)}).build()[:20],
            "SPS: truncated in delta_scale of scaling list 6",
        ),
    ],
)
def test_bad_sps_raises_a_precise_protocol_error(nal: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        SequenceParameterSet.parse(nal)
    assert str(info.value).startswith(message)


def test_every_truncation_before_the_last_field_is_refused() -> None:
    full = SequenceParameterSet.parse(REAL)
    for size in range(len(REAL)):
        try:
            sps = SequenceParameterSet.parse(REAL[:size])
        except ProtocolError:
            continue
        # Only the VUI (not read) may be cut away: the fields read must be those of the whole SPS.
        assert sps == full


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_bounds(sps: SequenceParameterSet) -> None:
    assert 1 <= sps.width_in_mbs <= MAX_MBS_PER_SIDE and 1 <= sps.height_in_mbs <= MAX_MBS_PER_SIDE
    assert sps.width_in_mbs * sps.height_in_mbs <= MAX_FRAME_MBS
    assert 0 < sps.width <= sps.coded_width and 0 < sps.height <= sps.coded_height


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([b"", b"\x67", b"\x67\x64", b"\x67\x64\x00\x1f"]))
def test_random_bytes_raise_only_protocol_errors(body: bytes, prefix: bytes) -> None:
    try:
        sps = SequenceParameterSet.parse(prefix + body)
    except ProtocolError:
        return
    _check_bounds(sps)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=6),
    st.integers(0, 60),
    st.sampled_from([REAL, sps_of(libx264_stream(643, 361, "yuv444p", "high444", "veryfast"))]),
)
def test_mutated_real_sps_raise_only_protocol_errors(
    edits: list[tuple[int, int]], cut: int, real: bytes
) -> None:
    data = bytearray(real)
    for pos, value in edits:
        data[pos % len(data)] = value
    try:
        sps = SequenceParameterSet.parse(bytes(data[: len(data) - cut % len(data)]))
    except ProtocolError:
        return
    _check_bounds(sps)
