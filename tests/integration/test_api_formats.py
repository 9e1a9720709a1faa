"""?format=coco-rle and ?format=polygons on real masks of the bundled demo model, decoded by an
independent library (pycocotools rasterizes both) and compared with the stored label map."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from pycocotools import mask as cocomask
from redis.asyncio import Redis
from support.api import describe_stream, make_key, running_api

from flowcloud.inference import Segmenter, SegmenterOptions
from flowcloud.labels import class_shares
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import MaskResult, MaskStore, encode_label_map
from flowcloud.settings import ApiSettings
from flowcloud.sizes import parse_size
from flowcloud.zoo import load_model
from training.synth import SceneSequence

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")
START = 1_700_000_000.0
FRAMES = (0, 40)


@dataclass
class Setup:
    client: httpx.Client
    maps: dict[int, np.ndarray]  # seq -> the class map the model predicted


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    loaded = load_model()
    height, width = parse_size(str(loaded.info.extra["input_size"]))
    segmenter = Segmenter(loaded, SegmenterOptions(size=(height, width)))
    scene = SceneSequence(11, width, height)
    frames = [np.ascontiguousarray(scene.frame(i)[0]) for i in FRAMES]
    maps = {seq: np.asarray(m, dtype=np.uint8) for seq, m in enumerate(segmenter.predict(frames))}
    results = [
        MaskResult(
            stream="cam-f",
            seq=seq,
            capture_ts=START + seq,
            recv_ts=START + seq,
            infer_start=START + seq,
            infer_end=START + seq,
            persisted_ts=START + seq,
            model=loaded.info.name,
            model_version=loaded.info.version,
            label_set=loaded.label_set.name,
            width=width,
            height=height,
            shares=class_shares(m, loaded.label_set.num_classes),
            labels_png=encode_label_map(m, loaded.label_set),
        )
        for seq, m in maps.items()
    ]

    async def write(url: str) -> None:
        redis = Redis.from_url(url)
        await MaskStore(redis).put_many(results)
        await describe_stream(redis, "cam-f", "acme", START)
        await redis.aclose()  # type: ignore[attr-defined,unused-ignore]

    with EmbeddedRedis(tmp_path_factory.mktemp("formats-redis"), appendonly=False) as server:
        asyncio.run(write(server.url))
        token = make_key(server.url, "reader", "acme")
        with (
            running_api(ApiSettings(redis_url=server.url)) as base,
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client,
        ):
            yield Setup(client, maps)


def _raster(ring: list[list[float]], height: int, width: int) -> np.ndarray:
    rle = cocomask.frPyObjects([np.ravel(ring).tolist()], height, width)
    return cocomask.decode(cocomask.merge(rle)).astype(bool)


def test_coco_rle_decodes_to_the_label_map_exactly(setup: Setup) -> None:
    for seq, truth in setup.maps.items():
        body = setup.client.get(f"/streams/cam-f/masks/{seq}", params={"format": "coco-rle"}).json()
        assert (body["height"], body["width"]) == truth.shape
        present = sorted(np.unique(truth).tolist())
        assert [a["category_id"] for a in body["annotations"]] == present
        assert len(present) >= 5  # a real street: several classes
        assert {c["id"]: c["name"] for c in body["categories"]}[present[0]] == body["annotations"][0][
            "category_name"
        ]
        for annotation in body["annotations"]:
            expected = truth == annotation["category_id"]
            decoded = cocomask.decode(annotation["segmentation"]).astype(bool)
            assert np.array_equal(decoded, expected), annotation["category_name"]
            assert annotation["area"] == int(cocomask.area(annotation["segmentation"])) == expected.sum()
            assert annotation["bbox"] == cocomask.toBbox(annotation["segmentation"]).astype(int).tolist()


def _decode_polygons(entry: dict, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    for polygon in entry["polygons"]:
        inside = _raster(polygon["exterior"], height, width)
        for hole in polygon["holes"]:
            inside &= ~_raster(hole, height, width)
        mask |= inside
    return mask


def test_polygons_round_trip_by_iou_and_simplify_with_a_tolerance(setup: Setup) -> None:
    for seq, truth in setup.maps.items():
        height, width = truth.shape
        exact = setup.client.get(f"/streams/cam-f/masks/{seq}", params={"format": "polygons"}).json()
        rough = setup.client.get(
            f"/streams/cam-f/masks/{seq}", params={"format": "polygons", "tolerance": 2.0}
        ).json()
        assert [c["id"] for c in exact["classes"]] == sorted(np.unique(truth).tolist())
        for entry, simple in zip(exact["classes"], rough["classes"], strict=True):
            expected = truth == entry["id"]
            decoded = _decode_polygons(entry, height, width)
            iou = (decoded & expected).sum() / (decoded | expected).sum()
            assert iou >= 0.99, (entry["name"], iou)
            vertices = sum(len(p["exterior"]) + sum(map(len, p["holes"])) for p in entry["polygons"])
            fewer = sum(len(p["exterior"]) + sum(map(len, p["holes"])) for p in simple["polygons"])
            assert fewer <= vertices
        total = sum(len(p["exterior"]) for c in exact["classes"] for p in c["polygons"])
        assert sum(len(p["exterior"]) for c in rough["classes"] for p in c["polygons"]) < total
    bad = setup.client.get("/streams/cam-f/masks/0", params={"format": "polygons", "tolerance": 1000})
    assert bad.status_code == 422
