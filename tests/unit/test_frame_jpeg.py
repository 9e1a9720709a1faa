"""JPEG frame bytes: from RGB, from the 4:2:0 planes the gateway's decoder holds, and back."""

from __future__ import annotations

import av
import numpy as np
import pytest

from flowcloud.frames import FrameFormatError, decode_image, encode_image, encode_yuv420_jpeg
from flowcloud.x264 import libx264_encoder
from services.gateway.decoder import DecoderConfig, PictureEncoder

RED = (230, 40, 40)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


def _scene(width: int = 320, height: int = 240) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx // 2 + yy // 2) % 256], axis=-1).astype(
        np.uint8
    )
    rgb[height // 4 : height // 2, width // 3 : 2 * width // 3] = RED  # a channel swap would show as blue
    return rgb


def _h264_picture(rgb: np.ndarray, bt709: bool = False) -> av.VideoFrame:
    """``rgb`` through libx264 and back: a decoded 4:2:0 picture (BT.709, and labelled so, if asked)."""
    height, width = rgb.shape[:2]
    enc = libx264_encoder(
        width, height, 30, options={"qp": "10"}, x264_params={"colormatrix": "bt709"} if bt709 else None
    )
    picture = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if bt709:
        picture = picture.reformat(format="yuv420p", dst_colorspace="itu709")
    packets = list(enc.encode(picture)) + list(enc.encode(None))
    dec = av.CodecContext.create("h264", "r")
    pictures = [p for packet in packets for p in dec.decode(packet)] + list(dec.decode(None))
    assert len(pictures) == 1
    return pictures[0]


def test_rgb_jpeg_round_trip_keeps_colours() -> None:
    rgb = _scene(96, 64)
    decoded = decode_image(encode_image(rgb, "jpeg", 90), "jpeg", 96, 64)
    assert decoded.shape == (64, 96, 3)
    red = decoded[20:28, 40:60].reshape(-1, 3).mean(axis=0)
    assert np.abs(red - RED).max() < 12, red
    assert _psnr(decoded, rgb) > 30


def test_quality_trades_size() -> None:
    rgb = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    assert len(encode_image(rgb, "jpeg", 30)) < len(encode_image(rgb, "jpeg", 90))


def test_yuv_planes_give_the_picture_the_rgb_path_gives() -> None:
    """What the gateway's decoder does (scale to yuvj420p, compress the planes) against the RGB path."""
    picture = _h264_picture(_scene())
    assert picture.format.name == "yuv420p"  # limited range: swscale must expand it to JFIF's full range
    config = DecoderConfig(out_width=256, out_height=128)
    via_planes = PictureEncoder(config).encode(picture)
    rgb = picture.reformat(256, 128, "rgb24", interpolation="BILINEAR").to_ndarray()
    via_rgb = encode_image(rgb)
    a, b = decode_image(via_planes, "jpeg", 256, 128), decode_image(via_rgb, "jpeg", 256, 128)
    assert _psnr(a, b) > 36
    assert abs(float(a.std()) - float(b.std())) < 1.0  # a range error would change the contrast by 14 %
    red = a[40:60, 100:150].reshape(-1, 3).mean(axis=0)
    assert np.abs(red - RED).max() < 12, red
    assert abs(len(via_planes) - len(via_rgb)) < 0.1 * len(via_rgb)


def test_strided_planes_are_read_row_by_row() -> None:
    rgb = _scene(64, 32)
    yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p").to_ndarray()
    y, u, v = yuv[:32], yuv[32:40].reshape(16, 32), yuv[40:48].reshape(16, 32)
    padded = np.zeros((32, 96), np.uint8)  # a row pitch wider than the picture, like FFmpeg's
    padded[:, :64] = y
    strided = encode_yuv420_jpeg(padded[:, :64], u, v)
    assert strided == encode_yuv420_jpeg(np.ascontiguousarray(y), u, v)
    assert _psnr(decode_image(strided, "jpeg", 64, 32), rgb) > 28


def test_bt709_pictures_are_converted_to_bt601_to_keep_their_colours() -> None:
    """JFIF is BT.601: planes from a BT.709 camera, stored as they are, would shift red towards orange.
    The decoder converts the scaled planes' matrix and gives the picture the RGB route gives."""
    picture = _h264_picture(_scene(), bt709=True)
    assert picture.colorspace not in PictureEncoder.JFIF_MATRICES
    encoder = PictureEncoder(DecoderConfig(256, 128))
    decoded = decode_image(encoder.encode(picture), "jpeg", 256, 128)
    red = decoded[40:60, 100:150].reshape(-1, 3).mean(axis=0)
    assert np.abs(red - RED).max() < 12, red
    via_rgb = decode_image(encode_image(encoder.scale(picture, "rgb24").to_ndarray()), "jpeg", 256, 128)
    assert _psnr(decoded, via_rgb) > 36
    assert np.abs(decoded.reshape(-1, 3).mean(axis=0) - via_rgb.reshape(-1, 3).mean(axis=0)).max() < 1.5
    # What storing the planes as they are would have given: the same block in other colours.
    yuv = picture.reformat(256, 128, "yuvj420p").to_ndarray()
    y, u, v = yuv[:128], yuv[128:160].reshape(64, 128), yuv[160:192].reshape(64, 128)
    wrong = decode_image(encode_yuv420_jpeg(y, u, v), "jpeg", 256, 128)
    assert np.abs(wrong[40:60, 100:150].reshape(-1, 3).mean(axis=0) - RED).max() > 15
    assert _psnr(wrong, via_rgb) < 30


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)],
)
def test_bad_pixels_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(FrameFormatError, match="HxWx3 uint8"):
        encode_image(bad)


def test_bad_planes_are_refused() -> None:
    y, c = np.zeros((16, 16), np.uint8), np.zeros((8, 8), np.uint8)
    with pytest.raises(FrameFormatError, match="4:2:0 planes"):
        encode_yuv420_jpeg(y, np.zeros((16, 16), np.uint8), c)
    with pytest.raises(FrameFormatError, match="uint8"):
        encode_yuv420_jpeg(y.astype(np.uint16), c, c)


def test_bad_jpeg_is_refused_before_or_while_decoding() -> None:
    good = encode_image(_scene(64, 32))
    with pytest.raises(FrameFormatError, match="not a decodable JPEG"):
        decode_image(good[: len(good) // 2], "jpeg", 64, 32)  # truncated: strict decoding says so
    with pytest.raises(FrameFormatError, match="JPEG is 64x32, entry says 6400x3200"):
        decode_image(good, "jpeg", 6400, 3200)
