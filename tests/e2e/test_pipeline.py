"""The whole platform in real processes: edge -> gateway -> Redis -> worker -> API.

The edge streams the synthetic street scenes (H.264 over RTP over TCP), the gateway decodes and
resizes them, a worker segments them with the bundled demo model, and the masks are fetched
through the API and scored against the generator's exact ground truth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from support.waiting import wait_for

from flowcloud import tokens
from flowcloud.cli.demo import DEMO_DEVICE, SceneOracle, recent_frames, register_demo_device, score_masks
from flowcloud.results import MaskResult
from flowcloud.stack import Service, Stack, StackConfig
from flowcloud.zoo import DEMO_WEIGHTS

FRAMES = 24
WIDTH, HEIGHT = 480, 360


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    assert DEMO_WEIGHTS.is_file(), "the bundled demo model is missing"
    config = StackConfig.on_free_ports(
        tmp_path / "stack",
        admin_key=tokens.new_token(),
        env={"FLOWCLOUD_WORKER_MODE": "complete", "FLOWCLOUD_WORKER_BATCH_SIZE": "4"},
    )
    with Stack(config) as running:
        yield running


def test_edge_to_api_masks_match_ground_truth(stack: Stack) -> None:
    token = asyncio.run(register_demo_device(stack.redis_url))
    edge = Service(
        "edge",
        [
            "edge", "--gateway", stack.gateway_address, "--device-id", DEMO_DEVICE, "--source", "synthetic",
            "--width", str(WIDTH), "--height", str(HEIGHT), "--fps", "10", "--frames", str(FRAMES),
            "--metrics-port", "0",
        ],
        {"FLOWCLOUD_EDGE_TOKEN": token},
        log_path=stack.config.data_dir / "edge.log",
    )  # fmt: skip
    edge.start()
    assert edge.process is not None
    assert edge.process.wait(timeout=180) == 0, (stack.config.data_dir / "edge.log").read_text()[-2000:]

    auth = {"Authorization": f"Bearer {stack.config.admin_key}"}
    with httpx.Client(base_url=stack.api_url, headers=auth, timeout=10) as api:

        def all_segmented() -> bool:
            reply = api.get(f"/streams/{DEMO_DEVICE}/masks", params={"limit": 100})
            return reply.status_code == 200 and len(reply.json()["items"]) == FRAMES

        wait_for(f"{FRAMES} masks", all_segmented, 180, step=0.5)
        items = api.get(f"/streams/{DEMO_DEVICE}/masks", params={"limit": 100}).json()["items"]
        seqs = [item["seq"] for item in items]
        assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == FRAMES
        stream = api.get(f"/streams/{DEMO_DEVICE}").json()
        assert (stream["width"], stream["height"]) == (WIDTH, HEIGHT)
        masks = {}
        for item in items:
            png = api.get(f"/streams/{DEMO_DEVICE}/masks/{item['seq']}", params={"format": "labels"})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            fields = {k: v for k, v in item.items() if k not in ("latency", "stages")}
            fields["shares"] = {int(k): v for k, v in fields["shares"].items()}
            masks[item["seq"]] = MaskResult(**fields, labels_png=png.content)
            assert item["capture_ts"] <= item["recv_ts"] + 0.05 <= item["persisted_ts"] + 0.05
            # Every stage is stamped, from the edge's send to the write, and the stages add up.
            assert None not in item["stages"].values()
            assert sum(item["stages"].values()) == pytest.approx(item["latency"], abs=1e-6)

    client = redis.Redis.from_url(stack.redis_url)
    frames = recent_frames(client, DEMO_DEVICE, 0)
    client.close()
    assert sorted(frames) == sorted(masks)
    miou, accuracy, scored = score_masks(frames, masks, 0, SceneOracle(WIDTH, HEIGHT))
    assert scored == FRAMES
    assert miou is not None and accuracy is not None
    print(f"end-to-end mIoU {miou:.3f}, pixel accuracy {accuracy:.3f} over {scored} frames")
    assert miou >= 0.6
