"""Fast start and memory: a worker's rule replica, cold (empty DATA_DIR) and restarted (its RocksDB store).

    .venv/bin/python bench/fast_start.py [--sizes 100x288,1500x300]

For each size (clients x rules per client): seed the rules, let a relay worker (ROLES=relay) carry
the outbox to rule.changed (timed: that is how seeded rules reach the workers), then start a
worker with ROLES=evaluate (the role that holds the rule replica) on an empty DATA_DIR, stop it and
start it again on the same DATA_DIR. Each start is timed from process start to:
- the log line "rule replica caught up" (the replica has read up to the end offsets it saw at start),
- GET /api/v1/worker/rules answering with every seeded rule enabled.
Resident memory (psutil) is read when the replica has caught up and settled, before any GET
/api/v1/worker/rules (which builds a contract object per rule), and again after it.
"""
from __future__ import annotations

import argparse
import time
from datetime import datetime

from stack import REPLICA_CAUGHT_UP_LINE, BenchStack, machine_summary, rss_mib, wait_until_started, \
    wait_until_worker_holds


def log_time(worker, text: str) -> float | None:
    """The wall-clock time of the first line of the worker's log containing `text`."""
    for line in worker.log().splitlines():
        if text in line and line.startswith("["):
            return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def timed_start(stack: BenchStack, name: str, rules: int) -> dict[str, float]:
    # At info, as text: the phases below are read from the worker's info lines and their "[date time,ms]"
    # prefix, whatever LOG_LEVEL and LOG_FORMAT say.
    worker = stack.start_worker(name, roles="evaluate", wait=False, log_level="info", log_format="text")
    while REPLICA_CAUGHT_UP_LINE not in worker.log():
        if not worker.child.running():
            raise RuntimeError(f"worker exited:\n{worker.child.log_tail()}")
        if time.monotonic() - worker.started_at > 1800:
            raise TimeoutError("the rule replica did not catch up in 30 minutes")
        time.sleep(0.02)
    caught_up_s = time.monotonic() - worker.started_at
    time.sleep(3)  # settled: what start-up allocated and freed is back in the allocator
    rss_caught_up = rss_mib(worker)
    wait_until_worker_holds(worker, rules, poll_s=0.05)
    api_s = time.monotonic() - worker.started_at
    rss_after_api = rss_mib(worker)
    # Where the start-up time went, from the worker's own log (one clock: the log's).
    starting, ready, loaded, caught_up = (log_time(worker, text) for text in (
        "[^Worker]: Starting", "[^Worker]: Ready", "rule replica loaded", REPLICA_CAUGHT_UP_LINE))
    phases = {"join_s": ready - starting, "load_s": loaded - ready, "catch_up_s": caught_up - loaded}
    stack.stop_worker(worker)
    return {"caught_up_s": caught_up_s, "api_s": api_s, "rss_caught_up": rss_caught_up,
            "rss_after_api": rss_after_api, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100x288,1500x300", help="clients x rules per client, comma-separated")
    args = parser.parse_args()
    print(f"machine: {machine_summary()}")
    for size in args.sizes.split(","):
        clients, per_client = (int(n) for n in size.split("x"))
        rules = clients * per_client
        with BenchStack("fast-start") as stack:
            seeded = stack.seed(clients, per_client)
            relay = stack.start_worker("relay", roles="relay", wait=False)
            wait_until_started(relay)  # the relay starts with the worker's readiness, and so does the clock
            relayed_s = stack.wait_until_outbox_empty(poll_s=0.05)
            stack.stop_worker(relay)
            print(f"{rules:,} rules: seeded in {seeded.seconds:.1f}s; relayed to rule.changed in {relayed_s:.1f}s "
                  f"({rules / relayed_s:,.0f} rules/s)")
            for label in ("cold start (empty DATA_DIR)", "restart (RocksDB store)"):
                figures = timed_start(stack, "replica", rules)
                print(f"  {label}: rule replica caught up {figures['caught_up_s']:.1f}s after process start, "
                      f"/api/v1/worker/rules shows all {rules:,} at {figures['api_s']:.1f}s; "
                      f"RSS {figures['rss_caught_up']:.0f} MiB caught up, "
                      f"{figures['rss_after_api']:.0f} MiB after GET /api/v1/worker/rules")
                print(f"    from the worker's log: Faust start to worker ready (consumer group joined) "
                      f"{figures['join_s']:.1f}s, then the replica loaded its store in {figures['load_s']:.1f}s "
                      f"and caught up with the topic in {figures['catch_up_s']:.1f}s")


if __name__ == "__main__":
    main()
