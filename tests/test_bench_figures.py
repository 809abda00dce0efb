"""The figures the benchmarks print (bench/figures.py): how they are computed, not how fast anything is."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


def test_steady_rate_is_taken_between_the_samples_reaching_10_and_90_percent() -> None:
    # (seconds, committed): start-up before 10, a tail after 90 that must not count.
    samples = [(0.0, 0), (5.0, 0), (6.0, 20), (8.0, 60), (10.0, 100), (40.0, 100)]
    assert figures.steady_rate(samples, 10, 90) == (100 - 20) / (10.0 - 6.0)


def test_a_run_counted_in_one_step_has_no_rate_rather_than_a_division_by_zero() -> None:
    one_commit = [(0.0, 0), (3.0, 100)]
    with pytest.raises(figures.TooFewToMeasure):
        figures.steady_rate(one_commit, 10, 90)


def test_a_run_counted_at_one_instant_has_no_rate_rather_than_zero() -> None:
    # One batch past both marks, sampled twice at once (bare_evaluator's old 0 alerts/s).
    same_instant = [(2.0, 100), (2.0, 100)]
    with pytest.raises(figures.TooFewToMeasure):
        figures.steady_window(same_instant, 10, 90)
    one_batch_read_twice = [(1.0, 50), (1.0, 100)]  # end_to_end: arrivals of one getmany share a time
    with pytest.raises(figures.TooFewToMeasure):
        figures.steady_rate(one_batch_read_twice, 10, 90)
