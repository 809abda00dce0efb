"""The figures benchmarks compute from what they sampled: plain functions, no platform.

No side effects on import (unlike stack.py), so tests/test_bench_figures.py can check them.
"""
from __future__ import annotations

import math
from typing import Sequence


class TooFewToMeasure(Exception):
    """What the run counted does not span the window a figure is taken over (a run too small)."""


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of the values at or below it
    (p50 of two values is the lower one; p99 of 100 values is the 99th, not the largest)."""
    ordered = sorted(values)
    rank = math.ceil(round(fraction * len(ordered), 9))  # rounded: 0.7 * 10 is 7.000000000000001
    return ordered[max(0, rank - 1)]


def steady_window(samples: Sequence[tuple], low: int, high: int) -> tuple[tuple, tuple]:
    """The first sample whose count reaches `low` and the first whose count reaches `high`: the
    stretch a steady rate is taken over, start-up and tail left out.

    Each sample is (time, count, ...), in time order. When both are one sample, or were taken at
    one instant, everything between `low` and `high` was counted in one step (one commit, one
    batch): there is no rate to give, and TooFewToMeasure says so rather than dividing by zero.
    """
    first = next(sample for sample in samples if sample[1] >= low)
    last = next(sample for sample in samples if sample[1] >= high)
    if last[0] <= first[0] or last[1] <= first[1]:
        raise TooFewToMeasure(f"{low:,} to {high:,} counted in one step: too few to measure a rate, "
                              f"give the run more")
    return first, last


def steady_rate(samples: Sequence[tuple], low: int, high: int) -> float:
    """Counted per second over `steady_window(samples, low, high)`."""
    first, last = steady_window(samples, low, high)
    return (last[1] - first[1]) / (last[0] - first[0])
