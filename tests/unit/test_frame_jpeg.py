"""JPEG frame bytes from BGR pixels (the gateway decoder's path) are the same wire format as from RGB."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from flowcloud.frames import FrameFormatError, decode_image, encode_bgr_jpeg, encode_image


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


def _scene(width: int = 96, height: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1).astype(np.uint8)
    rgb[10:30, 20:50] = (220, 30, 40)  # a red block: a channel swap would show as blue
    return rgb


def test_bgr_jpeg_is_byte_identical_to_the_rgb_path() -> None:
    rgb = _scene()
    for quality in (50, 90):
        data = encode_bgr_jpeg(np.ascontiguousarray(rgb[:, :, ::-1]), quality)
        assert data == encode_image(rgb, "jpeg", quality)
    decoded = decode_image(encode_bgr_jpeg(np.ascontiguousarray(rgb[:, :, ::-1])), "jpeg", 96, 64)
    assert decoded.shape == (64, 96, 3)
    red = decoded[15:25, 25:45].reshape(-1, 3).mean(axis=0)
    assert red[0] > 180 and red[2] < 90, red
    assert _psnr(decoded, rgb) > 30


def test_quality_trades_size() -> None:
    bgr = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    assert len(encode_bgr_jpeg(bgr, 30)) < len(encode_bgr_jpeg(bgr, 90))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)],
)
def test_bad_pixels_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(FrameFormatError, match="HxWx3 uint8"):
        encode_bgr_jpeg(bad)


def test_swscale_bgr24_matches_the_rgb24_path_on_decoded_h264() -> None:
    """What the decoder process does (scale an H.264 picture to bgr24, JPEG) against the RGB path."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = 320, 240, "yuv420p"
    enc.time_base = Fraction(1, 30)
    enc.options = {"preset": "ultrafast", "tune": "zerolatency"}
    yy, xx = np.mgrid[0:240, 0:320]
    img = np.stack([xx * 255 // 320, yy * 255 // 240, (xx // 2 + yy // 2) % 256], axis=-1).astype(np.uint8)
    img[60:140, 100:220] = (230, 40, 40)
    packets = list(enc.encode(av.VideoFrame.from_ndarray(img, format="rgb24"))) + list(enc.encode(None))
    dec = av.CodecContext.create("h264", "r")
    pictures = [p for packet in packets for p in dec.decode(packet)] + list(dec.decode(None))
    assert pictures
    picture = pictures[0]
    via_rgb = encode_image(picture.reformat(256, 128, "rgb24", interpolation="BILINEAR").to_ndarray())
    via_bgr = encode_bgr_jpeg(picture.reformat(256, 128, "bgr24", interpolation="BILINEAR").to_ndarray())
    a, b = decode_image(via_rgb, "jpeg", 256, 128), decode_image(via_bgr, "jpeg", 256, 128)
    assert _psnr(a, b) > 40
    reference = picture.reformat(format="rgb24", width=256, height=128, interpolation="BICUBIC").to_ndarray()
    assert _psnr(b, reference) > _psnr(a, reference) - 1.0
    assert abs(len(via_bgr) - len(via_rgb)) < 0.1 * len(via_rgb)
