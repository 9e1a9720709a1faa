"""The core data contracts: frames on the stream, mask results, settings and secrets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from flowcloud import keys
from flowcloud.frames import Frame, FrameFormatError, decode_image, encode_image
from flowcloud.labels import LABEL_IDS
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import MaskResult, MaskStore, decode_label_map, encode_label_map
from flowcloud.settings import ApiSettings, GatewaySettings, redact_url
from flowcloud.streams import StreamMeta
from flowcloud.tokens import hash_token, new_salt, new_token, verify_token
from flowcloud.workers import WorkerHeartbeat
from services.api.schemas import MaskBody


def _frame(rgb: np.ndarray, encoding: str) -> Frame:
    h, w = rgb.shape[:2]
    return Frame("cam-1", 7, 1000.25, 1000.5, w, h, encoding, encode_image(rgb, encoding))


def test_frame_round_trip_raw_and_jpeg() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    raw = _frame(rgb, "raw")
    fields = {
        k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in raw.to_fields().items()
    }
    back = Frame.from_fields(fields)
    assert back == raw
    np.testing.assert_array_equal(back.image(), rgb)
    smooth = np.zeros((24, 40, 3), dtype=np.uint8)
    smooth[:, :20] = (200, 30, 60)
    jpeg = _frame(smooth, "jpeg")
    assert np.abs(jpeg.image().astype(int) - smooth).mean() < 3


def test_malformed_frames_are_rejected() -> None:
    good = {
        k.encode(): str(v).encode()
        for k, v in _frame(np.zeros((8, 8, 3), np.uint8), "raw").to_fields().items()
    }
    missing = dict(good)
    del missing[keys.F_DATA.encode()]
    with pytest.raises(FrameFormatError, match="lacks field 'data'"):
        Frame.from_fields(missing)
    with pytest.raises(FrameFormatError, match="unknown frame encoding 'gif'"):
        Frame.from_fields({**good, keys.F_ENCODING.encode(): b"gif"})
    with pytest.raises(FrameFormatError, match="out of bounds"):
        Frame.from_fields({**good, keys.F_WIDTH.encode(): b"100000"})
    with pytest.raises(FrameFormatError, match="not a decodable JPEG"):
        decode_image(b"\xff\xd8garbage", "jpeg", 8, 8)
    with pytest.raises(FrameFormatError, match="raw frame has 3 bytes, expected 192"):
        decode_image(b"abc", "raw", 8, 8)


def test_label_map_png_is_lossless_and_coloured() -> None:
    class_map = np.random.default_rng(1).integers(0, 34, (30, 50), dtype=np.uint8)
    png = encode_label_map(class_map, LABEL_IDS)
    np.testing.assert_array_equal(decode_label_map(png), class_map)
    assert len(png) < class_map.size * 2


def test_mask_result_fields_round_trip() -> None:
    result = MaskResult(
        "cam-1", 3, 1.0, 1.1, 1.2, 1.3, 1.4, "m", "v1", LABEL_IDS.name, 4, 2, {7: 0.5, 26: 0.5}, b"png"
    )
    fields = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in result.to_fields().items()}
    assert MaskResult.from_fields(fields) == result
    assert result.metadata()["latency"] == pytest.approx(0.4)
    assert "labels_png" not in result.metadata()
    # The API's response schema states every metadata field, so that none is silently dropped.
    assert set(MaskBody.model_fields) == set(result.metadata())
    assert MaskBody.model_validate(result.metadata()).model_dump() == {
        **result.metadata(),
        "shares": {"7": 0.5, "26": 0.5},
    }


def test_settings_read_env_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCLOUD_REDIS_URL", "redis://:hunter2@redis:6379/1")
    monkeypatch.setenv("FLOWCLOUD_GATEWAY_PORT", "7100")
    monkeypatch.setenv("FLOWCLOUD_API_ADMIN_KEY", "s3cret-admin")
    gateway = GatewaySettings()
    assert gateway.port == 7100
    assert gateway.describe()["redis_url"] == "redis://:***@redis:6379/1"
    api = ApiSettings()
    assert api.admin_key is not None and api.admin_key.get_secret_value() == "s3cret-admin"
    text = repr(api) + str(api.describe())
    assert "s3cret-admin" not in text and "hunter2" not in text
    assert redact_url("redis://localhost:6379") == "redis://localhost:6379"


def test_settings_reject_typos_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="port"):
        GatewaySettings(port=70000)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        GatewaySettings(prot=1)  # type: ignore[call-arg]


def test_tokens_hash_and_verify() -> None:
    token, salt = new_token(), new_salt()
    digest = hash_token(token, salt)
    assert token not in digest and len(token) >= 40
    assert verify_token(token, salt, digest)
    assert not verify_token(token + "x", salt, digest)
    assert not verify_token("", salt, digest)
    assert not verify_token("x" * 10_000, salt, digest)
    assert hash_token(token, new_salt()) != digest


def test_embedded_redis_accepts_a_relative_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with EmbeddedRedis(Path("state") / "redis", appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
    assert (tmp_path / "state" / "redis" / "redis.log").is_file()


def test_mask_store_reads_with_and_without_label_maps(redis_url: str) -> None:
    results = [
        MaskResult(
            "cam-1", seq, 1.0, 1.1, 1.2, 1.3, 1.4, "m", "v1", LABEL_IDS.name, 4, 2, {7: 1.0}, b"png%d" % seq
        )
        for seq in (1, 2, 3)
    ]

    async def scenario() -> None:
        client = AsyncRedis.from_url(redis_url)
        store = MaskStore(client, max_per_stream=2)
        await store.put_many(results)
        await store.put_many(results[2:])  # the same frame twice leaves one result
        full = await store.get_many([("cam-1", 3), ("cam-1", 1), ("cam-9", 1)])
        assert full == [results[2], None, None]  # seq 1 was trimmed by the count bound
        meta_only = await store.get_many([("cam-1", 2), ("cam-1", 3)], labels=False)
        assert [r.labels_png if r else None for r in meta_only] == [b"", b""]
        assert [r.metadata() if r else None for r in meta_only] == [r.metadata() for r in results[1:]]
        assert await store.seqs("cam-1") == [3, 2]
        await client.aclose()

    asyncio.run(scenario())


def test_stream_meta_round_trip_through_redis_and_lenient_reading(redis_url: str) -> None:
    meta = StreamMeta(device="cam-1", tenant="acme", width=640, height=480, fps=29.97, started=1e9 + 0.1)
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.stream_meta("cam-1"), mapping=meta.to_fields())  # type: ignore[arg-type]
    client.hincrby(keys.stream_meta("cam-1"), keys.M_LAST_SEQ, 12)
    read = StreamMeta.from_fields(client.hgetall(keys.stream_meta("cam-1")))
    assert read == StreamMeta(
        device="cam-1", tenant="acme", width=640, height=480, fps=29.97, started=1e9 + 0.1, last_seq=12
    )
    assert StreamMeta(status=keys.STATUS_IDLE).to_fields() == {keys.M_STATUS: keys.STATUS_IDLE}
    assert StreamMeta.from_fields({b"width": b"wide", b"fps": b"30"}) == StreamMeta(fps=30.0)
    client.close()


def test_worker_heartbeat_keeps_known_fields_typed_and_passes_new_ones_on() -> None:
    beat = WorkerHeartbeat.from_fields({"model": "demo", "batch_size": 8, "queue_depth": 3})
    beat.state, beat.heartbeat = keys.WORKER_READY, 1e9 + 0.5
    fields = {k.encode(): v.encode() for k, v in beat.to_fields().items()}
    read = WorkerHeartbeat.from_fields(fields)
    assert read.ready and (read.model, read.batch_size, read.heartbeat) == ("demo", 8, 1e9 + 0.5)
    assert read.extra == {"queue_depth": "3"}
    assert read.describe() == {
        "state": "ready",
        "heartbeat": 1e9 + 0.5,
        "model": "demo",
        "batch_size": 8,
        "queue_depth": "3",
    }
