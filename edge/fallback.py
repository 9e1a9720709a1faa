"""The fallback model on the device: segment a subsample of pictures while the cloud is away.

`flowcloud edge --fallback-model [FILE]` (the bundled compact demo model,
``flowcloud/models/demo.onnx``, without a file). When no live session has streamed for
``fallback_after`` seconds, the capture thread offers its pictures to a `FallbackRunner`; its own
thread segments the newest one it was offered whenever it is free, at most ``max_fps`` a second,
so the subsample follows what the CPU allows and capture never waits. The model runs from its
exported ONNX file with onnxruntime (one thread): the device never needs torch. Each mask is
kept on disk in the result format (metadata JSON and a palette PNG) and, once a live session is up
again, `sync_masks` sends them to the gateway on a connection whose HELLO says ``masks``; the
gateway stores them marked ``producer: edge``, beside any cloud result for the same frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge import metrics
from edge.frames import Picture, StreamShape
from edge.sender import Sender
from flowcloud.labels import LABEL_SETS, class_shares
from flowcloud.protocol.edge_mask import EdgeMask
from flowcloud.protocol.framing import frame
from flowcloud.protocol.handshake import Hello, StreamInfo
from flowcloud.results import encode_label_map

log = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "flowcloud" / "models" / "demo.onnx"
MAX_STORED = 10_000  # masks kept on disk at most; the oldest go first (counted)


class FallbackError(Exception):
    """A fallback model file that cannot be used (one line for the operator)."""


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    label_set: str
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class FallbackModel:
    """An exported FlowCloud model (``flowcloud export --onnx``) run with onnxruntime on the CPU."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime  # the edge extra; imported only when a fallback model is asked for

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid files
            raise FallbackError(f"fallback model {path}: {exc}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            height, width = (int(v) for v in meta["flowcloud.input_size"].split("x"))
            self.identity = ModelIdentity(
                meta["flowcloud.model"],
                meta["flowcloud.version"],
                meta["flowcloud.label_set"],
                height,
                width,
                tuple(float(v) for v in meta["flowcloud.mean"].split(",")),
                tuple(float(v) for v in meta["flowcloud.std"].split(",")),
            )
        except (KeyError, ValueError):
            raise FallbackError(f"fallback model {path}: not exported by `flowcloud export --onnx`") from None
        if self.identity.label_set not in LABEL_SETS:
            raise FallbackError(f"fallback model {path}: unknown label set {self.identity.label_set!r}")
        self.label_set = LABEL_SETS[self.identity.label_set]
        self.input = self.session.get_inputs()[0].name
        scale = np.float32(255.0)
        self._mean = (np.array(self.identity.mean, np.float32) * scale).reshape(1, 3, 1, 1)
        self._std = (np.array(self.identity.std, np.float32) * scale).reshape(1, 3, 1, 1)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 picture -> its class map at the model's input size (uint8)."""
        i = self.identity
        resized = cv2.resize(rgb, (i.width, i.height), interpolation=cv2.INTER_AREA)
        batch = (resized.transpose(2, 0, 1)[None].astype(np.float32) - self._mean) / self._std
        logits = self.session.run(None, {self.input: batch})[0]
        return np.asarray(logits[0].argmax(axis=0), dtype=np.uint8)


class FallbackRunner:
    """Segments the newest offered picture on its own thread and stores the masks in ``directory``."""

    def __init__(self, model: FallbackModel, directory: Path, max_fps: float = 1.0) -> None:
        self.model = model
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.min_interval = 1.0 / max_fps
        self.made = 0
        self._latest: Picture | None = None
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="edge-fallback", daemon=True)
        self._thread.start()

    def offer(self, picture: Picture) -> None:
        """From the capture thread: the newest picture replaces any the runner has not taken."""
        with self._wake:
            self._latest = picture
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._latest is None and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                picture, self._latest = self._latest, None
            assert picture is not None
            started = time.perf_counter()
            try:
                self._store(picture, self.model.segment(picture.image), time.perf_counter() - started)
            except (OSError, ValueError, RuntimeError) as exc:
                metrics.FALLBACK_MASKS.labels("failed").inc()
                log.warning("fallback model: %s", exc)
            # The subsample: never more than max_fps, and never more than the CPU allows.
            time.sleep(max(0.0, self.min_interval - (time.perf_counter() - started)))

    def _store(self, picture: Picture, class_map: np.ndarray, seconds: float) -> None:
        i = self.model.identity
        mask = EdgeMask(
            picture.capture_time,
            i.name,
            i.version,
            i.label_set,
            int(class_map.shape[1]),
            int(class_map.shape[0]),
            seconds,
            class_shares(class_map, self.model.label_set.num_classes),
            encode_label_map(class_map, self.model.label_set),
        )
        name = f"{round(picture.capture_time * 1_000_000):017d}"
        tmp = self.directory / f"{name}.tmp"
        tmp.write_bytes(mask.to_bytes())
        tmp.replace(self.directory / f"{name}.json")  # whole or absent, even after kill -9
        self.made += 1
        metrics.FALLBACK_MASKS.labels("made").inc()
        metrics.FALLBACK_SECONDS.observe(seconds)
        stored = sorted(self.directory.glob("*.json"))
        for old in stored[: max(0, len(stored) - MAX_STORED)]:
            old.unlink(missing_ok=True)
            metrics.FALLBACK_MASKS.labels("evicted").inc()


async def sync_masks(directory: Path, sender: Sender, shape: StreamShape) -> int:
    """Send the stored masks to the gateway (oldest first); they are deleted once the gateway has
    closed the connection after storing them all. How many were synced; raises on connection
    errors (then every mask stays for the next try: the gateway's writes are idempotent)."""
    files = sorted(directory.glob("*.json"))
    if not files:
        return 0
    stream = StreamInfo(shape.width, shape.height, shape.fps, masks=True)
    reader, writer, _, _ = await sender.connect(Hello(sender.device_id, sender.token, stream))
    try:
        for path in files:
            writer.write(frame(path.read_bytes()))
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(30):
            await reader.read()  # the gateway closes once it has stored every mask
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await writer.wait_closed()
    for path in files:
        path.unlink(missing_ok=True)
    metrics.FALLBACK_MASKS.labels("synced").inc(len(files))
    log.info("fallback: %d mask(s) synced to the cloud", len(files))
    return len(files)


def load_stored(path: Path) -> EdgeMask:
    """A stored mask (for inspection and tests)."""
    return EdgeMask.parse(path.read_bytes())
