"""`make bench`: every benchmark in turn, each in its own process (results in docs/BENCHMARKS.md).

Each benchmark measures against its own baseline in the same run and prints a table with the
ratio. They are never part of the pass/fail test run.
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = (
    "bench.protocol",
    "bench.gateway",
    "bench.worker",
    "bench.api",
    "bench.training",
    "bench.edge_spool",
    "bench.latency",
    "bench.results",
)


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"\n=== {module} ===", flush=True)
        start = time.monotonic()
        code = subprocess.call([sys.executable, "-m", module])
        print(f"=== {module}: exit {code} after {time.monotonic() - start:.0f} s ===", flush=True)
        if code != 0:
            failed.append(module)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
