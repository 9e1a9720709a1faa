#!/usr/bin/env bash
# The worker's GPU check (issue 5): bench/worker.py on CUDA, then the gpu-marked worker tests.
#
# Two steps, because the GPU machine's image has PyTorch but no redis-server, no redis-py and
# no pydantic, and cannot reach a package registry:
#
#   1. here, with PyPI reachable:      bash bench/gpu_check.sh --prepare
#      puts Python 3.12 wheels and a redis-server (with its libraries) into .gpu-deps/ (gitignored)
#   2. on the lent machine (device tool `run`, carry [".gpu-deps"], timeout_s 480):
#                                      bash bench/gpu_check.sh
#      writes nvidia-smi.txt, bench_worker_cuda.txt, bench_worker_cuda.json and gpu_tests.txt
#      under $OUT (or ./gpu-check-out); the whole run stays under 8 minutes.
#
# Goal: deeplabv3_resnet50 at 256x512 >= 300 frames/s on an H100 with >= 99 % of pixels equal
# to fp32 (the "agree" column).
#
# Training (issue 17) is a run of its own: its wheels (OpenCV, tqdm, pydantic; 63.6 MiB) and the
# worker's do not fit in one carry.
#   1. here:                           bash bench/gpu_check.sh --prepare-training
#      puts them into .gpu-deps-training/ (gitignored)
#   2. on the lent machine (carry [".gpu-deps-training"], timeout_s 420):
#                                      bash bench/gpu_check.sh training
#      writes nvidia-smi.txt, bench_training_cuda.txt and .json: step time and images/s of
#      `flowcloud train` (deeplabv3_resnet50, 512x1024 crops, AMP) on 1 GPU and, under torchrun
#      (NCCL), on every GPU of the machine, plus the ESTIMATED time of the published recipe
#      (80k iterations at batch 8) on 4 and 8 GPUs derived from those step times.
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS=.gpu-deps
[[ "${1:-}" == "training" ]] && DEPS=.gpu-deps-training

if [[ "${1:-}" == "--prepare-training" ]]; then
    set -e
    PIP=${PIP:-.venv/bin/pip}
    rm -rf .gpu-deps-training && mkdir -p .gpu-deps-training/wheels
    # OpenCV and tqdm for the data pipeline, pydantic for the CLI (matplotlib stays out: no charts then).
    pkgs=$("$PIP" list --format=freeze 2>/dev/null | grep -iE \
        '^(opencv-python-headless|tqdm|pydantic|pydantic[-_]core|pydantic[-_]settings|annotated[-_]types|typing[-_]inspection|python[-_]dotenv)==')
    # shellcheck disable=SC2086
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu-deps-training/wheels $pkgs
    du -sh .gpu-deps-training
    ls .gpu-deps-training/wheels
    exit 0
fi

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    PIP=${PIP:-.venv/bin/pip}
    rm -rf "$DEPS" && mkdir -p "$DEPS/wheels" "$DEPS/bin" "$DEPS/lib"
    # Exact versions of what the worker imports beyond the GPU image's packages.
    pkgs=$("$PIP" list --format=freeze 2>/dev/null | grep -iE \
        '^(redis|simplejpeg|pydantic|pydantic[-_]core|pydantic[-_]settings|annotated[-_]types|typing[-_]inspection|python[-_]dotenv)==')
    # shellcheck disable=SC2086
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEPS/wheels" $pkgs
    server=$(readlink -f "$(command -v redis-server)")
    cp "$server" "$DEPS/bin/redis-server"
    # Its shared libraries, except the C runtime the GPU image has anyway.
    ldd "$server" | awk '/=> \//{print $3}' | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux)[.-]' |
        while read -r lib; do cp -L "$lib" "$DEPS/lib/"; done
    du -sh "$DEPS"
    ls "$DEPS/wheels"
    exit 0
fi

OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
    && PY=.venv/bin/python
if [[ -d "$DEPS/wheels" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
        "$DEPS"/wheels/*.whl && export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -x "$DEPS/bin/redis-server" ]]; then
    export PATH="$PWD/$DEPS/bin:$PATH" LD_LIBRARY_PATH="$PWD/$DEPS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

if [[ "${1:-}" == "training" ]]; then
    { nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
        > "$OUT/nvidia-smi.txt" 2>&1 || status=1
    cat "$OUT/nvidia-smi.txt"
    gpus=$(nvidia-smi -L | wc -l)
    procs=1
    [[ $gpus -gt 1 ]] && procs="1,$gpus"
    # 2 images per GPU and step (the recipe's 8 on 4 GPUs), 6 timed steps after a warm-up epoch.
    timeout 360 "$PY" -m bench.training --device cuda --runs "$procs" --model deeplabv3_resnet50 \
        --size 512x1024 --batch 2 --steps 6 --epochs 2 --workers 4 --json "$OUT/bench_training_cuda.json" \
        2>&1 | grep -v 'batch/s' | tee "$OUT/bench_training_cuda.txt" || status=1
    exit "$status"
fi
{
    nvidia-smi
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    redis-server --version
} > "$OUT/nvidia-smi.txt" 2>&1 || status=1
cat "$OUT/nvidia-smi.txt"

timeout 270 "$PY" -m bench.worker --device cuda --json "$OUT/bench_worker_cuda.json" 2>&1 |
    grep -v '^USDT' | tee "$OUT/bench_worker_cuda.txt" || status=1
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu --timeout 140 -o addopts="" \
    tests/integration/test_worker_gpu.py 2>&1 | tail -n 60 | tee "$OUT/gpu_tests.txt" || status=1
exit "$status"
