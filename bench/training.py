"""Step time and throughput of `flowcloud train`: one process against N processes under torchrun.

    python -m bench.training                                     # CPU: 1 process vs 2 (gloo)
    python -m bench.training --device cuda --runs 1,4,8 \\
        --model deeplabv3_resnet50 --size 512x1024 --batch 2     # GPUs: NCCL; --batch is per process

Each configuration is the real command (`flowcloud train`, or `torchrun -m flowcloud.cli.main train`)
on the same synthetic street dataset in the Cityscapes layout, without validation. The first epoch
warms up (allocations, cuDNN autotuning) and is left out; step time is the wall time of the later
epochs (data loading included) over their steps. The global batch grows with the processes (per-process
batch fixed), so ``throughput`` (images/s) compares like with like; ``scaling`` is throughput over the
first configuration, measured in the same run. A configuration is ``P`` or ``PxT``: P processes of
T torch threads each (default: cores / P on a CPU). The configurations run in turn, ``--rounds``
times, and each reports its median, so load that comes and goes hits them alike. From the measured
GPU step times the script also estimates the published recipe's time (80k iterations at global
batch 8) on 4 and 8 GPUs, marked as estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE_ITERATIONS, RECIPE_BATCH = 80_000, 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(procs: int, train_args: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "flowcloud.cli.main", *train_args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "flowcloud.cli.main",
        *train_args,
    ]  # fmt: skip


def _config(text: str, device: str) -> tuple[int, int]:
    procs, _, threads = text.partition("x")
    default = max(1, (os.cpu_count() or 1) // int(procs)) if device == "cpu" else 1
    return int(procs), int(threads) if threads else default


def measure(args: argparse.Namespace, data: Path, procs: int, threads: int, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    batch = args.batch * procs
    train_args = [
        "train", "--data", str(data), "--model", args.model, "--crop-size", args.size,
        "--scale-range", "1.0:1.0", "--base-size", args.size, "--batch-size", str(batch),
        "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps), "--val-split", "none",
        "--workers", str(args.workers), "--threads", str(threads), "--device", args.device,
        "--optimizer", "sgd", "--lr", "0.01", "--checkpoint-every", "0", "--output-dir", str(out),
        *(["--sync-bn"] if procs > 1 and args.sync_bn else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    print(f"{procs} x {threads} threads ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = subprocess.run(_command(procs, train_args), cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{procs} processes failed:\n{result.stderr[-3000:]}")
    history = json.loads((out / "metrics.json").read_text())
    timed = history[1:]  # the first epoch warms up
    seconds = sum(h["seconds"] for h in timed)
    steps = len(timed) * args.steps
    step = seconds / steps
    return {
        "processes": procs,
        "threads_per_process": threads,
        "global_batch": batch,
        "step_s": round(step, 3),
        "images_per_s": round(batch / step, 2),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--runs", default="1x1,1x2,2x1", help="configurations P[xT] to compare (the first is the baseline)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="times each configuration runs (median)")
    parser.add_argument("--model", default="small_unet")
    parser.add_argument("--size", default="128x256", help="crop HxW (the synthetic frames are this size)")
    parser.add_argument("--batch", type=int, default=4, help="images per process per step")
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (the first is warm-up)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes per training process")
    parser.add_argument("--no-sync-bn", dest="sync_bn", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    configs = [_config(c, args.device) for c in args.runs.split(",")]
    from flowcloud.sizes import parse_size
    from training.synth_cli import write_dataset

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = Path(tmp) / "data"
        frames = args.batch * max(p for p, _ in configs) * args.steps
        write_dataset(data, frames=frames, seed=3, size=parse_size(args.size))
        runs: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
        for _ in range(args.rounds):
            for procs, threads in configs:
                runs[(procs, threads)].append(measure(args, data, procs, threads, Path(tmp) / "run"))
    rows = []
    for config in configs:
        row = dict(runs[config][0])
        row["step_s"] = statistics.median(r["step_s"] for r in runs[config])
        row["images_per_s"] = round(row["global_batch"] / row["step_s"], 2)
        row["all_step_s"] = [r["step_s"] for r in runs[config]]
        rows.append(row)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["scaling"] = round(row["images_per_s"] / base, 2)
    report: dict[str, Any] = {
        "device": args.device,
        "model": args.model,
        "size": args.size,
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "rows": rows,
    }
    if args.device == "cuda":
        # Estimates (not measurements): the recipe's global batch 8 as per-GPU batch 8/N, step time taken
        # as the measured per-process step time at --batch, scaled by the measured N-process efficiency.
        one = rows[0]["step_s"] / args.batch
        report["recipe_estimates_h"] = {
            f"{n}_gpus": round(RECIPE_ITERATIONS * one * RECIPE_BATCH / n / _efficiency(rows, n) / 3600, 2)
            for n in (4, 8)
        }
    print(f"{'processes':>9} {'threads':>7} {'batch':>5} {'step s':>7} {'images/s':>9} {'scaling':>7}  runs")
    for r in rows:
        print(
            f"{r['processes']:>9} {r['threads_per_process']:>7} {r['global_batch']:>5} {r['step_s']:>7.3f} "
            f"{r['images_per_s']:>9.2f} {r['scaling']:>7.2f}  {r['all_step_s']}"
        )
    print(f"load average (1 min) at the end: {report['load_average_1m_at_end']}")
    if "recipe_estimates_h" in report:
        print(f"ESTIMATED recipe time (80k iterations, batch 8): {report['recipe_estimates_h']} hours")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _efficiency(rows: list[dict[str, Any]], n: int) -> float:
    """Measured scaling per process at ``n`` processes, or at the most measured (1.0 with one GPU only)."""
    measured = {r["processes"]: r["scaling"] / r["processes"] for r in rows}
    return measured.get(n) or measured[max(measured)]


if __name__ == "__main__":
    sys.exit(main())
