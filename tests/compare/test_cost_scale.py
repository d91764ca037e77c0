import contextlib
import json

import pytest

from qkv.compare import Context, Settings, cost, measure, scale
from qkv.compare.measure import doubling, loglog_slope, timed_runs


def test_slope_fit_recovers_exact_power_laws():
    ns = doubling(256, 16384)
    assert ns == [256, 512, 1024, 2048, 4096, 8192, 16384]
    assert loglog_slope(ns, [3e-9 * n**2 for n in ns]) == pytest.approx(2.0)
    assert loglog_slope(ns, [5.0 * n for n in ns]) == pytest.approx(1.0)
    # only the upper half counts: a flat start does not bend the fit
    ys = [1.0, 1.0, 1.0] + [n**1.5 for n in ns[3:]]
    assert loglog_slope(ns, ys) == pytest.approx(1.5)
    assert loglog_slope(ns[:2], [1.0, None]) is None


def test_lstm_flops_against_a_hand_count():
    # per step: 4 gates x (input 3 -> 5 and hidden 5 -> 5), 2 FLOPs per multiply-add
    per_step = 4 * (2 * 3 * 5 + 2 * 5 * 5)
    assert cost.lstm_flops(10, 3, 5) == 10 * per_step == 3200


def test_attention_layer_flops_and_where_they_pass_the_lstm():
    # projections: q, k, v and out, 2 * d * d each per token; attention (causal, 2 heads of 4):
    # q k^T and p v, 2 * n * n * 4 each per head, halved by the mask
    n, d = 4, 8
    hand = 4 * 2 * n * d * d + 2 * (2 * n * n * 4 * 2) / 2
    assert cost.attention_layer_flops(n, d, 2) == hand == 2304
    # 8 n d^2 + 2 n^2 d = 16 n d^2  =>  n = 4 d
    assert cost.flop_overtake_n(128, 2) == pytest.approx(512)
    n = cost.flop_overtake_n(64, 1)
    assert cost.attention_layer_flops(int(n) + 1, 64, 1) > cost.lstm_flops(int(n) + 1, 64, 64)
    assert cost.attention_layer_flops(int(n) - 1, 64, 1) < cost.lstm_flops(int(n) - 1, 64, 64)


def test_scale_crossovers_against_a_hand_computation():
    # score FLOPs 4 layers x 2 n^2 d (causal); the rest 4 x 24 n d^2 + 2 n d V
    assert scale.flop_crossover() == pytest.approx((4 * 24 * 256**2 + 2 * 256 * 256)
                                                   / (4 * 2 * 256)) == 3136
    n = scale.memory_crossover()
    assert scale.QUADRATIC_BYTES * n * n == pytest.approx(scale.LINEAR_BYTES_PER_TOKEN * n)
    params = scale.parameter_bytes()
    assert scale.memory_wall("reference", 8 << 30, params) == 8192
    assert scale.memory_wall("chunked", 8 << 30, params) > 8192


def test_sequential_steps():
    assert cost.sequential_steps("lstm", 4096) == 4096
    assert cost.sequential_steps("chunked", 4096) == 1
    # two convolutions of kernel 3 per block: 1 + 4 (2^B - 1) >= 256 first at B = 7
    assert cost.sequential_steps("tcn", 256) == 7


def test_timed_runs_warms_up_and_stops_at_the_repetitions():
    calls = []
    result = timed_runs(lambda: calls.append(1), 3, memory=True)
    assert len(calls) == 4 and len(result["times"]) == 3 and result["peak_bytes"] >= 0
    calls.clear()
    result = timed_runs(lambda: calls.append(1), 1, memory=False, warmup=False)
    assert len(calls) == 1 and result["peak_bytes"] is None


def test_one_layer_is_measured_here():
    row = cost.measure_layer(cost.LayerCase("chunked", 64, 32, reps=1, memory=False))
    assert row["seconds"] > 0 and row["threads"] == 1


def fake_layer(case):
    """Exact power laws: attention time n^2; reference memory n^2, the others n."""
    t = {"reference": 1e-8 * case.n**2, "chunked": 2e-8 * case.n**2, "lstm": 1e-4 * case.n,
         "tcn": 1e-5 * case.n}[case.kind] * case.d / 128
    peak = 4e2 * case.n**2 if case.kind == "reference" else 1e4 * case.n
    return {**case.__dict__, "seconds": t, "times": [t], "peak_bytes": peak}


