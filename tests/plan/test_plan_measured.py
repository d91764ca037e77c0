"""The plan's peak memory against measurement on this CPU, for small steps of each mode (the
full table, with times, is benchmarks/plan_validation.py)."""

import sys

import pytest

from qkv.plan import Case, measure
from qkv.plan.validate import fresh_processes, predict

SMALL = {"vocab_size": 512, "d_model": 128, "n_layers": 2, "n_heads": 2, "max_len": 4096}
CASES = [
    Case(SMALL, "decode", "sdpa", 4096, 8, reps=2, threads=1),
    Case({**SMALL, "n_layers": 1, "d_model": 64, "n_heads": 4}, "prefill", "reference", 1024,
         reps=1, threads=1),
    Case(SMALL, "train", "sdpa", 512, 4, reps=2, threads=1),
]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_predicted_peak_memory_is_within_15_percent_of_measured():
    from qkv.plan import nominal

    with fresh_processes() as processes:
        for case in CASES:
            predicted = predict(case, nominal())["peak_bytes"]
            measured = measure(case, processes)["peak_bytes"]
            assert abs(predicted / measured - 1) <= 0.15, (case.label(), predicted, measured)
