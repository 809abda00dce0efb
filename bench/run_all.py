"""Every benchmark, one after the other, each on a private platform of its own.

    .venv/bin/python bench/run_all.py            # about 17 minutes on a 2-core machine

Each script prints its figures (and the machine) as it measures them; docs/performance.md
records a run and what the figures mean. The scripts can be run on their own, with options.
"""
from __future__ import annotations

import signal
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
    ["grouping.py"],
    ["http_floor.py"],
    ["dispatch_path.py"],
]

# Passed on to the running script, which ends its run on them as on Ctrl-C (bench/stack.py).
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def run(argv: list[str]) -> int:
    """The script's exit code. A stop waits until the script has stopped its platform and removed its
    folder and database: subprocess.call killed it 0.25 s after a Ctrl-C, in the middle of that."""
    script = subprocess.Popen(argv)
    stopped_by: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        script.send_signal(signum)

    previous = {stop: signal.signal(stop, forward) for stop in _FORWARDED
                if signal.getsignal(stop) is not signal.SIG_IGN}
    try:
        try:
            code = script.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the script too: it is one process group
            script.wait()
            raise
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
    if stopped_by:
        raise SystemExit(128 + stopped_by[0])  # no next script
    return code


def main() -> int:
    failed = []
    for script, *options in RUNS:
        command = " ".join([f"bench/{script}", *options])
        print(f"\n=== {command}", flush=True)
        started = time.monotonic()
        code = run([sys.executable, str(BENCH_DIR / script), *options])
        print(f"=== {command}: exit code {code} after {time.monotonic() - started:.0f}s", flush=True)
        if code != 0:
            failed.append(command)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
