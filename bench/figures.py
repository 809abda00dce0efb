"""The figures benchmarks compute from what they sampled: plain functions, no platform.

No side effects on import (unlike stack.py), so tests/test_bench_figures.py can check them.
"""
from __future__ import annotations

import math
from typing import Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of the values at or below it
    (p50 of two values is the lower one; p99 of 100 values is the 99th, not the largest)."""
    ordered = sorted(values)
    rank = math.ceil(round(fraction * len(ordered), 9))  # rounded: 0.7 * 10 is 7.000000000000001
    return ordered[max(0, rank - 1)]
