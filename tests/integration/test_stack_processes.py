"""`flowcloud up` as a user runs it, and the services it supervises, as real processes: Ctrl-C
(SIGINT to the terminal's process group) shuts down in order with Redis last; a killed
supervisor leaves no process behind; ports come from the options or the environment and are
checked; readiness is taken only from the process that was started; every service honours
SIGTERM in every state, and a taken metrics port fails fast with one line."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from threading import Thread

import pytest
import redis
from support.cli import REPO, flowcloud, run_flowcloud
from support.waiting import wait_for
from support.worker import STARTUP_TIMEOUT, pending_total

from flowcloud import keys
from flowcloud.cli.demo import DEMO_DEVICE, register_demo_device
from flowcloud.redis_server import EmbeddedRedis, free_port
from flowcloud.stack import Service

WORKER_ENV = {
    "FLOWCLOUD_WORKER_MODE": "complete",  # every frame read is acknowledged or stays pending
    "FLOWCLOUD_WORKER_BATCH_SIZE": "2",
    "FLOWCLOUD_WORKER_WARMUP_SIZE": "64x128",
    "FLOWCLOUD_WORKER_THREADS": "1",
    "FLOWCLOUD_WORKER_DRAIN_TIMEOUT": "20",
}


class UpProcess(subprocess.Popen[str]):
    """A real `flowcloud up` in a process group of its own, as a shell runs it in the foreground."""

    data_dir: Path
    banner: list[str]  # what it printed up to "Ctrl-C stops everything."

    def address(self, what: str) -> str:
        """The address on the banner's line for ``what`` (gateway, api, redis)."""
        return next(line.split()[1] for line in self.banner if line.split()[0] == what)

    def interrupt(self) -> None:
        """Ctrl-C: the terminal sends SIGINT to every process of the foreground group."""
        os.killpg(self.pid, signal.SIGINT)

    def children(self) -> list[int]:
        tasks = Path(f"/proc/{self.pid}/task")
        return [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]


