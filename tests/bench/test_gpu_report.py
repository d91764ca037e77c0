"""benchmarks/gpu_report.py renders a RESULTS.md section from a fake run folder, and a dry run of
benchmarks/gpu_check.sh with a stand-in python checks its steps, processes and budgets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.bench import gpu as bench
from tests.bench.test_gpu_targets import fake_results
from tests.bench.test_gpu_tuning import _load, tuning

ROOT = Path(__file__).resolve().parents[2]


report = _load("gpu_report")

FINISHED = """tests/attention/test_matrix.py::test_matches_reference[lse-plain-triton] PASSED [ 50%]
tests/attention/test_matrix.py::test_matches_reference[lse-plain-sdpa] FAILED [100%]
=========================== short test summary info ============================
FAILED tests/attention/test_matrix.py::test_matches_reference[lse-plain-sdpa] - AssertionError
======= 1 failed, 40 passed, 3 skipped, 200 deselected in 81.20s (0:01:21) =======
"""
CUT_SHORT = """tests/attention/test_matrix.py::test_matches_reference[lse-causal-triton] PASSED
tests/attention/test_matrix.py::test_matches_reference[lse-causal-sdpa] PASSED [ 20%]
tests/attention/test_matrix.py::test_matches_reference[lse-d256-triton] SKIPPED (cap) [ 30%]
"""


def fake_run(out: Path) -> None:
    (out / "versions.txt").write_text("python 3.12.3 | torch 2.11.0 | triton 3.6.0 | cuda 13.0\n"
                                      "gpu NVIDIA H200\ncommit abc1234\n")
    (out / "steps.tsv").write_text("versions\t15\t3\t0\nmatrix_0\t140\t82\t1\n"
                                   "matrix_1\t140\t140\t124\nsweep\t130\t97\t0\n")
    (out / "matrix_0.txt").write_text(FINISHED)
    (out / "matrix_1.txt").write_text(CUT_SHORT)
    (out / "gpu_tests_0.txt").write_text("===== 4 passed in 50.0s =====\n")
    env = {"date": "2026-12-01 10:00:00", "gpu": "NVIDIA H200", "torch": "2.11.0",
           "triton": "3.6.0", "cuda": "13.0", "python": "3.12.3", "copy_gbps": 4270.0}
    bench.write_json(fake_results(), out / "attention_gpu.json", env)
    rows = [dict(lq=1, lk=lk, plain_ms=s, split_ms=1.0, split_used=True, error=None)
            for lk, s in ((512, 0.9), (1024, 1.4))]
    tuning.write(out, rows, [dict(kind="plain", provider="triton", mode="fwd", ms=1.0,
                                  error=None)], env)


def test_pytest_logs_are_counted_finished_or_cut_short():
    assert report.pytest_counts(FINISHED) == (
        {"failed": 1, "passed": 40, "skipped": 3, "deselected": 200}, True)
    assert report.pytest_counts(CUT_SHORT) == ({"passed": 2, "skipped": 1}, False)
    assert report.failures(FINISHED) == [
        "FAILED tests/attention/test_matrix.py::test_matches_reference[lse-plain-sdpa] - "
        "AssertionError"]


def test_the_section_holds_every_part_of_the_run(tmp_path):
    fake_run(tmp_path)
    md = report.render(tmp_path)
    assert md.startswith("## 2026-12-01 — GPU check on NVIDIA H200\n")
    assert "torch 2.11.0, triton 3.6.0, cuda 13.0, python 3.12.3" in md
    assert "at commit abc1234" in md and "4.27 TB/s" in md
    assert "| matrix_1 | 140 | 140 | 124 (timed out) |" in md
    assert ("- Conformance matrix on CUDA (test_matrix.py): 42 passed, 1 failed, 4 skipped, "
            "200 deselected (2 processes; 1 cut short, counted from their per-test lines).") in md
    assert "  - FAILED tests/attention/test_matrix.py::test_matches_reference[lse-plain-sdpa]" in md
    assert "- `gpu` tests (test_triton.py -m gpu): 4 passed (1 process)." in md
    assert "### Targets" in md and md.count("| forward, causal | 64 | sdpa-cudnn |") == 1
    assert "| 128 | yes | 8192 | fwd |" in md
    assert "| 1 | 0.90 | 1.40 | 1024 |" in md and "DECODE_MIN_LK = 1024" in md
    assert "| plain | fwd | 1.000 |" in md


def test_a_folder_with_nothing_says_so(tmp_path, capsys):
    md = report.render(tmp_path)
    assert "No sweep results" in md and "No tuning results" in md and "not run" in md
    assert report.main([str(tmp_path / "missing")]) == 1
    assert report.main([str(tmp_path), "--output", str(tmp_path / "s.md")]) == 0
    assert (tmp_path / "s.md").read_text() in capsys.readouterr().out


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


STAND_IN = """#!/usr/bin/env bash
# Records how it was called (arguments and the test environment), then exits 0.
echo "$* | dev=${QKV_TEST_DEVICE:-} shard=${QKV_TEST_SHARD:-} cfg=${QKV_TEST_TRITON_CONFIGS:-}" \\
    >> "$CALLS"
