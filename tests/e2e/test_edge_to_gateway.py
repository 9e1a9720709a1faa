"""Edge -> gateway -> Redis with real processes: `flowcloud devices add`, `flowcloud gateway`,
`flowcloud edge`. Frame count, order, dimensions and capture times are checked on the Redis
frames stream; the edge survives a gateway restart; a GStreamer `rtph264pay ! rtpstreampay`
stream passes the edge's rfc4571:// relay and the gateway with every frame decoded."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from support.cli import REPO, add_device, flowcloud
from support.frames import frames_on_redis
from support.waiting import wait_for, wait_listening

from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.redis_server import free_port

pytestmark = pytest.mark.timeout(180)

DEVICE = "e2e-edge"
WIDTH, HEIGHT, FPS = 160, 120, 30
MODEL_H, MODEL_W = 64, 96


@contextmanager
def gateway(redis_url: str, port: int) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "FLOWCLOUD_GATEWAY_HOST": "127.0.0.1"}
    cmd = flowcloud("gateway", "--redis-url", redis_url, "--port", str(port), "--metrics-port", "0")
    cmd += ["--model-size", f"{MODEL_H}x{MODEL_W}", "--frame-encoding", "raw"]
    process = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_listening(port)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        process.communicate()


def edge(port: int, token: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, **(env or {}), "FLOWCLOUD_EDGE_TOKEN": token}
    cmd = flowcloud(
        "edge", "--gateway", f"127.0.0.1:{port}", "--device-id", DEVICE, "--source", "synthetic",
        "--width", str(WIDTH), "--height", str(HEIGHT), "--fps", str(FPS), "--encoder", "libx264",
        "--keyframe-interval", "10", "--mtu", "800", "--metrics-port", "0", "--json", *args,
    )  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_frames(redis_url: str, count: int, timeout: float = 30.0) -> list[Frame]:
    """The device's frames on Redis once there are ``count`` of them (fails after ``timeout``)."""

    def enough() -> bool:
        return len(frames_on_redis(redis_url, DEVICE)) >= count

    wait_for(f"{count} frames of {DEVICE} on Redis", enough, timeout, step=0.2)
    return frames_on_redis(redis_url, DEVICE)


def test_synthetic_edge_to_gateway_to_redis(redis_url: str) -> None:
    token = add_device(redis_url, DEVICE)
    port = free_port()
    frames_sent = 30
    with gateway(redis_url, port):
        started = time.time()
        process = edge(port, token, "--frames", str(frames_sent))
        out, err = process.communicate(timeout=120)
        finished = time.time()
        assert process.returncode == 0, err
        assert json.loads(out) == {"captured": frames_sent, "sent": frames_sent, "sessions": 1}
        frames = wait_frames(redis_url, frames_sent)
    assert len(frames) == frames_sent
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == frames_sent
    assert {(f.width, f.height) for f in frames} == {(MODEL_W, MODEL_H)}
    assert all(len(f.data) == MODEL_W * MODEL_H * 3 for f in frames)
    assert frames[0].image().shape == (MODEL_H, MODEL_W, 3)
    # Capture times: edge clock mapped to the gateway's (same host: offset ~ 0), in order, paced.
    captures = [f.capture_ts for f in frames]
    assert all(started - 0.5 <= t <= finished + 0.5 for t in captures)
    assert captures == sorted(captures)
    gaps = [b - a for a, b in itertools.pairwise(captures)]
    assert all(0 < g < 0.5 for g in gaps)
    assert (frames_sent - 1) / FPS * 0.8 < captures[-1] - captures[0] < (frames_sent - 1) / FPS * 3
    assert all(f.recv_ts >= f.capture_ts - 0.05 for f in frames)
    meta = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(keys.stream_meta(DEVICE))
    assert (int(meta[keys.M_WIDTH]), int(meta[keys.M_HEIGHT])) == (WIDTH, HEIGHT)
    assert float(meta[keys.M_FPS]) == FPS


def test_edge_survives_a_gateway_restart_and_stops_on_sigterm(redis_url: str) -> None:
    token = add_device(redis_url, DEVICE)
    port = free_port()
    with gateway(redis_url, port):
        process = edge(port, token, "--duration", "60", env={"FLOWCLOUD_EDGE_RECONNECT_MAX_DELAY": "0.5"})
        first = wait_frames(redis_url, 10)
        assert len(first) >= 10
    # The gateway went away; the edge keeps capturing and redials with backoff until it is back.
    with gateway(redis_url, port):
        before = len(frames_on_redis(redis_url, DEVICE))
        after = wait_frames(redis_url, before + 10)
        assert len(after) >= before + 10
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    summary = json.loads(out)
    assert summary["sessions"] == 2 and summary["sent"] >= len(after)
    seqs = [f.seq for f in frames_on_redis(redis_url, DEVICE)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_gstreamer_stream_through_the_edge_relay_and_the_gateway(redis_url: str) -> None:
    token = add_device(redis_url, DEVICE)
    port, relay_port = free_port(), free_port()
    frames_sent = 30
    with gateway(redis_url, port):
        process = edge(
            port, token, "--source", f"rfc4571://127.0.0.1:{relay_port}", "--frames", str(frames_sent)
        )
        wait_listening(relay_port)  # this probe connection is an upstream that sends nothing
        pipeline = (
            f"videotestsrc num-buffers={frames_sent} pattern=ball ! "
            "video/x-raw,width=192,height=128,framerate=30/1 ! "
            "x264enc tune=zerolatency key-int-max=10 bitrate=300 ! "
            "rtph264pay config-interval=1 mtu=600 ! rtpstreampay ! "
            f"tcpclientsink host=127.0.0.1 port={relay_port}"
        )
        subprocess.run(
            ["gst-launch-1.0", "-q", *pipeline.split()], check=True, timeout=60, capture_output=True
        )
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert json.loads(out)["sent"] == frames_sent
        frames = wait_frames(redis_url, frames_sent)
    assert len(frames) == frames_sent
    assert {(f.width, f.height) for f in frames} == {(MODEL_W, MODEL_H)}
    meta = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(keys.stream_meta(DEVICE))
    assert (int(meta[keys.M_WIDTH]), int(meta[keys.M_HEIGHT])) == (192, 128)