@contextmanager
def flowcloud_up(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[UpProcess]:
    """`flowcloud up` on free ports, ready (it printed its addresses) when the block starts."""
    ports = ("--gateway-port", "--api-port", "--gateway-metrics-port", "--worker-metrics-port")
    command = flowcloud(
        "up", "--data-dir", data_dir, *[a for p in ports for a in (p, str(free_port()))], *args
    )
    proc = UpProcess(
        command,
        cwd=REPO,
        env={**os.environ, **WORKER_ENV, **(env or {}), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
    )
    proc.data_dir = data_dir
    children: list[int] = []
    try:
        assert proc.stdout is not None
        proc.banner = []
        for line in proc.stdout:
            proc.banner.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        else:
            raise AssertionError("flowcloud up did not start:\n" + "".join(proc.banner))
        children = proc.children()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in children:  # whatever a failed test left behind
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.slow
def test_ctrl_c_stops_the_stack_in_order_with_redis_last(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    with flowcloud_up(data_dir) as up:
        redis_pid = next(pid for pid in up.children() if _name(pid) == "redis-server")
        url = up.address("redis")
        token = asyncio.run(register_demo_device(url))
        edge = Service(
            "edge",
            [
                "edge", "--gateway", up.address("gateway"), "--device-id", DEMO_DEVICE,
                "--source", "synthetic", "--width", "160", "--height", "96", "--fps", "15",
                "--metrics-port", "0",
            ],
            {"FLOWCLOUD_EDGE_TOKEN": token},
            log_path=tmp_path / "edge.log",
        )  # fmt: skip
        edge.start()  # a session of its own: Ctrl-C on the stack does not reach it
        client = redis.Redis.from_url(url)
        try:

            def frames_in_flight() -> bool:
                queue = keys.frame_shard(0)
                groups = client.xinfo_groups(queue) if client.exists(queue) else []
                return any(int(g.get("entries-read") or 0) >= 10 for g in groups)

            wait_for("the worker to read frames", frames_in_flight, STARTUP_TIMEOUT, edge.process)
            interrupted = time.monotonic()
            up.interrupt()
            output, _ = up.communicate(timeout=60)
            took = time.monotonic() - interrupted
        finally:
            client.close()
            edge.stop(10)
    assert up.returncode == 0, output
    stopped = next(line for line in output.splitlines() if line.startswith("stopped:"))
    assert stopped == "stopped: gateway=0, worker-0=0, alerts=0, api=0", output
    assert took < 15, f"the stack took {took:.1f} s to stop (the worker's drain deadline is 20 s)"
    assert _gone(redis_pid)
    # What Redis wrote to its append-only file at the end: nothing read and left unacknowledged.
    with EmbeddedRedis(data_dir / "redis", appendonly=True) as server:
        after = redis.Redis.from_url(server.url)
        assert after.xlen(keys.frame_shard(0)) > 0
        assert pending_total(after) == 0
        after.close()


@pytest.mark.slow
def test_a_killed_supervisor_leaves_no_process_behind(tmp_path: Path) -> None:
    with flowcloud_up(tmp_path / "stack") as up:
        children = up.children()
        assert {_name(pid) for pid in children} >= {"redis-server"}
        assert len(children) == 5  # redis-server, gateway, worker-0, alerts, api
        up.kill()
        up.wait(10)
        for pid in children:
            wait_for(f"{_name(pid) or pid} to exit after its supervisor", functools.partial(_gone, pid), 60)


@contextmanager
def taken_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port another program listens on, answering 200 to every GET (as a foreign /readyz would)."""

    class Always200(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer((host, 0), Always200)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("given", ["option", "environment"])
def test_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path, given: str) -> None:
    with taken_port() as port:
        option = ["--worker-metrics-port", str(port)] if given == "option" else []
        env = {"FLOWCLOUD_WORKER_METRICS_PORT": str(port)} if given == "environment" else {}
        done = run_flowcloud("up", "--data-dir", tmp_path / "stack", "--gateway-metrics-port", "0",
                             "--gateway-port", "0", "--api-port", "0", *option, env=env)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"flowcloud up: port {port} for worker-0's metrics is in use on 0.0.0.0 "
        "(Address already in use); choose another with FLOWCLOUD_WORKER_METRICS_PORT"
    )
    assert not (tmp_path / "stack").exists()  # nothing was started


def test_up_refuses_one_port_for_two_services(tmp_path: Path) -> None:
    port = str(free_port())
    done = run_flowcloud("up", "--data-dir", tmp_path / "stack", "--gateway-metrics-port", port,
                         "--worker-metrics-port", port, "--gateway-port", "0", "--api-port", "0")  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"flowcloud up: port {port} is given to both the gateway's metrics (FLOWCLOUD_GATEWAY_METRICS_PORT) "
        "and worker-0's metrics (FLOWCLOUD_WORKER_METRICS_PORT)"
    )


def test_readiness_comes_only_from_the_process_that_was_started(tmp_path: Path) -> None:
    """Another program answering 200 on the port is not the service being ready."""
    serve_ready = (
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    with taken_port() as port:
        silent = Service("silent", [], {}, ready_url=f"http://127.0.0.1:{port}/readyz", ready_port=port)
        silent.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert not silent.ready()
        finally:
            silent.process.kill()
            silent.process.wait()
    own_port = free_port()
    answering = Service(
        "answering", [], {}, ready_url=f"http://127.0.0.1:{own_port}/readyz", ready_port=own_port
    )
    answering.process = subprocess.Popen([sys.executable, "-c", serve_ready, str(own_port)])
    try:
        wait_for("the started process to answer ready", answering.ready, 30, answering.process)
    finally:
        answering.process.kill()
        answering.process.wait()


def test_gateway_with_its_metrics_port_taken_fails_fast_with_one_line(redis_url: str) -> None:
    with taken_port("0.0.0.0") as port:
        done = run_flowcloud("gateway", "--redis-url", redis_url, "--port", "0", "--metrics-port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"flowcloud gateway: cannot serve /metrics on port {port}: [Errno 98] Address already in use"
    )


@contextmanager
def silent_redis() -> Iterator[str]:
    """A 'Redis' that accepts connections and never answers: every command waits."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


@pytest.mark.parametrize(
    ("service", "redis"), [("worker", "refused"), ("worker", "silent"), ("gateway", "silent")]
)
def test_sigterm_is_honoured_while_redis_cannot_be_reached(tmp_path: Path, service: str, redis: str) -> None:
    log_path = tmp_path / f"{service}.log"
    with silent_redis() as silent, log_path.open("wb") as log:
        url = silent if redis == "silent" else f"redis://127.0.0.1:{free_port()}/0"
        args = ["--port", "0"] if service == "gateway" else ["--threads", "1"]
        proc = subprocess.Popen(
            flowcloud(service, "--redis-url", url, "--metrics-port", "0", *args),
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            waiting = "cannot create the consumer group" if service == "worker" else "Redis"
            if redis == "silent" and service == "worker":
                waiting = "worker settings"
            wait_for(
                "the service to wait on Redis", lambda: waiting in log_path.read_text(), STARTUP_TIMEOUT, proc
            )
            time.sleep(0.5)  # into the wait
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(30)
            took = time.monotonic() - asked
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert status == 0, log_path.read_text()[-2000:]
    assert took < 10, f"{service} took {took:.1f} s to honour SIGTERM"
