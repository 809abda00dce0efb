"""Every benchmark, one after the other, each on a private platform of its own.

    .venv/bin/python bench/run_all.py            # about 15 minutes on a 2-core machine

Each script prints its figures (and the machine) as it measures them; docs/performance.md
records a run and what the figures mean. The scripts can be run on their own, with options.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RUNS = [
    ["faust_ceiling.py"],
    ["evaluator.py"],
    ["bare_evaluator.py"],
    ["end_to_end.py", "--workers", "1"],
    ["end_to_end.py", "--workers", "2"],
    ["rule_propagation.py"],
    ["fast_start.py"],
    ["deliveries.py", "--alerts", "4000"],
    ["deliveries.py", "--alerts", "4000", "--workers", "2"],
    ["http_floor.py"],
]


def main() -> int:
    failed = []
    for script, *options in RUNS:
        command = " ".join([f"bench/{script}", *options])
        print(f"\n=== {command}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(BENCH_DIR / script), *options])
        print(f"=== {command}: exit code {code} after {time.monotonic() - started:.0f}s", flush=True)
        if code != 0:
            failed.append(command)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
