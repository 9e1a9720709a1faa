"""Mask images for people: the stored label PNG, the colour mask, and the overlay on its frame.

Rendering decodes a PNG, colours it and encodes PNG/JPEG: milliseconds of CPU, so the routes run
it in a thread. Results never change once written, so renders are kept in a small LRU cache
keyed by (stream, seq, format).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from threading import Lock

import cv2
import numpy as np

from flowcloud import mask_formats
from flowcloud.frames import Frame
from flowcloud.labels import blend_overlay, get_label_set
from flowcloud.results import MaskResult, decode_label_map

PNG = "image/png"
JPEG = "image/jpeg"
OVERLAY_ALPHA = 0.5
JPEG_QUALITY = 85


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def color_mask(result: MaskResult) -> np.ndarray:
    """The result's class map in the official colours of its label set (HxWx3 RGB)."""
    return get_label_set(result.label_set).colorize(decode_label_map(result.labels_png))


def color_png(result: MaskResult) -> bytes:
    return _png(color_mask(result))


def overlay_rgb(result: MaskResult, frame: Frame, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The colour mask blended onto its frame, at the frame's size (the mask is scaled NEAREST)."""
    image = frame.image()
    colors = color_mask(result)
    if colors.shape[:2] != image.shape[:2]:
        colors = cv2.resize(colors, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    return blend_overlay(image, colors, alpha)


def overlay_jpeg(result: MaskResult, frame: Frame) -> bytes:
    return jpeg(overlay_rgb(result, frame))


def export_json(result: MaskResult, fmt: str, tolerance: float = 0.0) -> bytes:
    """The result's label map as COCO RLE (``coco-rle``) or polygons (``polygons``), JSON."""
    class_map = decode_label_map(result.labels_png)
    label_set = get_label_set(result.label_set)
    if fmt == "coco-rle":
        body = mask_formats.coco_rle(class_map, label_set)
    else:
        body = mask_formats.polygons(class_map, label_set, tolerance)
    return json.dumps({"stream": result.stream, "seq": result.seq, **body}).encode()


class RenderCache:
    """A thread-safe LRU of rendered images: (stream, seq, format) -> bytes."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()
        self._lock = Lock()

    def get(self, key: tuple[str, int, str]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int, str], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