cat > /dev/null
"""


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_dry_run_of_gpu_check_runs_every_step_in_budget(tmp_path):
    stand_in = tmp_path / "python3"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(stand_in), "CALLS": str(tmp_path / "c")}
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, timeout=60,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    names = [s[0] for s in steps]
    assert names[0] == "versions" and names[-3:] == ["sweep", "tuning", "report"]
    parallel = names[1:-3]
    assert sorted(parallel) == sorted([f"matrix_{i}" for i in range(6)]
                                      + [f"gpu_tests_{i}" for i in range(4)]
                                      + [f"warm_{i}" for i in range(6)])
    budgets = dict((s[0], int(s[1])) for s in steps)
    total = (budgets["versions"] + max(budgets[n] for n in parallel) + budgets["sweep"]
             + budgets["tuning"] + budgets["report"])
    assert total <= 345 and all(s[3] == "0" for s in steps)
    calls = (tmp_path / "c").read_text().splitlines()
    matrix = [c for c in calls if "test_matrix.py" in c]
    assert len(matrix) == 6 and all("dev=cuda" in c and "cfg= " not in c for c in matrix)
    assert {c.split("shard=")[1].split()[0] for c in matrix} == {f"{i}/6" for i in range(6)}
    gpu_tests = [c for c in calls if "-m gpu tests/attention/test_triton.py" in c]
    assert len(gpu_tests) == 4 and all("cfg=first" in c and "dev= " in c for c in gpu_tests)
    assert sum("gpu_tuning.py --warm" in c for c in calls) == 6
    assert any(c.startswith("benchmarks/attention_gpu.py --out") for c in calls)
    assert any(c.startswith("benchmarks/gpu_tuning.py --out") for c in calls)
    assert any(c.startswith("benchmarks/gpu_report.py") for c in calls)


BLOCKER = '''
import sys
BLOCKED = {"typer", "rich", "click", "matplotlib", "scipy", "safetensors", "tokenizers",
           "pyhmmer", "hypothesis", "transformers", "xdist"}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
'''
ON_THE_GPU_MACHINE = '''
import runpy, sys, tempfile
import qkv, qkv.attention, qkv.bench.gpu as gpu
import tests.attention._support, tests.attention.conftest
for name in ("gpu_tuning", "gpu_report", "attention_gpu"):
    runpy.run_path(f"benchmarks/{name}.py")
gpu.write_all([], tempfile.mkdtemp(), {})
print("imports ok")
'''


def test_the_gpu_run_needs_only_torch_triton_numpy_and_pytest(tmp_path):
    """The reference GPU machine has nothing else: everything gpu_check.sh runs imports there."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    res = subprocess.run([sys.executable, "-c", ON_THE_GPU_MACHINE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "imports ok" in res.stdout, res.stderr[-3000:]
    check = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0  # the blocker works