def fake_model(case):
    t = (3e-8 if case.backend == "reference" else 1e-8) * case.n**2
    peak = 200 * case.n**2 if case.backend == "reference" else 7e4 * case.n
    return {**case.__dict__, "seconds": t, "times": [t], "peak_bytes": peak}


def drawn_not_rendered(self, fig, name):
    import matplotlib.pyplot as plt

    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel() and fig.axes[0].get_title()
    plt.close(fig)
    (self.out / name).write_bytes(b"")
    return name


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(Context, "save_figure", drawn_not_rendered)  # rendering takes seconds
    for module in (cost, scale):
        monkeypatch.setattr(module, "fresh_processes", lambda preload: contextlib.nullcontext())
    monkeypatch.setattr(cost, "measure_layer", fake_layer)
    monkeypatch.setattr(scale, "measure_model", fake_model)


def test_the_cost_row_reports_slopes_ratios_and_a_verdict(tmp_path, in_process):
    result = cost.run(Context(Settings(max_len=4096), tmp_path))
    data = result.data
    assert data["slopes"]["reference"]["time_vs_n"] == pytest.approx(2.0)
    assert data["slopes"]["lstm"]["memory_vs_n"] == pytest.approx(1.0)
    assert data["memory_ratio_1k_to_4k"]["reference"] == pytest.approx(16.0)
    assert data["memory_ratio_1k_to_4k"]["chunked"] == pytest.approx(4.0)
    assert result.agrees is True and "16.0x" in result.findings and "11x" in result.anchor
    assert data["flop_overtake_n"] == pytest.approx(512)
    # attention 1e-8 n^2 passes the LSTM's 1e-4 n at n = 1e4: first at 16384, past 4096
    assert data["time_crossing_n"] == {"reference": None, "chunked": None}
    json.dumps(data)
    assert all((tmp_path / name).exists() for name in result.figures)
    assert set(result.figures) == {"cost_time_vs_n.png", "cost_memory_vs_n.png",
                                   "cost_time_vs_d.png"}


def test_the_cost_row_skips_what_passes_the_budget(tmp_path, in_process):
    result = cost.run(Context(Settings(max_len=4096, memory_budget=256 << 20), tmp_path))
    skipped = [r for r in result.data["rows"] if "skipped" in r]
    assert skipped and all(r["kind"] == "reference" for r in skipped)
    assert "skipped" in result.tables[0]


def test_the_scale_row_stops_each_backend_at_its_wall(tmp_path, in_process):
    result = scale.run(Context(Settings(max_len=16384, memory_budget=1 << 30), tmp_path))
    data = result.data
    ref = [r for r in data["rows"] if r["backend"] == "reference"]
    assert ref[-1]["fits"] is False and "seconds" not in ref[-1]
    assert all("seconds" in r for r in ref[:-1])
    assert data["largest_n_run"]["reference"] < data["largest_n_run"]["chunked"]
    assert data["slopes"]["reference"]["memory"] == pytest.approx(2.0)
    assert data["slopes"]["chunked"]["time_last_doubling"] == pytest.approx(2.0)
    assert result.agrees is True, result.findings
    assert "does not fit" in result.tables[0]
    json.dumps(data)
    assert all((tmp_path / name).exists() for name in result.figures)


def test_min_memory_is_the_smallest_case():
    assert 0 < cost.min_memory(Settings()) < scale.min_memory(Settings()) < 1 << 30
    assert measure.THREADS == 1


class _DeadPool:
    """A process pool whose worker the system killed."""

    def submit(self, function, case):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        future = Future()
        future.set_exception(BrokenProcessPool("A process in the process pool was terminated"))
        return future


def test_a_killed_worker_is_an_error_naming_the_case():
    case = cost.LayerCase("reference", 16384, 128)
    with pytest.raises(ChildProcessError, match=r"measuring LayerCase\(kind='reference', "
                                                r"n=16384.*died.*memory") as error:
        measure.run_elsewhere(cost.measure_layer, case, _DeadPool())
    assert isinstance(error.value, OSError)  # the command prints it as one error line
