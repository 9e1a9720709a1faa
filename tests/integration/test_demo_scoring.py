"""`flowcloud demo` scores every segmented frame, however late its mask arrives: frames noted while
they were in the stream's short recent window are scored when their masks appear, long after the
window has moved on (real redis-server, the generator's real scenes)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from edge.sources import SYNTHETIC_SEED
from flowcloud import keys
from flowcloud.cli.demo import SceneOracle, StreamScorer
from flowcloud.frames import Frame, encode_image
from flowcloud.labels import TRAIN_IDS
from flowcloud.results import MaskResult, MaskStore, encode_label_map
from training.synth import SceneSequence

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 128, 96
WINDOW = 4  # frames the recent window holds
STREAM = "demo-cam"


def mask_of(seq: int, labels: np.ndarray, capture_ts: float) -> MaskResult:
    png = encode_label_map(TRAIN_IDS.from_label_ids(labels), TRAIN_IDS)
    return MaskResult(
        STREAM, seq, capture_ts, capture_ts, capture_ts, capture_ts, capture_ts + 5.0,
        "demo", "1", TRAIN_IDS.name, WIDTH, HEIGHT, labels_png=png,
    )  # fmt: skip


def test_masks_are_scored_after_their_frames_left_the_recent_window(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    scenes = SceneSequence(SYNTHETIC_SEED, WIDTH, HEIGHT)
    base_seq = 100
    lost = {5}  # lost on the way (seq 106 shows scene 6): the scorer finds the scene by the picture
    shown = [i for i in range(16) if i not in lost]
    scorer = StreamScorer(client, STREAM, base_seq, SceneOracle(WIDTH, HEIGHT))
    for n, index in enumerate(shown):
        picture = encode_image(scenes.frame(index)[0])
        frame = Frame(STREAM, base_seq + 1 + n, float(n), float(n), WIDTH, HEIGHT, "jpeg", picture)
        client.xadd(keys.stream_frames(STREAM), frame.to_fields(), maxlen=WINDOW)  # type: ignore[arg-type]
        if n % WINDOW == WINDOW - 1:
            scorer.note_frames()  # as the demo does every second
    scorer.note_frames()
    assert client.xlen(keys.stream_frames(STREAM)) == WINDOW

    # Every mask arrives only now, when 11 of the 15 frames have left the window; each is the exact
    # labels of its scene, so a frame matched to the wrong scene lowers the score. Seq 200 was
    # never noted.
    masks = [mask_of(base_seq + 1 + n, scenes.frame(index)[1], float(n)) for n, index in enumerate(shown)]
    unnoted = mask_of(200, scenes.frame(20)[1], 0.0)

    async def store() -> None:
        aclient = AsyncRedis.from_url(redis_url)
        await MaskStore(aclient).put_many([*masks, unnoted])
        await aclient.aclose()

    asyncio.run(store())
    scorer.score_masks()
    miou, accuracy, scored = scorer.score.result()
    assert scored == len(shown) and scorer.unmatched == 1
    assert (miou, accuracy) == (1.0, 1.0)
    scorer.score_masks()  # nothing new: nothing scored twice
    assert scorer.score.result()[2] == len(shown)
    client.close()
