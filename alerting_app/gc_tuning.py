"""The worker's garbage-collector thresholds, for every role (set by the `worker` command).

Why: CPython's cyclic collector examines its young generation every 700 net new container objects,
and promotes what survives. Two stages meet that at their own scale:
- evaluate: a batch holds thousands of short-lived objects (decoded alerts, one message per match),
  scanned and promoted several times per batch: a quarter of the evaluator's time
  (docs/performance.md). Collected rarely, most are freed by reference counting before any scan.
- deliver: a backlog of held deliveries keeps tens of thousands of objects (tasks, coroutines,
  notifications) alive for milliseconds to seconds, so they are promoted, and every 25 % growth of
  the oldest generation runs a full collection of the whole process (about 130,000 objects, 100 ms
  each): 33 of them, 4.3 s of 15 s of worker CPU, in bench/deliveries.py's 32,000-delivery run.
With a young generation of 50,000, the evaluator gained 25-30 % and the deliver stage went from
0.47 to 0.31 ms of CPU per delivery (docs/delivery.md, Throughput).

Cycles are still collected, less often; the cost is at most 50,000 young objects more in memory.
"""
from __future__ import annotations

import gc

YOUNG_GENERATION_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)
