"""`qkv plan` from the command line: its table, its JSON, and one error line for bad input."""

import json

import pytest
from typer.testing import CliRunner

from qkv.cli.main import app

runner = CliRunner()
TOML = "seq_len = 32\nvocab_size = 300\n[model]\nd_model = 32\nn_layers = 1\nn_heads = 2\n"


def plan(*args):
    return runner.invoke(app, ["plan", *args])


def test_text_output_for_a_preset_in_decode():
    result = plan("--model", "llama-8b", "--seq-len", "8192", "--mode", "decode",
                  "--memory", "80GiB", "--dtype", "bf16", "--no-calibrate")
    assert result.exit_code == 0, result.output
    out = result.output
    for words in ("parameters          8,030,261,248", "KV cache", "1.07 GB",
                  "largest n that fits", "suggested backend", "uncalibrated",
                  "attention's share passes half at n ="):
        assert words in out
    assert "gradients" not in out  # no training state in decode


def test_json_keys_and_budget_from_the_device():
    result = plan("--model", "demo", "--seq-len", "256", "--batch", "4", "--device", "cpu",
                  "--json", "--no-calibrate")
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert {"model", "mode", "params", "flops", "flops_per_token", "attention_share",
            "crossover_seq_len", "budget", "budget_source", "backends", "suggestion",
            "time_source", "notes"} <= set(p)
    assert p["budget_source"].startswith("this machine has")
    backends = {b["backend"]: b for b in p["backends"]}
    assert set(backends) == {"sdpa", "chunked", "reference"}
    for b in backends.values():
        assert {"weights", "gradients", "optimizer", "activations", "kv_cache", "attention",
                "total"} == set(b["memory"])
        assert b["max_seq_len"] > 256 and b["fits"] and b["seconds"] > 0
    assert backends["reference"]["max_seq_len"] < backends["chunked"]["max_seq_len"]


def test_calibrated_run_on_a_toml_model(tmp_path):
    (tmp_path / "m.toml").write_text(TOML)
    result = plan("--model", str(tmp_path / "m.toml"), "--seq-len", "32", "--mode", "decode",
                  "--bench", str(tmp_path / "no-results.json"))
    assert result.exit_code == 0, result.output
    assert "quick measurement on cpu" in result.output


def test_a_budget_too_small_for_one_token_says_so():
    result = plan("--model", "gpt2", "--seq-len", "1024", "--memory", "1MB", "--no-calibrate")
    assert result.exit_code == 0, result.output
    assert "too small for even n = 1" in result.output


def test_too_small_a_budget_quotes_the_need_at_n_1_and_suggests_the_leanest_backend():
    from qkv.plan import make_plan
    from qkv.plan.memory import Shapes, memory
    from qkv.plan.presets import count_params, load_model

    spec = load_model("gpt2")
    at_one = min(memory(spec, Shapes.of(spec), count_params(spec), 1, 1, "fp32", "train",
                        b)["total"] for b in ("sdpa", "chunked", "reference"))
    assert 1.9e9 < at_one < 2.1e9  # about 2 GB at n = 1; 2.93 GB at n = 1024
    result = plan("--model", "gpt2", "--seq-len", "1024", "--memory", "1KiB", "--no-calibrate",
                  "--json")
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert f"needs at least {at_one:,} bytes at n = 1" in p["notes"][-1]
    reason = p["suggestion"]["reason"]
    assert "not even n = 1" in reason and f"{at_one:,} bytes at n = 1" in reason
    assert "longest sequence" not in reason and "(0)" not in reason
    # a budget that fits some n on one backend only still suggests the longest sequence
    between = make_plan(spec, 1024, budget=at_one + 10_000_000, mode="train")
    assert "allows the longest sequence" in between.suggestion["reason"]


@pytest.mark.parametrize("args, words", [
    (["--model", "gpt5", "--seq-len", "8"], "gpt2, gpt2-medium"),
    (["--model", "{tmp}/shape.toml", "--seq-len", "8"], "divisible"),
    (["--model", "{tmp}/missing.toml", "--seq-len", "8"], "does not exist"),
    (["--model", "gpt2", "--seq-len", "8", "--memory", "lots"],
     "Invalid value for --memory: it must be a size"),
    (["--model", "gpt2", "--seq-len", "0"], "--seq-len"),
    (["--model", "gpt2", "--seq-len", "8", "--mode", "serve"], "--mode"),
    (["--model", "minilm", "--seq-len", "8", "--mode", "decode"], "encoder"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args, words):
    (tmp_path / "shape.toml").write_text("[model]\nd_model = 100\nn_heads = 3\n")
    result = plan(*[a.format(tmp=tmp_path) for a in args], "--no-calibrate")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert "Traceback" not in result.output


@pytest.mark.parametrize("row, words", [
    ({"backend": "sdpa", "mode": "fwd", "causal": True, "tflops": 1.0}, "n must be a positive"),
    ({"backend": "sdpa", "mode": "fwd", "causal": True, "tflops": 1.0, "n": 0},
     "n must be a positive"),
    ({"backend": "sdpa", "mode": "fwd", "causal": True, "tflops": "fast", "n": 64},
     "tflops must be a positive"),
])
def test_a_bench_row_without_a_usable_n_is_an_error_naming_the_file(tmp_path, row, words):
    from qkv.plan.calibrate import from_bench, nominal

    path = tmp_path / "results.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(ValueError, match=words) as caught:
        from_bench(nominal(), path, 64, causal=True)
    assert str(path) in str(caught.value) and "row 0" in str(caught.value)
    result = plan("--model", "demo", "--seq-len", "64", "--mode", "decode", "--bench", str(path))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"error: {path}: row 0")
    good = {**row, "n": 64, "tflops": 2.0}
    path.write_text(json.dumps([good]))
    rates = from_bench(nominal(), path, 100, causal=True)
    assert rates.attention["sdpa"]["fwd"] == 2e12 and str(path) in rates.source


def test_bench_with_no_calibrate_is_refused(tmp_path):
    from qkv.plan import rates_for
    from qkv.plan.presets import load_model

    result = plan("--model", "demo", "--seq-len", "64", "--bench", str(tmp_path / "r.json"),
                  "--no-calibrate")
    assert result.exit_code == 2
    assert "--bench" in result.output and "--no-calibrate" in result.output
    with pytest.raises(ValueError, match="read only when the rates are measured"):
        rates_for(load_model("demo"), 64, 1, "train", "fp32", "cpu", tmp_path / "r.json",
                  measure=False)
    assert plan("--model", "demo", "--seq-len", "64", "--no-calibrate").exit_code == 0


def test_the_table_columns_stay_apart_at_an_absurd_length():
    import re

    result = plan("--model", "gpt2", "--seq-len", "100000000000", "--memory", "80GB",
                  "--no-calibrate")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("peak memory"))
    table = lines[start:lines.index("", start)]
    assert len(table) >= 8
    for line in table:  # the label, then three cells, at least two spaces apart
        assert len(re.split(r" {2,}", line.strip())) == 4, line
    assert "13,090,000,000 PB" in result.output
