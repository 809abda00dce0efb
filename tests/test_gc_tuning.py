"""The worker's young-generation threshold (alerting_app/gc_tuning.py)."""
from __future__ import annotations

import gc

from alerting_app.gc_tuning import YOUNG_GENERATION_THRESHOLD, tune_garbage_collector


def test_tuning_raises_the_young_generation_threshold_and_keeps_the_others() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        tune_garbage_collector()
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, 11, 12)
        assert gc.isenabled()
    finally:
        gc.set_threshold(*before)
