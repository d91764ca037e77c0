"""`qkv.plan`: what one step of a Transformer costs before it runs: parameters, FLOPs split
between attention and the rest, peak memory per attention backend, the longest sequence that
fits a memory budget, and a time estimate from measured throughput.

`qkv.plan.validate` measures the same steps on this CPU (`measure`), for
benchmarks/plan_validation.py and the tests.
"""

from qkv.plan.calibrate import DEFAULT_BENCH_RESULTS, Rates, nominal, quick, rates_for
from qkv.plan.estimate import BackendPlan, Plan, make_plan
from qkv.plan.memory import BACKENDS, DTYPES, MODES, Shapes, crossover, fits, memory, step_flops
from qkv.plan.presets import PRESETS, PUBLISHED_PARAMS, ModelSpec, count_params, load_model
from qkv.plan.validate import Case, measure

__all__ = ["BACKENDS", "DEFAULT_BENCH_RESULTS", "DTYPES", "MODES", "PRESETS", "PUBLISHED_PARAMS",
           "BackendPlan", "Case", "ModelSpec", "Plan", "Rates", "Shapes", "count_params",
           "crossover", "fits", "load_model", "make_plan", "measure", "memory", "nominal",
           "quick", "rates_for", "step_flops"]
