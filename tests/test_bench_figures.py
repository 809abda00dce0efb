"""The figures the benchmarks print (bench/figures.py): how they are computed, not how fast anything is."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "bench_figures", Path(__file__).resolve().parent.parent / "bench" / "figures.py")
figures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(figures)


def test_median_of_two_values_is_the_lower_one_not_the_largest() -> None:
    assert figures.percentile([0.044, 0.030], 0.5) == 0.030


def test_p99_of_a_hundred_values_is_the_99th_not_the_largest() -> None:
    values = [float(n) for n in range(1, 101)]
    assert figures.percentile(values, 0.99) == 99.0
    assert figures.percentile(values, 0.5) == 50.0
    assert figures.percentile(values, 1.0) == 100.0


def test_percentile_is_the_nearest_rank_when_the_fraction_falls_between_values() -> None:
    values = [float(n) for n in range(1, 11)]
    assert figures.percentile(values, 0.7) == 7.0  # 0.7 * 10 is 7.000000000000001 in floating point
    assert figures.percentile(values, 0.71) == 8.0
    assert figures.percentile(values, 0.0) == 1.0
    assert figures.percentile([5.0], 0.99) == 5.0
