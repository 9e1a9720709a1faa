"""Label maps in standard formats: COCO run-length encoding (one RLE per class present, as
COCO-stuff does) and polygons per class (pixel-exact outlines, optionally simplified).

RLE: runs over the pixels in column-major order, starting with a run of zeros, in COCO's
compressed string form (``pycocotools.mask.decode`` reads it). Polygons: the union of the class's
pixel squares, so outlines run along pixel edges (coordinates in pixels, origin at the top-left
corner of the image) and holes are kept; ``tolerance`` simplifies them (Douglas-Peucker, pixels).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowcloud.labels import LabelSet

MAX_TOLERANCE = 50.0  # pixels


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary HxW mask in column-major order, starting with zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(edges).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def compress_counts(counts: list[int]) -> str:
    """COCO's compressed RLE string: LEB128-like, 5 bits per character (from the 3rd run on,
    each run is stored as the difference to the run two before)."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _bbox(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _category(label_set: LabelSet, class_id: int) -> dict[str, Any]:
    name = label_set.class_names[class_id] if class_id < label_set.num_classes else str(class_id)
    return {"id": class_id, "name": name}


def coco_rle(class_map: np.ndarray, label_set: LabelSet) -> dict[str, Any]:
    """One COCO RLE annotation per class present, with the categories they refer to."""
    height, width = class_map.shape
    annotations = []
    for class_id in np.unique(class_map).tolist():
        mask = class_map == class_id
        annotations.append(
            {
                "category_id": class_id,
                "category_name": _category(label_set, class_id)["name"],
                "area": int(mask.sum()),
                "bbox": _bbox(mask),
                "segmentation": {"size": [height, width], "counts": compress_counts(rle_counts(mask))},
            }
        )
    return {
        "label_set": label_set.name,
        "width": width,
        "height": height,
        "categories": [_category(label_set, a["category_id"]) for a in annotations],
        "annotations": annotations,
    }


def _rings(geometry: Any) -> list[dict[str, Any]]:
    from shapely.geometry import MultiPolygon, Polygon

    parts = geometry.geoms if isinstance(geometry, MultiPolygon) else [geometry]
    out = []
    for part in parts:
        if not isinstance(part, Polygon) or part.is_empty:
            continue
        out.append(
            {
                "exterior": [[float(x), float(y)] for x, y in part.exterior.coords[:-1]],
                "holes": [[[float(x), float(y)] for x, y in ring.coords[:-1]] for ring in part.interiors],
            }
        )
    return out


def class_polygons(mask: np.ndarray, tolerance: float = 0.0) -> list[dict[str, Any]]:
    """The outlines of a binary mask: polygons with exteriors and holes, along pixel edges."""
    import shapely

    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)  # each row's runs: row-major order pairs starts and ends
    _rows, ends = np.nonzero(steps == -1)
    boxes = shapely.box(starts, rows, ends, rows + 1)
    geometry = shapely.union_all(boxes, grid_size=1.0)  # integer corners: exact, no slivers
    if tolerance > 0:
        geometry = geometry.simplify(tolerance, preserve_topology=True)
    return _rings(geometry)


def polygons(class_map: np.ndarray, label_set: LabelSet, tolerance: float = 0.0) -> dict[str, Any]:
    """Per class present: its name and id, pixel area and outlines."""
    height, width = class_map.shape
    classes = []
    for class_id in np.unique(class_map).tolist():
        mask = class_map == class_id
        classes.append(
            {
                **_category(label_set, class_id),
                "area": int(mask.sum()),
                "polygons": class_polygons(mask, tolerance),
            }
        )
    return {
        "label_set": label_set.name,
        "width": width,
        "height": height,
        "tolerance": tolerance,
        "classes": classes,
    }
